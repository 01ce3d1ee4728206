"""Radial masks: bit-exact against upstream's fixtures, a token-level oracle, and attend() equivalence."""
from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxvid.attention import Radial, VideoLayout, attend
from jaxvid.attention.radial import radial_block_mask, radial_kv_tables
from pallas_kernels.reference import indices_to_block_mask

FIXTURES = [
    "cogvideox_13x1350_b128_d1",
    "cogvideox_13x1350_b64_d1",
    "cogvideox_small_6x256_b64_d1",
    "hunyuan_8x300_b64_d05",
    "wan_9x200_b64_d1",
]


@pytest.mark.parametrize("name", FIXTURES)
def test_mask_matches_upstream_fixture(fixtures_dir, name):
    ref = np.load(fixtures_dir / "radial" / f"{name}.npz")
    mask = radial_block_mask(
        int(ref["num_frames"]), int(ref["tokens_per_frame"]), block_size=int(ref["block_size"]),
        decay_factor=float(ref["decay_factor"]), model_type=str(ref["model_type"]),
        text_tokens=int(ref["text_tokens"]))
    assert mask.shape == ref["block_mask"].shape
    assert mask.shape[0] * int(ref["block_size"]) == int(ref["padded_seq_len"])
    np.testing.assert_array_equal(mask, ref["block_mask"])


def _tile_oracle(i, j, tpf, block_size, decay, model_type):
    """Token-level frame-pair tile, placed in its padded canvas and shrunk with float32 densities."""
    dist = abs(i - j)
    rows = np.arange(tpf)[:, None]
    cols = np.arange(tpf)[None, :]
    if j == 0 and model_type == "wan":
        local = np.ones((tpf, tpf), bool)
    else:
        if model_type == "cogvideox" and dist <= 1:
            width = tpf if dist == 0 else tpf // 2
        elif model_type in ("wan", "hunyuan") and dist <= 1:
            width = tpf
        else:
            width = max(2 ** tpf.bit_length() / 2 ** dist.bit_length() * decay, block_size)
        local = np.abs(cols - rows) <= width
        decay_split = 2 ** tpf.bit_length() / 2 ** dist.bit_length()
        if decay_split < 128 and dist % int(128 / decay_split) != 0:
            local = np.zeros_like(local)
    r_off, c_off = (i * tpf) % block_size, (j * tpf) % block_size
    n = -(-tpf // block_size)
    canvas = np.zeros((r_off + n * block_size, c_off + n * block_size), bool)
    canvas[r_off:r_off + tpf, c_off:c_off + tpf] = local
    canvas = canvas[:n * block_size, :n * block_size].reshape(n, block_size, n, block_size)
    density = canvas.sum(axis=1).astype(np.float32) / np.float32(block_size)  # [n, n, bs]
    nonzero = (density > 0).sum(-1)
    high = (density > np.float32(1 / 3)).sum(-1)
    frac = high.astype(np.float32) / (nonzero.astype(np.float32) + np.float32(1e-9))
    return frac > np.float32(0.6)


def _mask_oracle(frames, tpf, block_size, decay, model_type, text, keep_diagonal=True):
    video = frames * tpf
    n_blocks = -(-(video + text) // block_size)
    mask = np.zeros((n_blocks, n_blocks), bool)
    mask[video // block_size:] = True
    mask[:, video // block_size:] = True
    for i in range(frames):
        for j in range(frames):
            tile = _tile_oracle(i, j, tpf, block_size, decay, model_type)
            r0, c0 = (i * tpf) // block_size, (j * tpf) // block_size
            mask[r0:r0 + tile.shape[0], c0:c0 + tile.shape[1]] |= tile
    if keep_diagonal:  # jaxvid keeps every diagonal block (upstream can drop it for tiny frames)
        np.fill_diagonal(mask, True)
    return mask


@settings(max_examples=25, deadline=None)
@given(
    frames=st.integers(1, 9),
    tpf=st.integers(1, 400),
    block_size=st.sampled_from([64, 128]),
    decay=st.sampled_from([0.25, 0.5, 0.95, 1.0]),
    model_type=st.sampled_from(["cogvideox", "hunyuan", "wan"]),
    text=st.integers(0, 70),
)
def test_mask_matches_token_level_oracle(frames, tpf, block_size, decay, model_type, text):
    mask = radial_block_mask(frames, tpf, block_size=block_size, decay_factor=decay,
                             model_type=model_type, text_tokens=text)
    np.testing.assert_array_equal(mask, _mask_oracle(frames, tpf, block_size, decay, model_type, text))


def test_mask_is_cached_read_only_and_logs_density(caplog):
    with caplog.at_level(logging.INFO, logger="jaxvid.attention.radial"):
        first = radial_block_mask(5, 96, block_size=64, text_tokens=7, decay_factor=0.75)
    second = radial_block_mask(5, 96, block_size=64, text_tokens=7, decay_factor=0.75)
    assert first is second
    assert not first.flags.writeable
    assert any("density" in r.getMessage() for r in caplog.records)
    indices, counts = radial_kv_tables(5, 96, block_size=64, text_tokens=7, decay_factor=0.75)
    assert indices.shape[:2] == (1, 1) and not indices.flags.writeable
    np.testing.assert_array_equal(indices_to_block_mask(indices[0, 0], counts[0, 0], first.shape[1]), first)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model_type="ltx"), "model_type"),
    (dict(decay_factor=0.0), "decay_factor"),
    (dict(block_size=0), "block_size"),
    (dict(text_tokens=-1), "text_tokens"),
])
def test_mask_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        radial_block_mask(4, 64, **kwargs)


def _masked_dense(q, k, v, token_mask, scale):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * scale
    logits = jnp.where(token_mask, logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v, precision="highest")


@pytest.mark.parametrize("text_first", [True, False])
def test_attend_radial_equals_dense_with_mask_in_original_order(text_first):
    frames, height, width, text, block = 6, 8, 9, 21, 64  # 453 tokens: padding and a text/video straddle
    layout = VideoLayout(frames=frames, height=height, width=width, text_tokens=text, text_first=text_first)
    seq = layout.seq_len
    q, k, v = jax.random.normal(jax.random.PRNGKey(1), (3, 2, seq, 3, 16), jnp.float32)
    spec = Radial(block_size=block, decay_factor=0.5)
    out = jax.jit(lambda q, k, v: attend(q, k, v, spec, layout=layout))(q, k, v)

    block_mask = radial_block_mask(frames, height * width, block_size=block, decay_factor=0.5,
                                   text_tokens=text)
    token_mask = np.repeat(np.repeat(block_mask, block, 0), block, 1)[:seq, :seq]  # [video; text] order
    video = frames * height * width
    # position in the caller's order -> position in [video; text] order
    where = np.r_[np.arange(video, seq), np.arange(video)] if text_first else np.arange(seq)
    expected = _masked_dense(q, k, v, token_mask[np.ix_(where, where)], 1 / math.sqrt(16))
    rel = float(jnp.linalg.norm(out - expected) / jnp.linalg.norm(expected))
    assert rel <= 1e-5, rel


def test_attend_radial_rejects_missing_or_mismatched_layout():
    q = jnp.zeros((1, 40, 2, 8))
    with pytest.raises(ValueError, match="layout"):
        attend(q, q, q, Radial(block_size=64))
    layout = VideoLayout(frames=2, height=4, width=4)
    with pytest.raises(ValueError, match=r"expected \[B, 32, H, D\]"):
        attend(q, q, q, Radial(block_size=64), layout=layout)


# ------------------------------------------------- small frames and dtypes (issue 16, item 11)

@pytest.mark.parametrize("frames, height, width, text", [(4, 4, 4, 0), (8, 4, 4, 10), (6, 2, 3, 5)])
def test_frames_smaller_than_a_block_keep_the_diagonal(frames, height, width, text):
    """4 x 16 tokens with block 64 kept no block and returned zeros. Now every query block keeps its
    own block: outputs equal the token-level reference (dense attention under the block mask) and
    no row is zero."""
    block = 64
    layout = VideoLayout(frames=frames, height=height, width=width, text_tokens=text, text_first=False)
    mask = radial_block_mask(frames, height * width, block_size=block, text_tokens=text)
    assert mask.diagonal().all()
    seq = layout.seq_len
    q, k, v = jax.random.normal(jax.random.PRNGKey(2), (3, 1, seq, 2, 16), jnp.float32)
    out = attend(q, k, v, Radial(block_size=block), layout=layout)
    token_mask = np.repeat(np.repeat(mask, block, 0), block, 1)[:seq, :seq]
    expected = _masked_dense(q, k, v, token_mask, 1 / math.sqrt(16))
    assert float(jnp.linalg.norm(out - expected) / jnp.linalg.norm(expected)) <= 1e-5
    assert float(jnp.abs(out).sum(axis=(-1, -2)).min()) > 0


@pytest.mark.parametrize("bad", ["q", "k", "v"])
def test_integer_qkv_is_a_type_error(bad):
    """int32 q/k/v used to give all-zero outputs."""
    from jaxvid.attention import dense_attention
    from jaxvid.attention.radial import radial_attention

    x = jnp.ones((1, 128, 2, 8), jnp.float32)
    args = {name: (x.astype(jnp.int32) if name == bad else x) for name in ("q", "k", "v")}
    layout = VideoLayout(frames=2, height=8, width=8)
    with pytest.raises(TypeError, match=rf"attend: {bad} has dtype int32"):
        attend(**args)
    with pytest.raises(TypeError, match=rf"attend: {bad} has dtype int32"):
        attend(**args, spec=Radial(block_size=64), layout=layout)
    with pytest.raises(TypeError, match=rf"dense_attention: {bad} has dtype int32"):
        dense_attention(**args)
    with pytest.raises(TypeError, match=rf"radial_attention: {bad} has dtype int32"):
        radial_attention(**args, num_frames=2, tokens_per_frame=64, block_size=64)
