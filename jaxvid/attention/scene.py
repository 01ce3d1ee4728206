"""Scene-aware block masks: tokens of scene a attend to scene b only where adjacency[a][b].

Same token order and block grid as `radial_block_mask` ([video frames; text], padded to the
block size), so the two combine with a plain AND. Text/padding block rows and columns (from
`video_tokens // block_size` on) stay dense, as in the radial mask.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np

__all__ = ["scene_block_mask", "validate_scenes"]

logger = logging.getLogger(__name__)


def validate_scenes(num_frames: int, scene_boundaries: Sequence[int],
                    scene_adjacency: Sequence[Sequence[bool]]) -> tuple[tuple[int, ...], tuple[tuple[bool, ...], ...]]:
    """Check and normalise scene settings to hashable tuples.

    scene_boundaries: frame edges of the scenes, strictly increasing, from 0 to num_frames:
    scene s holds frames [boundaries[s], boundaries[s + 1]). E.g. (0, 5, 13) = two scenes of 13 frames.
    scene_adjacency: [n_scenes][n_scenes] bool, row = query scene, column = key scene; the
    diagonal must be True (a scene always sees itself).
    """
    bounds = tuple(int(b) for b in scene_boundaries)
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != num_frames or any(
            b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
        raise ValueError(
            f"scene_boundaries={bounds}; expected strictly increasing frame edges from 0 to "
            f"num_frames={num_frames}, e.g. (0, {max(num_frames // 2, 1)}, {num_frames})")
    n_scenes = len(bounds) - 1
    adjacency = np.asarray(scene_adjacency)
    if adjacency.shape != (n_scenes, n_scenes):
        raise ValueError(
            f"scene_adjacency has shape {adjacency.shape}; expected ({n_scenes}, {n_scenes}) for "
            f"scene_boundaries={bounds}")
    if adjacency.dtype != bool and not np.isin(adjacency, (0, 1)).all():
        raise ValueError(f"scene_adjacency={adjacency.tolist()}; expected booleans")
    adjacency = adjacency.astype(bool)
    if not adjacency.diagonal().all():
        raise ValueError(f"scene_adjacency={adjacency.tolist()}; its diagonal must be True")
    return bounds, tuple(tuple(bool(x) for x in row) for row in adjacency)


@functools.lru_cache(maxsize=64)
def _scene_block_mask_cached(num_frames: int, tokens_per_frame: int, bounds: tuple[int, ...],
                             adjacency: tuple[tuple[bool, ...], ...], block_size: int,
                             text_tokens: int) -> np.ndarray:
    video_tokens = num_frames * tokens_per_frame
    n_blocks = -(-(video_tokens + text_tokens) // block_size)
    frame_scene = np.searchsorted(np.asarray(bounds), np.arange(num_frames), side="right") - 1
    token_scene = np.repeat(frame_scene, tokens_per_frame)
    token_scene = np.concatenate([token_scene, np.full(n_blocks * block_size - video_tokens, -1)])
    # Which scenes each block touches: [n_blocks, n_scenes]. A block straddling a scene edge is
    # kept when any of its token pairs is allowed, so attention inside a scene is never cut.
    n_scenes = len(bounds) - 1
    touches = (token_scene.reshape(n_blocks, block_size, 1) == np.arange(n_scenes)).any(axis=1)
    adj = np.asarray(adjacency, dtype=np.int32)
    mask = (touches.astype(np.int32) @ adj @ touches.T.astype(np.int32)) > 0
    border = video_tokens // block_size
    mask[border:] = True
    mask[:, border:] = True
    logger.info("scene mask %d scenes over %d frames, block %d: density %.4f",
                n_scenes, num_frames, block_size, mask.mean())
    mask.setflags(write=False)
    return mask


def scene_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    scene_boundaries: Sequence[int],
    scene_adjacency: Sequence[Sequence[bool]],
    *,
    block_size: int = 128,
    text_tokens: int = 0,
) -> np.ndarray:
    """Scene block mask, bool [n_blocks, n_blocks], read-only (n_blocks as in radial_block_mask).

    Combine with radial: `radial_block_mask(...) & scene_block_mask(...)`.
    """
    for name, value in (("num_frames", num_frames), ("tokens_per_frame", tokens_per_frame),
                        ("block_size", block_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"scene_block_mask: {name}={value!r}; expected an int >= 1")
    if not isinstance(text_tokens, (int, np.integer)) or text_tokens < 0:
        raise ValueError(f"scene_block_mask: text_tokens={text_tokens!r}; expected an int >= 0")
    bounds, adjacency = validate_scenes(int(num_frames), scene_boundaries, scene_adjacency)
    return _scene_block_mask_cached(int(num_frames), int(tokens_per_frame), bounds, adjacency,
                                    int(block_size), int(text_tokens))
