"""Read colour, shape and motion back from uint8 frames of the synthetic world (no learning involved).

- Colour: every pixel is labelled with the nearest palette colour (backgrounds and shape colours)
  if it is within `MAX_COLOUR_DISTANCE` of it; the background is the commonest label on the
  frame border, shapes are the other labels that cover enough pixels.
- Shape: the fill ratio of a shape's mask in its bounding box, median over frames: a circle fills
  pi / 4 ~ 0.785, a square 1, the world's triangle 1 / 2. Stray pixels apart from the shape
  do not stretch the box (it spans the longest run of occupied rows and columns).
- Motion: a straight line fitted to the per-frame mask centroids; a total displacement below a
  quarter of the world's travel is "still", otherwise the dominant axis and its sign (image y
  grows downwards, so "up" is negative y).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxvid.synthetic.world import BACKGROUNDS, COLOURS, FRAMES, SPEED

__all__ = ["Detection", "label_pixels", "detect", "detect_one", "matches", "PALETTE"]

# label index -> name; white is both a background and a shape colour (one label)
PALETTE: tuple[str, ...] = tuple(dict.fromkeys([*BACKGROUNDS, *COLOURS]))
_RGB = np.asarray([BACKGROUNDS.get(n, COLOURS.get(n)) for n in PALETTE], np.float32)
MAX_COLOUR_DISTANCE = 90.0
_MIN_PIXELS = 12  # a shape covers ~162 (triangle) to ~324 (square) pixels in a 48 x 48 frame
_SQUARE_FILL = 0.89  # about midway between a circle (0.785) and a square (1)
_TRIANGLE_FILL = 0.65  # about midway between a triangle (0.5) and a circle


@dataclasses.dataclass(frozen=True, slots=True)
class Detection:
    """What the detector saw of one shape; fill and displacement (dx, dy in pixels) explain the verdict."""

    colour: str
    shape: str
    motion: str
    fill: float
    displacement: tuple[float, float]
    pixels: float  # mean mask pixels per frame where it was seen


def label_pixels(frames: np.ndarray) -> np.ndarray:
    """uint8 [F, H, W, 3] -> int [F, H, W]: index into PALETTE, or -1 where no palette colour is near."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    d = np.linalg.norm(frames.astype(np.float32)[..., None, :] - _RGB, axis=-1)  # [F, H, W, P]
    labels = np.argmin(d, axis=-1)
    return np.where(np.min(d, axis=-1) <= MAX_COLOUR_DISTANCE, labels, -1)


def _background(labels: np.ndarray) -> str | None:
    border = np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    border = border[border >= 0]
    if border.size == 0:
        return None
    return PALETTE[int(np.bincount(border).argmax())]


def _longest_run(present: np.ndarray) -> tuple[int, int] | None:
    """[start, stop) of the longest run of True in a 1-D boolean array (None if there is none)."""
    best, start = None, None
    for i, p in enumerate(np.append(present, False)):
        if p and start is None:
            start = i
        elif not p and start is not None:
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def _box_fill(mask: np.ndarray) -> float | None:
    """Mask pixels / bounding-box area; the box spans the longest runs of rows and columns holding
    mask pixels, so stray pixels away from the shape do not stretch it."""
    rows = _longest_run(mask.any(axis=1))
    cols = _longest_run(mask.any(axis=0))
    if rows is None or cols is None:
        return None
    box = mask[rows[0]:rows[1], cols[0]:cols[1]]
    return float(box.sum()) / box.size


def _motion(centroids: np.ndarray, frames: np.ndarray, num_frames: int) -> tuple[str, tuple[float, float]]:
    if len(frames) < 2:
        return "still", (0.0, 0.0)
    span = float(num_frames - 1)
    dx = float(np.polyfit(frames, centroids[:, 0], 1)[0]) * span
    dy = float(np.polyfit(frames, centroids[:, 1], 1)[0]) * span
    travel = SPEED * span * num_frames / FRAMES  # the world's travel, scaled to this frame count
    if max(abs(dx), abs(dy)) < 0.25 * travel:
        return "still", (dx, dy)
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), (dx, dy)
    return ("down" if dy > 0 else "up"), (dx, dy)


def _track(mask: np.ndarray, colour: str) -> Detection | None:
    """One colour's mask [F, H, W] -> its Detection, or None if it is too small in every frame."""
    ys, xs = np.mgrid[0:mask.shape[1], 0:mask.shape[2]]
    fills, centroids, seen, counts = [], [], [], []
    for f, m in enumerate(mask):
        n = int(m.sum())
        if n < _MIN_PIXELS:
            continue
        fill = _box_fill(m)
        if fill is None:
            continue
        fills.append(fill)
        centroids.append((float(xs[m].mean()) + 0.5, float(ys[m].mean()) + 0.5))
        seen.append(f)
        counts.append(n)
    if not seen:
        return None
    fill = float(np.median(fills))
    shape = "square" if fill >= _SQUARE_FILL else "circle" if fill >= _TRIANGLE_FILL else "triangle"
    motion, disp = _motion(np.asarray(centroids), np.asarray(seen, np.float64), mask.shape[0])
    return Detection(colour, shape, motion, fill, disp, float(np.mean(counts)))


def detect(frames: np.ndarray) -> tuple[str | None, list[Detection]]:
    """(background name, shapes sorted by size, largest first) of uint8 frames [F, H, W, 3]."""
    labels = label_pixels(frames)
    background = _background(labels)
    found = []
    for i, name in enumerate(PALETTE):
        if name == background or name not in COLOURS:
            continue
        d = _track(labels == i, name)
        if d is not None:
            found.append(d)
    found.sort(key=lambda d: -d.pixels)
    return background, found


def detect_one(frames: np.ndarray) -> Detection | None:
    """The largest shape in the frames, or None if there is none."""
    return (detect(frames)[1] or [None])[0]


def matches(frames: np.ndarray, colour: str, shape: str, motion: str) -> bool:
    """True if the largest shape in the frames has this colour, shape and motion."""
    d = detect_one(frames)
    return d is not None and (d.colour, d.shape, d.motion) == (colour, shape, motion)
