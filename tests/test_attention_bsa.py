"""BSA: selection and outputs against LongCat-Video's fixtures; layout helpers; validation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvid.attention import BSA, VideoLayout, attend
from jaxvid.attention.bsa import bsa_attention, from_chunk_order, select_blocks, to_chunk_order
from pallas_kernels.reference import indices_to_block_mask


def _load(fixtures_dir, name):
    d = np.load(fixtures_dir / "longcat" / f"{name}.npz")
    q, k, v = (jnp.asarray(d[n].transpose(0, 2, 1, 3)) for n in "qkv")  # fixtures are [B, H, S, D]
    kwargs = dict(
        sparsity=None if np.isnan(d["sparsity"]) else float(d["sparsity"]),
        cdf_threshold=None if np.isnan(d["cdf_threshold"]) else float(d["cdf_threshold"]),
        chunk_3d_shape_q=tuple(int(x) for x in d["chunk_3d_shape_q"]),
        chunk_3d_shape_k=tuple(int(x) for x in d["chunk_3d_shape_k"]),
    )
    shapes = tuple(int(x) for x in d["latent_shape_q"]), tuple(int(x) for x in d["latent_shape_k"])
    return d, q, k, v, shapes, kwargs


@pytest.mark.parametrize("name", ["bsa_topk", "bsa_cdf", "bsa_cdf_topk"])
def test_selection_and_output_match_longcat(fixtures_dir, name):
    d, q, k, v, (lat_q, lat_k), kwargs = _load(fixtures_dir, name)
    indices, counts = select_blocks(q, k, lat_q, lat_k, **kwargs)
    n_k = d["block_mask"].shape[-1]
    assert indices.shape[:3] == d["block_counts"].shape and counts.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(counts), d["block_counts"])
    np.testing.assert_array_equal(indices_to_block_mask(np.asarray(indices), np.asarray(counts), n_k),
                                  d["block_mask"])
    out = jax.jit(lambda q, k, v: bsa_attention(q, k, v, lat_q, lat_k, **kwargs))(q, k, v)
    expected = d["output"].transpose(0, 2, 1, 3)
    rel = float(np.linalg.norm(np.asarray(out) - expected) / np.linalg.norm(expected))
    assert rel <= 1e-5, rel
    via_attend = attend(q, k, v, BSA(**kwargs), layout=VideoLayout(frames=lat_q[0], height=lat_q[1], width=lat_q[2]))
    np.testing.assert_allclose(np.asarray(via_attend), np.asarray(out), rtol=0, atol=1e-6)


def test_chunk_order_round_trip_and_chunk_contiguity():
    lat, ch = (4, 6, 8), (2, 3, 4)
    x = jnp.arange(4 * 6 * 8)[None, :, None, None]  # token id = (t * 6 + h) * 8 + w
    y = to_chunk_order(x, lat, ch)
    np.testing.assert_array_equal(from_chunk_order(y, lat, ch), x)
    t, h, w = np.unravel_index(np.asarray(y[0, :, 0, 0]), lat)
    chunk_id = ((t // 2) * 2 + h // 3) * 2 + w // 4
    np.testing.assert_array_equal(chunk_id, np.repeat(np.arange(8), 24))


def test_selection_is_jittable_with_static_shapes_and_reference_kernel_agrees():
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 128, 2, 16))
    lat = (2, 8, 8)
    kw = dict(sparsity=0.75, cdf_threshold=0.4, chunk_3d_shape_q=(2, 4, 4), chunk_3d_shape_k=(1, 4, 4))
    idx, cnt = jax.jit(lambda q, k: select_blocks(q, k, lat, lat, **kw))(q, k)
    assert idx.shape == (2, 2, 4, 8) and cnt.shape == (2, 2, 4)
    assert int(cnt.min()) >= 2  # top-k floor: int(0.25 * 8)
    portable = bsa_attention(q, k, v, lat, lat, **kw, implementation="portable")
    reference = bsa_attention(q, k, v, lat, lat, **kw, implementation="reference")
    np.testing.assert_allclose(np.asarray(portable), np.asarray(reference), atol=1e-5)
    bf16 = bsa_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), lat, lat, **kw)
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == q.shape


def test_single_frame_layout_runs_dense():
    q, k, v = jax.random.normal(jax.random.PRNGKey(2), (3, 1, 64, 2, 8))
    out = attend(q, k, v, BSA(), layout=VideoLayout(frames=1, height=8, width=8))
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.nn.dot_product_attention(q, k, v)), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(latent_shape_q=(4, 8, 8)), "S must equal T\\*H\\*W"),
    (dict(chunk_3d_shape_q=(3, 2, 2)), "not divisible"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=None, cdf_threshold=None), "both None"),
    (dict(cdf_threshold=1.5), "cdf_threshold"),
    (dict(sparsity=0.99), "keeps int"),
    (dict(chunk_3d_shape_k=(2, 2)), "chunk_3d_shape_k"),
    (dict(implementation="triton"), "implementation"),
])
def test_bad_arguments_raise(kwargs, match):
    q = jnp.zeros((1, 128, 2, 8))
    args = dict(latent_shape_q=(2, 8, 8), latent_shape_k=(2, 8, 8), sparsity=0.5,
                chunk_3d_shape_q=(2, 2, 2), chunk_3d_shape_k=(2, 2, 2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        bsa_attention(q, q, q, **args)


def test_attend_bsa_rejects_text_and_bad_specs():
    q = jnp.zeros((1, 128, 2, 8))
    with pytest.raises(ValueError, match="text_tokens"):
        attend(q, q, q, BSA(), layout=VideoLayout(frames=2, height=4, width=4, text_tokens=96))
    with pytest.raises(ValueError, match="spec"):
        attend(q, q, q, "bsa")
    with pytest.raises(ValueError, match="sparsity"):
        BSA(sparsity=1.2)


def test_pool_chunks_equals_the_mean_of_each_contiguous_chunk():
    # Upstream pools after permuting into chunk order; pool_chunks reads (T, H, W) order directly.
    from jaxvid.attention.bsa import pool_chunks

    lat, ch = (4, 6, 8), (2, 3, 4)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 4 * 6 * 8, 3, 5), jnp.float32)
    chunked = np.asarray(to_chunk_order(x, lat, ch)).reshape(2, -1, 24, 3, 5).mean(axis=2)
    np.testing.assert_allclose(np.asarray(pool_chunks(x, lat, ch)), chunked.transpose(0, 2, 1, 3),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="pool_chunks: x.shape"):
        pool_chunks(x, (4, 6, 7), ch)
    with pytest.raises(ValueError, match="chunk_shape"):
        pool_chunks(x, lat, (2, 3))
