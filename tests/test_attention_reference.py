"""Index-table helpers, the fp32 reference, and the portable gather path against the reference."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.portable import block_sparse_attention_portable
from pallas_kernels.reference import (
    block_mask_to_indices,
    block_sparse_attention_reference,
    indices_to_block_mask,
)


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.abs(a).max(initial=0.0))


def test_block_mask_to_indices_numpy_and_jnp_round_trip():
    rng = np.random.default_rng(0)
    mask = rng.random((2, 3, 5, 7)) < 0.4
    mask[0, 0, 1] = False  # an empty row
    mask[1, 2, 3] = True  # a full row
    idx, cnt = block_mask_to_indices(mask)
    assert isinstance(idx, np.ndarray) and idx.dtype == np.int32 and cnt.dtype == np.int32
    assert idx.shape == (2, 3, 5, 7) and idx.shape[-1] == cnt.max()
    np.testing.assert_array_equal(cnt, mask.sum(-1))
    np.testing.assert_array_equal(indices_to_block_mask(idx, cnt, 7), mask)
    for row_idx, row_cnt, row in zip(idx.reshape(-1, 7), cnt.reshape(-1), mask.reshape(-1, 7)):
        np.testing.assert_array_equal(row_idx[:row_cnt], np.flatnonzero(row))  # sorted ascending
        assert (row_idx[row_cnt:] == (row_idx[row_cnt - 1] if row_cnt else 0)).all()  # in-bounds filler

    jidx, jcnt = jax.jit(block_mask_to_indices)(jnp.asarray(mask))
    assert jidx.shape == (2, 3, 5, 7)
    np.testing.assert_array_equal(np.asarray(jidx), idx)
    np.testing.assert_array_equal(np.asarray(jcnt), cnt)
    np.testing.assert_array_equal(np.asarray(indices_to_block_mask(jidx, jcnt, 7)), mask)
    with pytest.raises(ValueError, match="max_blocks"):
        block_mask_to_indices(mask, max_blocks=2)


def test_reference_with_full_mask_is_dense_attention():
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 32, 2, 8))
    idx, cnt = block_mask_to_indices(np.ones((1, 1, 4, 2), bool))
    out = block_sparse_attention_reference(q, k, v, idx, cnt, block_q=8, block_kv=16, scale=0.3)
    expected = jax.nn.dot_product_attention(q, k, v, scale=0.3)
    assert _rel_l2(out, expected) <= 1e-6


def _case(batch, heads, n_q, n_k, block_q, block_kv, dim, table_b, table_h, density, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((batch if table_b else 1, heads if table_h else 1, n_q, n_k)) < density
    single = rng.integers(0, n_k, size=mask.shape[:-1])
    rows_single = rng.random(mask.shape[:-1]) < 0.2  # rows with a single block
    mask = np.where(rows_single[..., None], np.arange(n_k) == single[..., None], mask)
    if n_q > 1:
        mask[..., 0, :] = False  # a count-0 row
    q = jnp.asarray(rng.standard_normal((batch, n_q * block_q, heads, dim), np.float32))
    k = jnp.asarray(rng.standard_normal((batch, n_k * block_kv, heads, dim), np.float32))
    v = jnp.asarray(rng.standard_normal((batch, n_k * block_kv, heads, dim), np.float32))
    return q, k, v, mask


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2), heads=st.integers(1, 3), n_q=st.integers(1, 4), n_k=st.integers(1, 5),
    block_q=st.sampled_from([4, 16]), block_kv=st.sampled_from([8, 16]), dim=st.just(8), table_b=st.booleans(), table_h=st.booleans(),
    density=st.floats(0.1, 1.0), pad=st.integers(0, 15), seed=st.integers(0, 2**16),
)
def test_portable_matches_reference(batch, heads, n_q, n_k, block_q, block_kv, dim, table_b, table_h,
                                    density, pad, seed):
    q, k, v, mask = _case(batch, heads, n_q, n_k, block_q, block_kv, dim, table_b, table_h, density, seed)
    kv_len = max(n_k * block_kv - pad, 1) if pad else None
    idx, cnt = block_mask_to_indices(mask)
    kwargs = dict(block_q=block_q, block_kv=block_kv, scale=1 / math.sqrt(dim), kv_len=kv_len)
    ref = block_sparse_attention_reference(q, k, v, idx, cnt, **kwargs)
    out = block_sparse_attention_portable(q, k, v, idx, cnt, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    if n_q > 1:
        np.testing.assert_array_equal(np.asarray(out[:, :block_q]), 0.0)  # count-0 query block
    assert np.isfinite(np.asarray(out)).all()
    assert _rel_l2(out, ref) <= 1e-5


def test_portable_in_bfloat16_and_under_jit():
    q, k, v, mask = _case(1, 2, 4, 4, 16, 16, 16, True, True, 0.5, 3)
    idx, cnt = block_mask_to_indices(mask)
    ref = block_sparse_attention_reference(q, k, v, idx, cnt, block_q=16, block_kv=16, scale=0.25)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = jax.jit(lambda a, b, c, i, n: block_sparse_attention_portable(
        a, b, c, i, n, block_q=16, block_kv=16, scale=0.25, kv_len=60))(qb, kb, vb, idx, cnt)
    ref_len = block_sparse_attention_reference(q, k, v, idx, cnt, block_q=16, block_kv=16, scale=0.25, kv_len=60)
    assert out.dtype == jnp.bfloat16
    assert _rel_l2(out, ref_len) <= 2e-2
    assert _rel_l2(ref_len, ref) > 0  # kv_len really masks something


@pytest.mark.parametrize("fn", [block_sparse_attention_reference, block_sparse_attention_portable])
def test_bad_shapes_raise(fn):
    q = jnp.zeros((1, 32, 2, 8))
    idx, cnt = block_mask_to_indices(np.ones((1, 1, 4, 4), bool))
    with pytest.raises(ValueError, match="block_q"):
        fn(q, q, q, idx, cnt, block_q=5, block_kv=8, scale=1.0)
    with pytest.raises(ValueError, match="kv_indices.shape"):
        fn(q, q, q, idx[:, :, :2], cnt[:, :, :2], block_q=8, block_kv=8, scale=1.0)
    with pytest.raises(ValueError, match="v.shape"):
        fn(q, q, q[:, :16], idx, cnt, block_q=8, block_kv=8, scale=1.0)


def test_render_helpers_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    from jaxvid.attention.render import render_block_mask, render_selection

    mask = np.eye(6, dtype=bool) | np.eye(6, k=1, dtype=bool)
    path = render_block_mask(mask, tmp_path / "mask.png", title="band")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    idx, cnt = block_mask_to_indices(mask[None, None])
    path = render_selection(idx, cnt, 6, tmp_path / "sel.png")
    assert path.stat().st_size > 0
