"""Scene-aware masks: token-level semantics, validation, and radial AND scene through attend()."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvid.attention import Radial, Scene, VideoLayout, attend
from jaxvid.attention.radial import radial_block_mask
from jaxvid.attention.scene import scene_block_mask


def _token_oracle(frames, tpf, bounds, adjacency, block, text):
    """Block kept iff some token pair in it is allowed; text/padding rows and columns dense."""
    video = frames * tpf
    n = -(-(video + text) // block)
    scene_of_frame = np.array([max(s for s, b in enumerate(bounds[:-1]) if b <= f) for f in range(frames)])
    token_scene = np.full(n * block, -1)
    token_scene[:video] = np.repeat(scene_of_frame, tpf)
    adj = np.asarray(adjacency, bool)
    allowed = np.zeros((n * block, n * block), bool)
    vid = token_scene >= 0
    allowed[np.ix_(vid, vid)] = adj[np.ix_(token_scene[vid], token_scene[vid])]
    mask = allowed.reshape(n, block, n, block).any(axis=(1, 3))
    mask[video // block:] = True
    mask[:, video // block:] = True
    return mask


@pytest.mark.parametrize("frames, tpf, bounds, adjacency, block, text", [
    (6, 100, (0, 2, 6), ((1, 0), (1, 1)), 64, 10),
    (9, 70, (0, 3, 5, 9), ((1, 1, 0), (0, 1, 0), (1, 0, 1)), 128, 0),
    (4, 64, (0, 4), ((1,),), 64, 3),
])
def test_scene_mask_matches_token_oracle(frames, tpf, bounds, adjacency, block, text):
    mask = scene_block_mask(frames, tpf, bounds, adjacency, block_size=block, text_tokens=text)
    np.testing.assert_array_equal(mask, _token_oracle(frames, tpf, bounds, adjacency, block, text))
    assert not mask.flags.writeable


@pytest.mark.parametrize("bounds, adjacency, match", [
    ((1, 4), ((1,),), "scene_boundaries"),
    ((0, 3, 3, 4), ((1, 0, 0),) * 3, "scene_boundaries"),
    ((0, 2), ((1,),), "scene_boundaries"),  # does not cover the 4 frames
    ((0, 2, 4), ((1, 1),), "scene_adjacency"),
    ((0, 2, 4), ((0, 1), (1, 1)), "diagonal"),
])
def test_scene_validation(bounds, adjacency, match):
    with pytest.raises(ValueError, match=match):
        scene_block_mask(4, 64, bounds, adjacency, block_size=64)


def test_radial_and_scene_through_attend():
    layout = VideoLayout(frames=6, height=8, width=16, text_tokens=12, text_first=True)
    scene = Scene(boundaries=(0, 3, 6), adjacency=((True, False), (True, True)))
    seq = layout.seq_len
    q, k, v = jax.random.normal(jax.random.PRNGKey(4), (3, 1, seq, 2, 16))
    out = attend(q, k, v, Radial(block_size=64, model_type="hunyuan", scene=scene), layout=layout)
    block_mask = radial_block_mask(6, 128, block_size=64, model_type="hunyuan", text_tokens=12) & scene_block_mask(
        6, 128, scene.boundaries, scene.adjacency, block_size=64, text_tokens=12)
    assert block_mask.sum() < radial_block_mask(6, 128, block_size=64, model_type="hunyuan", text_tokens=12).sum()
    token_mask = np.repeat(np.repeat(block_mask, 64, 0), 64, 1)[:seq, :seq]
    where = np.r_[np.arange(768, seq), np.arange(768)]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / math.sqrt(16)
    logits = jnp.where(token_mask[np.ix_(where, where)], logits, -jnp.inf)
    expected = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v, precision="highest")
    assert float(jnp.linalg.norm(out - expected) / jnp.linalg.norm(expected)) <= 1e-5
