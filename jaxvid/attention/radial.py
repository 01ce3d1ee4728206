"""Radial attention: a static block mask whose temporal window halves as frame distance doubles.

Reimplements the mask construction of mit-han-lab/radial-attention (`radial_attn/attn_mask.py`,
`gen_log_mask_shrinked`, commit 72788d4f) in numpy, bit-exact
(one exception, below):

- token sequence = [video (frame-major); text], padded to a multiple of `block_size`;
- for each frame pair (i, j) a token-level band |col - row| <= window(dist) inside the
  tokens_per_frame x tokens_per_frame tile, AND a "diagonal split" that keeps only every
  `split_factor`-th frame distance once the window drops under 128 tokens (128 is hard-coded
  upstream, whatever the block size);
- the tile, placed at its offset inside its blocks, is shrunk to blocks by upstream's
  `shrinkMaskStrict` (a block is kept when > 60% of its non-empty columns are > 1/3 full) and OR-ed
  into the block mask;
- every block row/column from `video_tokens // block_size` on (text and padding) is dense;
- `wan` adds a first-frame attention sink (frame 0 columns full);
- every diagonal block is kept: the one departure from upstream. Upstream shrinks each frame
  tile over only the first ceil(tokens_per_frame / block_size) blocks of its canvas, so where a
  frame boundary cuts a diagonal block the block can get too small a share and be dropped, and
  with frames of at most a third of a block no block at all survives (4 frames x 16 tokens,
  block 64: attention returned zeros). A query block always sees its own tokens here; the
  upstream fixtures do not change.

Window widths: `cogvideox` (the project's seed rule) dist 0 -> tokens_per_frame, 1 ->
tokens_per_frame // 2; `wan` dist <= 1 -> tokens_per_frame; `hunyuan` dist <= 1 -> tokens_per_frame;
otherwise 2**bit_length(tokens_per_frame) / 2**bit_length(dist) * decay_factor, at least block_size.

The maths uses per-column interval counts instead of materialising each token tile: the counts
are integers, and upstream's float32 thresholds (density > 1/3, fraction > 0.6) are exact
rational comparisons here (3 * count > block_size, 5 * high > 3 * nonzero); no ratio with these
denominators lies within float32 rounding of either threshold.
"""
from __future__ import annotations

import functools
import logging
import math

import jax.numpy as jnp
import numpy as np

from jaxvid.attention.dense import check_float_qkv
from jaxvid.attention.scene import scene_block_mask
from pallas_kernels.api import block_sparse_attention
from pallas_kernels.reference import block_mask_to_indices

__all__ = ["MODEL_TYPES", "radial_block_mask", "radial_window_width", "mask_density", "radial_kv_tables",
           "radial_attention"]

logger = logging.getLogger(__name__)

MODEL_TYPES = ("cogvideox", "hunyuan", "wan")
# Upstream's diagonal-split threshold: fixed at 128 tokens, independent of the block size.
_SPLIT_THRESHOLD = 128


def radial_window_width(dist: int, tokens_per_frame: int, *, decay_factor: float, block_size: int,
                        model_type: str) -> float:
    """Half-width (tokens) of the band between two frames `dist` apart (upstream get_window_width)."""
    if model_type == "cogvideox":
        if dist == 0:
            return tokens_per_frame
        if dist == 1:
            return tokens_per_frame // 2
    elif model_type in ("wan", "hunyuan"):
        if dist <= 1:
            return tokens_per_frame
    else:
        raise ValueError(f"model_type={model_type!r}; expected one of {MODEL_TYPES}")
    decay_length = 2 ** tokens_per_frame.bit_length() / 2 ** dist.bit_length() * decay_factor
    return decay_length if decay_length >= block_size else block_size


def _diagonal_split_keeps(dist: int, tokens_per_frame: int) -> bool:
    """Upstream get_diagonal_split_mask: all-True or all-False tile for this frame distance."""
    decay_length = 2 ** tokens_per_frame.bit_length() / 2 ** dist.bit_length()
    if decay_length >= _SPLIT_THRESHOLD:
        return True
    split_factor = int(_SPLIT_THRESHOLD / decay_length)
    return dist % split_factor == 0


def _shrink_band_tile(window: float, tokens_per_frame: int, block_size: int, row_offset: int,
                      col_offset: int) -> np.ndarray:
    """Block mask [n, n] of one frame-pair tile (upstream shrinkMaskStrict on the padded tile).

    The tile's band |c - r| <= window starts at (row_offset, col_offset) < block_size inside a
    padded canvas; like upstream, only the first n = ceil(tokens_per_frame / block_size) blocks
    of the canvas are looked at in each direction.
    """
    n = -(-tokens_per_frame // block_size)
    width = math.floor(window)
    canvas_cols = np.arange(n * block_size)
    local_cols = canvas_cols - col_offset
    col_valid = (local_cols >= 0) & (local_cols < tokens_per_frame)
    # Rows of the tile that hit each column, in canvas coordinates: [first, last] inclusive.
    first = np.maximum(local_cols - width, 0) + row_offset
    last = np.minimum(local_cols + width, tokens_per_frame - 1) + row_offset
    block_starts = np.arange(n)[:, None] * block_size
    counts = np.minimum(last, block_starts + block_size - 1) - np.maximum(first, block_starts) + 1
    counts = np.where(col_valid, np.maximum(counts, 0), 0)  # [n row blocks, n*bs canvas columns]
    counts = counts.reshape(n, n, block_size)
    nonzero = (counts > 0).sum(-1)
    high = (3 * counts > block_size).sum(-1)
    return 5 * high > 3 * nonzero


@functools.lru_cache(maxsize=64)
def _radial_block_mask_cached(num_frames: int, tokens_per_frame: int, block_size: int,
                              decay_factor: float, model_type: str, text_tokens: int) -> np.ndarray:
    video_tokens = num_frames * tokens_per_frame
    padded = -(-(video_tokens + text_tokens) // block_size) * block_size
    n_blocks = padded // block_size
    mask = np.zeros((n_blocks, n_blocks), bool)
    border = video_tokens // block_size
    mask[border:] = True
    mask[:, border:] = True
    tiles: dict[tuple, np.ndarray] = {}
    for i in range(num_frames):
        for j in range(num_frames):
            dist = abs(i - j)
            if j == 0 and model_type == "wan":
                window = math.inf  # attention sink: the whole first frame
            elif _diagonal_split_keeps(dist, tokens_per_frame):
                window = radial_window_width(dist, tokens_per_frame, decay_factor=decay_factor,
                                             block_size=block_size, model_type=model_type)
            else:
                continue  # the split zeroes this tile; OR-ing zeros changes nothing
            row_offset = (i * tokens_per_frame) % block_size
            col_offset = (j * tokens_per_frame) % block_size
            key = (min(window, tokens_per_frame), row_offset, col_offset)
            if key not in tiles:
                tiles[key] = _shrink_band_tile(key[0], tokens_per_frame, block_size, row_offset, col_offset)
            tile = tiles[key]
            r0 = (i * tokens_per_frame) // block_size
            c0 = (j * tokens_per_frame) // block_size
            mask[r0:r0 + tile.shape[0], c0:c0 + tile.shape[1]] |= tile
    # Every query block keeps its own (diagonal) block; upstream can drop it (module docstring),
    # down to an empty mask and all-zero outputs for frames of at most a third of a block.
    np.fill_diagonal(mask, True)
    logger.info(
        "radial mask %s %dx%d (+%d text), block %d, decay %g: %dx%d blocks, density %.4f",
        model_type, num_frames, tokens_per_frame, text_tokens, block_size, decay_factor,
        n_blocks, n_blocks, mask.mean())
    mask.setflags(write=False)
    return mask


def radial_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    model_type: str = "cogvideox",
    text_tokens: int = 0,
) -> np.ndarray:
    """Radial block mask, bool [n_blocks, n_blocks], read-only; True = block pair attended.

    Token order is [video frames in order; text tokens]; n_blocks = ceil((num_frames *
    tokens_per_frame + text_tokens) / block_size). Cached per arguments; the density is logged
    once when built.
    """
    for name, value in (("num_frames", num_frames), ("tokens_per_frame", tokens_per_frame),
                        ("block_size", block_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"radial_block_mask: {name}={value!r}; expected an int >= 1")
    if not isinstance(text_tokens, (int, np.integer)) or text_tokens < 0:
        raise ValueError(f"radial_block_mask: text_tokens={text_tokens!r}; expected an int >= 0")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"radial_block_mask: model_type={model_type!r}; expected one of {MODEL_TYPES}")
    if not decay_factor > 0:
        raise ValueError(f"radial_block_mask: decay_factor={decay_factor!r}; expected > 0")
    return _radial_block_mask_cached(int(num_frames), int(tokens_per_frame), int(block_size),
                                     float(decay_factor), model_type, int(text_tokens))


def mask_density(block_mask: np.ndarray) -> float:
    """Fraction of True blocks (1 - sparsity)."""
    return float(np.mean(block_mask))


@functools.lru_cache(maxsize=64)
def radial_kv_tables(
    num_frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    model_type: str = "cogvideox",
    text_tokens: int = 0,
    scene_boundaries: tuple[int, ...] | None = None,
    scene_adjacency: tuple[tuple[bool, ...], ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Kernel index tables of the radial (AND scene) mask, shared over batch and heads.

    Returns read-only kv_indices int32 [1, 1, n_blocks, max_blocks] and kv_counts int32
    [1, 1, n_blocks] for the [video; text] token order of `radial_block_mask`.
    """
    mask = radial_block_mask(num_frames, tokens_per_frame, block_size=block_size, decay_factor=decay_factor,
                             model_type=model_type, text_tokens=text_tokens)
    if scene_boundaries is not None:
        mask = mask & scene_block_mask(num_frames, tokens_per_frame, scene_boundaries, scene_adjacency,
                                       block_size=block_size, text_tokens=text_tokens)
        np.fill_diagonal(mask, True)  # a query block always sees its own tokens
        logger.info("radial AND scene mask: density %.4f", mask.mean())
    indices, counts = block_mask_to_indices(np.asarray(mask))
    indices, counts = indices[None, None], counts[None, None]
    indices.setflags(write=False)
    counts.setflags(write=False)
    return indices, counts


def radial_attention(
    q,
    k,
    v,
    *,
    num_frames: int,
    tokens_per_frame: int,
    text_tokens: int = 0,
    text_first: bool = False,
    block_size: int = 128,
    decay_factor: float = 1.0,
    model_type: str = "cogvideox",
    scene_boundaries: tuple[int, ...] | None = None,
    scene_adjacency: tuple[tuple[bool, ...], ...] | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    precision: str = "bf16",
):
    """Self-attention under the static radial mask. q, k, v: [B, S, H, D] -> [B, S, H, D].

    `precision`: "bf16", or the 8-bit "fp8" / "int8-fp8" (pallas_kernels.quantized).

    S = num_frames * tokens_per_frame + text_tokens. With `text_first` (CogVideoX: text before
    video) the sequence is rotated to [video; text] and back, so upstream's mask applies as is
    (attention is permutation-equivariant). S is padded to the block size; padded keys are masked.
    """
    check_float_qkv("radial_attention", q, k, v)
    seq_len = num_frames * tokens_per_frame + text_tokens
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4 or x.shape[1] != seq_len:
            raise ValueError(
                f"radial_attention: {name}.shape={x.shape}; expected [B, {seq_len}, H, D] "
                f"({num_frames} frames x {tokens_per_frame} tokens + {text_tokens} text)")
    kv_indices, kv_counts = radial_kv_tables(
        num_frames, tokens_per_frame, block_size=block_size, decay_factor=decay_factor,
        model_type=model_type, text_tokens=text_tokens, scene_boundaries=scene_boundaries,
        scene_adjacency=scene_adjacency)
    padded = kv_counts.shape[-1] * block_size

    def to_kernel_order(x):
        if text_first and text_tokens:
            x = jnp.concatenate([x[:, text_tokens:], x[:, :text_tokens]], axis=1)
        return jnp.pad(x, ((0, 0), (0, padded - seq_len), (0, 0), (0, 0)))

    out = block_sparse_attention(
        to_kernel_order(q), to_kernel_order(k), to_kernel_order(v), jnp.asarray(kv_indices),
        jnp.asarray(kv_counts), block_q=block_size, block_kv=block_size, scale=scale,
        kv_len=seq_len if padded != seq_len else None, implementation=implementation, precision=precision)
    out = out[:, :seq_len]
    if text_first and text_tokens:
        out = jnp.concatenate([out[:, -text_tokens:], out[:, :-text_tokens]], axis=1)
    return out
