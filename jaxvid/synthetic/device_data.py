"""Training batches of the synthetic world sampled and drawn on the accelerator, inside jit.

Rendering in numpy (jaxvid.synthetic.world) costs ~2 ms per video on one CPU core, which capped
the first GPU run at ~10 batches of 64 per second. Here a batch is a pure function of a
`jax.random` key: scenes are drawn from tables of the training combinations (held-out ones are
never in them), drawn with the same float32 arithmetic as `world.render_batch` (the tests compare
the two on the same scenes), and captions are looked up in a table of every caption of the
template, tokenized once on the host by the real tokenizer. A training step then needs no host
data at all, so many steps can run inside one `lax.scan`.

A batch (`sample_batch`): pixels float32 [B, 3, F, H, W] in [-1, 1], token ids int32 [B, L] and the
shapes' masks bool [B, F, H, W] (grown by a pixel, so edges count as shape).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxvid.synthetic import world

__all__ = ["CaptionTable", "render", "scene_arrays", "sample_batch", "sample_indexed_batch", "caption_index",
           "EMPTY_CAPTION"]

_COLOURS = list(world.COLOURS)
_BACKGROUNDS = list(world.BACKGROUNDS)
_NC, _NS, _NM, _NB = len(world.COLOURS), len(world.SHAPES), len(world.MOTIONS), len(world.BACKGROUNDS)
_NP = _NC * _NS * _NM  # phrases "a <colour> <shape> <motion>"
_NUM_CAPTIONS = _NP * _NB + _NP * _NP * _NB + 1  # one shape, two shapes, the empty caption (last)
EMPTY_CAPTION = _NUM_CAPTIONS - 1  # CaptionTable row of "" (what caption dropout substitutes)
_COLOUR_RGB = np.asarray([world.COLOURS[c] for c in _COLOURS], np.float32)
_BG_RGB = np.asarray([world.BACKGROUNDS[b] for b in _BACKGROUNDS], np.float32)
_DIRS = np.asarray([world._DIRECTIONS[m] for m in world.MOTIONS], np.float32)


def caption_index(phrases: list[tuple[int, int, int]], background: int) -> int:
    """Row of CaptionTable.ids of a caption: phrases [(colour, shape, motion) indices], 1 or 2 of them."""
    p = [(c * _NS + s) * _NM + m for c, s, m in phrases]
    if len(p) == 1:
        return p[0] * _NB + background
    return _NP * _NB + (p[0] * _NP + p[1]) * _NB + background


def _caption_text(index: int) -> str:
    if index == _NUM_CAPTIONS - 1:
        return ""
    one = index < _NP * _NB
    rest = index if one else index - _NP * _NB
    background = rest % _NB
    rest //= _NB
    phrases = [rest] if one else [rest // _NP, rest % _NP]
    specs = []
    for p in phrases:
        c, s, m = p // (_NS * _NM), (p // _NM) % _NS, p % _NM
        specs.append(world.ShapeSpec(_COLOURS[c], world.SHAPES[s], world.MOTIONS[m], 0.0, 0.0))
    # world.caption without Scene's validity checks (the table also holds combinations never drawn)
    return " and ".join(world._phrase(s) for s in specs) + f" on a {_BACKGROUNDS[background]} background"


@dataclasses.dataclass(frozen=True)
class CaptionTable:
    """Token ids int32 [N, L] of every caption of the template (row: caption_index; last row: "")."""

    ids: np.ndarray

    @classmethod
    def build(cls, tokenize: Callable[[list[str]], object]) -> CaptionTable:
        texts = [_caption_text(i) for i in range(_NUM_CAPTIONS)]
        return cls(np.asarray(tokenize(texts).input_ids, np.int32))

    @staticmethod
    def text(index: int) -> str:
        return _caption_text(index)


def _training_tables() -> tuple[np.ndarray, np.ndarray]:
    """(one-shape training combos int32 [K, 4] = colour, shape, motion, background indices;
    per background the (colour, shape, motion) of its training combos int32 [NB, M, 3], each list
    cycled to the longest one's length M)."""
    held = set(world.HELD_OUT)
    combos = [(_COLOURS.index(c), world.SHAPES.index(s), world.MOTIONS.index(m), _BACKGROUNDS.index(b))
              for c, s, m, b in world.one_shape_combos() if (c, s, m, b) not in held]
    by_bg = [[c[:3] for c in combos if c[3] == b] for b in range(_NB)]
    longest = max(len(x) for x in by_bg)
    by_bg = [[x[i % len(x)] for i in range(longest)] for x in by_bg]
    return np.asarray(combos, np.int32), np.asarray(by_bg, np.int32)


_TRAIN, _TRAIN_BY_BG = _training_tables()


def render(bg: jax.Array, kinds: jax.Array, colours: jax.Array, x0: jax.Array, y0: jax.Array, dirs: jax.Array,
           present: jax.Array, *, frames: int = world.FRAMES, size: int = world.SIZE,
           shape_size: float = world.SHAPE_SIZE) -> jax.Array:
    """Float32 frames [B, F, H, W, 3] holding 0..255 integers, as world.render_batch draws them.

    bg float32 [B, 3] (RGB); per shape slot S (drawn in order): kinds int [B, S] (SHAPES index),
    colours float32 [B, S, 3], start centres x0, y0 float32 [B, S] (pixels), dirs float32 [B, S, 2]
    (unit steps), present bool [B, S].
    """
    steps = jnp.arange(frames, dtype=jnp.float32) * jnp.float32(world.SPEED)
    grid = jnp.arange(size, dtype=jnp.float32) + jnp.float32(0.5)
    h = jnp.float32(shape_size / 2.0)
    video = jnp.broadcast_to(bg[:, None, None, None, :], (bg.shape[0], frames, size, size, 3))
    for slot in range(kinds.shape[1]):
        cx = x0[:, slot, None] + dirs[:, slot, 0, None] * steps  # [B, F]
        cy = y0[:, slot, None] + dirs[:, slot, 1, None] * steps
        u = grid[None, None, None, :] - cx[..., None, None]
        v = grid[None, None, :, None] - cy[..., None, None]
        square = (jnp.abs(u) < h) & (jnp.abs(v) < h)
        circle = u * u + v * v < h * h
        triangle = (v < h) & (v > -h) & (jnp.abs(u) < (v + h) / jnp.float32(2.0))
        kind = kinds[:, slot, None, None, None]
        mask = jnp.where(kind == 0, circle, jnp.where(kind == 1, square, triangle)) & present[:, slot, None, None, None]
        video = jnp.where(mask[..., None], colours[:, slot, None, None, None, :], video)
    return video


def scene_arrays(scenes: list[world.Scene]) -> dict[str, np.ndarray]:
    """The keyword arguments of `render` for world Scenes (two shape slots)."""
    b = len(scenes)
    out = {"bg": np.asarray([world.BACKGROUNDS[s.background] for s in scenes], np.float32),
           "kinds": np.zeros((b, 2), np.int32), "colours": np.zeros((b, 2, 3), np.float32),
           "x0": np.zeros((b, 2), np.float32), "y0": np.zeros((b, 2), np.float32),
           "dirs": np.zeros((b, 2, 2), np.float32), "present": np.zeros((b, 2), bool)}
    for i, scene in enumerate(scenes):
        for j, s in enumerate(scene.shapes):
            out["kinds"][i, j] = world.SHAPES.index(s.shape)
            out["colours"][i, j] = world.COLOURS[s.colour]
            out["x0"][i, j], out["y0"][i, j] = s.x, s.y
            out["dirs"][i, j] = world._DIRECTIONS[s.motion]
            out["present"][i, j] = True
    return out


def _start(key: jax.Array, step: jax.Array, *, frames: int, size: int, shape_size: float) -> jax.Array:
    """A uniform start coordinate that keeps the shape inside the frame (world._start_range)."""
    h = shape_size / 2.0 + world._MARGIN
    travel = world.SPEED * (frames - 1)
    lo = jnp.where(step < 0, h + travel, h)
    hi = jnp.where(step > 0, size - h - travel, size - h)
    return jax.random.uniform(key, step.shape, jnp.float32, lo, hi)


def sample_batch(key: jax.Array, batch: int, caption_ids: jax.Array, *, dropout: float = 0.0,
                 two_shape_prob: float = 0.2, frames: int = world.FRAMES, size: int = world.SIZE,
                 shape_size: float = world.SHAPE_SIZE) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One training batch (pixels [B, 3, F, H, W], ids [B, L], masks [B, F, H, W]); see the module doc
    and `sample_indexed_batch` (the same batch with caption rows instead of token ids)."""
    pixels, index, mask = sample_indexed_batch(key, batch, dropout=dropout, two_shape_prob=two_shape_prob,
                                               frames=frames, size=size, shape_size=shape_size)
    return pixels, caption_ids[index], mask


def sample_indexed_batch(key: jax.Array, batch: int, *, dropout: float = 0.0, two_shape_prob: float = 0.2,
                         frames: int = world.FRAMES, size: int = world.SIZE, shape_size: float = world.SHAPE_SIZE
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One training batch (pixels [B, 3, F, H, W], caption rows int32 [B] of CaptionTable.ids,
    masks [B, F, H, W]).

    The first shape is uniform over the one-shape training combinations; with probability
    `two_shape_prob` a second one of the same background is drawn, kept only if its colour differs
    and the two never come within a pixel of touching (world's rule), so slightly fewer than that
    fraction of the videos hold two shapes; with probability `dropout` the caption row is EMPTY_CAPTION.
    """
    ks = jax.random.split(key, 8)
    train, by_bg = jnp.asarray(_TRAIN), jnp.asarray(_TRAIN_BY_BG)
    first = train[jax.random.randint(ks[0], (batch,), 0, train.shape[0])]  # [B, 4]
    background = first[:, 3]
    second = by_bg[background, jax.random.randint(ks[1], (batch,), 0, by_bg.shape[1])]  # [B, 3]
    c, s, m = (jnp.stack([first[:, k], second[:, k]], axis=1) for k in range(3))  # [B, 2]
    dirs = jnp.asarray(_DIRS)[m]  # [B, 2, 2]
    kw = {"frames": frames, "size": size, "shape_size": shape_size}
    x0 = _start(ks[2], dirs[..., 0], **kw)
    y0 = _start(ks[3], dirs[..., 1], **kw)
    t = jnp.arange(frames, dtype=jnp.float32) * jnp.float32(world.SPEED)
    gap = shape_size + 2
    near = ((jnp.abs((x0[:, 0, None] + dirs[:, 0, 0, None] * t) - (x0[:, 1, None] + dirs[:, 1, 0, None] * t)) < gap)
            & (jnp.abs((y0[:, 0, None] + dirs[:, 0, 1, None] * t) - (y0[:, 1, None] + dirs[:, 1, 1, None] * t)) < gap))
    two = (jax.random.uniform(ks[4], (batch,)) < two_shape_prob) & (c[:, 1] != c[:, 0]) & ~near.any(axis=1)
    present = jnp.stack([jnp.ones((batch,), bool), two], axis=1)
    bg = jnp.asarray(_BG_RGB)[background]
    video = render(bg, s, jnp.asarray(_COLOUR_RGB)[c], x0, y0, dirs, present, **kw)  # [B, F, H, W, 3]
    p = (c * _NS + s) * _NM + m  # phrase index [B, 2]
    index = jnp.where(two, _NP * _NB + (p[:, 0] * _NP + p[:, 1]) * _NB + background, p[:, 0] * _NB + background)
    index = jnp.where(jax.random.uniform(ks[5], (batch,)) < dropout, _NUM_CAPTIONS - 1, index)
    mask = jnp.any(video != bg[:, None, None, None, :], axis=-1)
    mask = jax.lax.reduce_window(mask, False, jax.lax.bitwise_or, (1, 1, 3, 3), (1, 1, 1, 1), "SAME")
    pixels = video / jnp.float32(127.5) - jnp.float32(1.0)
    return pixels.transpose(0, 4, 1, 2, 3), index.astype(jnp.int32), mask
