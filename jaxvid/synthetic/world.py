"""A synthetic video world: one or two flat shapes moving over a plain background, with a caption.

Everything here is numpy and pure: a `Scene` (what is in the video) is drawn from a seeded
`np.random.Generator`, `render(scene)` turns it into uint8 frames [F, H, W, 3] and `caption(scene)`
into the template sentence the model is trained on:

    "a red circle moving right on a black background"
    "a red circle moving right and a blue square standing still on a gray background"

Shapes: circle, square, triangle (isosceles, apex up; its bounding box is half filled). Colours:
red, green, blue, yellow, white. Backgrounds: black, white, gray; a shape never has its
background's colour. Motions: left, right, up, down ("up" = towards the top row) or still, at a
constant `SPEED` pixels per frame, so a moving shape travels (F - 1) * SPEED pixels.

`HELD_OUT` lists the one-shape (colour, shape, motion, background) combinations that training
never shows, neither alone nor as a part of a two-shape scene; each of their colours, shapes,
motions and backgrounds (and every pair of them) still occurs in training, so the model has to
compose them from parts it has seen.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import numpy as np

__all__ = [
    "COLOURS", "BACKGROUNDS", "SHAPES", "MOTIONS", "FRAMES", "SIZE", "SHAPE_SIZE", "SPEED", "HELD_OUT",
    "ShapeSpec", "Scene", "caption", "render", "render_batch", "sample_scene", "one_shape_combos",
    "is_held_out", "scene_from_combo", "iterate_scenes",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0), "white": (255, 255, 255),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "still")
# unit step (dx, dy) in image coordinates (y grows downwards)
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}

FRAMES = 9  # 1 + 4k frames, as the CogVideoX VAE needs
SIZE = 48  # frames are SIZE x SIZE pixels
SHAPE_SIZE = 18  # side of a shape's bounding box, pixels (~4.5 latent pixels at the VAE's 4x compression)
SPEED = 2.0  # pixels per frame
_MARGIN = 1  # pixels a shape keeps from the frame's edge

# (colour, shape, motion, background) never shown in training. Every colour, shape, motion and
# background occurs here, and with 15 of the 210 one-shape combinations removed every pair of them
# is still in the training set (checked in tests/test_synthetic_world.py).
HELD_OUT: tuple[tuple[str, str, str, str], ...] = (
    ("red", "circle", "right", "gray"), ("red", "triangle", "up", "white"), ("red", "square", "still", "black"),
    ("green", "square", "up", "black"), ("green", "circle", "left", "white"), ("green", "triangle", "down", "gray"),
    ("blue", "triangle", "left", "black"), ("blue", "square", "down", "white"), ("blue", "circle", "still", "gray"),
    ("yellow", "circle", "down", "black"), ("yellow", "square", "right", "gray"), ("yellow", "triangle", "still", "white"),
    ("white", "triangle", "right", "black"), ("white", "circle", "up", "gray"), ("white", "square", "left", "black"),
)


@dataclasses.dataclass(frozen=True, slots=True)
class ShapeSpec:
    """One shape: what it is and where its centre is at frame 0 (pixels, x right, y down)."""

    colour: str
    shape: str
    motion: str
    x: float
    y: float

    def __post_init__(self) -> None:
        for name, value, allowed in (("colour", self.colour, COLOURS), ("shape", self.shape, SHAPES),
                                     ("motion", self.motion, MOTIONS)):
            if value not in allowed:
                raise ValueError(f"ShapeSpec.{name}={value!r}; expected one of {sorted(allowed)}")

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = _DIRECTIONS[self.motion]
        return self.x + dx * SPEED * frame, self.y + dy * SPEED * frame


@dataclasses.dataclass(frozen=True, slots=True)
class Scene:
    """A background and one or two shapes of different colours (none of the background's colour)."""

    background: str
    shapes: tuple[ShapeSpec, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Scene.background={self.background!r}; expected one of {sorted(BACKGROUNDS)}")
        if not 1 <= len(self.shapes) <= 2:
            raise ValueError(f"Scene.shapes has {len(self.shapes)} shapes; expected 1 or 2")
        colours = [s.colour for s in self.shapes]
        if self.background in colours:
            raise ValueError(f"Scene: a {self.background} shape on a {self.background} background is invisible")
        if len(set(colours)) != len(colours):
            raise ValueError(f"Scene: two shapes of one colour {colours}; expected different colours")


def _phrase(s: ShapeSpec) -> str:
    motion = "standing still" if s.motion == "still" else f"moving {s.motion}"
    return f"a {s.colour} {s.shape} {motion}"


def caption(scene: Scene) -> str:
    """The template caption: 'a red circle moving right on a black background' (two shapes joined by 'and')."""
    return " and ".join(_phrase(s) for s in scene.shapes) + f" on a {scene.background} background"


def _shape_masks(shape_ids: np.ndarray, cx: np.ndarray, cy: np.ndarray, size: float, n: int) -> np.ndarray:
    """Boolean masks [B, F, n, n] of shapes (SHAPES index [B]) centred at (cx, cy) [B, F] (float32
    pixels), each with a size x size bounding box; pixel centres sit at half-integers."""
    grid = np.arange(n, dtype=np.float32) + np.float32(0.5)
    u = grid[None, None, None, :] - cx[..., None, None]  # x offset, [B, F, 1, n]
    v = grid[None, None, :, None] - cy[..., None, None]  # y offset (grows downwards), [B, F, n, 1]
    h = np.float32(size / 2.0)
    square = (np.abs(u) < h) & (np.abs(v) < h)
    circle = u * u + v * v < h * h
    # isosceles triangle: apex at (0, -h), base from (-h, h) to (h, h); its width at depth v is v + h
    triangle = (v < h) & (v > -h) & (np.abs(u) < (v + h) / np.float32(2.0))
    kind = shape_ids[:, None, None, None]
    return np.where(kind == 0, circle, np.where(kind == 1, square, triangle))


def render_batch(scenes: list[Scene], *, frames: int = FRAMES, size: int = SIZE,
                 shape_size: float = SHAPE_SIZE) -> np.ndarray:
    """uint8 frames [B, frames, size, size, 3] of several scenes: the background, then each scene's
    shapes in order, with hard edges (vectorised over the batch: one training batch takes milliseconds)."""
    if not scenes:
        raise ValueError("scenes: expected at least one Scene")
    b = len(scenes)
    video = np.empty((b, frames, size, size, 3), np.uint8)
    video[...] = np.asarray([BACKGROUNDS[s.background] for s in scenes], np.uint8)[:, None, None, None, :]
    steps = np.arange(frames, dtype=np.float32) * np.float32(SPEED)
    for slot in range(max(len(s.shapes) for s in scenes)):
        rows = [i for i, s in enumerate(scenes) if len(s.shapes) > slot]
        specs = [scenes[i].shapes[slot] for i in rows]
        d = np.asarray([_DIRECTIONS[s.motion] for s in specs], np.float32)
        cx = np.asarray([s.x for s in specs], np.float32)[:, None] + d[:, :1] * steps
        cy = np.asarray([s.y for s in specs], np.float32)[:, None] + d[:, 1:] * steps
        masks = _shape_masks(np.asarray([SHAPES.index(s.shape) for s in specs]), cx, cy, shape_size, size)
        colour = np.asarray([COLOURS[s.colour] for s in specs], np.uint8)[:, None, None, None, :]
        video[rows] = np.where(masks[..., None], colour, video[rows])
    return video


def render(scene: Scene, **kwargs) -> np.ndarray:
    """uint8 frames [F, H, W, 3] of one scene (see render_batch for the keyword arguments)."""
    return render_batch([scene], **kwargs)[0]


def one_shape_combos() -> list[tuple[str, str, str, str]]:
    """Every valid one-shape (colour, shape, motion, background), 210 of them."""
    return [c for c in itertools.product(COLOURS, SHAPES, MOTIONS, BACKGROUNDS) if c[0] != c[3]]


_HELD_OUT_SET = frozenset(HELD_OUT)


def is_held_out(scene: Scene) -> bool:
    """True if any shape of the scene, on the scene's background, is a held-out combination."""
    return any((s.colour, s.shape, s.motion, scene.background) in _HELD_OUT_SET for s in scene.shapes)


def _start_range(motion_step: int, size: int, shape_size: float, frames: int) -> tuple[float, float]:
    """[lo, hi] of a centre coordinate that keeps the shape inside the frame for the whole video."""
    h = shape_size / 2.0 + _MARGIN
    travel = SPEED * (frames - 1)
    lo, hi = h, size - h
    if motion_step > 0:
        hi -= travel
    elif motion_step < 0:
        lo += travel
    return lo, hi


def _place(rng: np.random.Generator, colour: str, shape: str, motion: str, *, size: int, shape_size: float,
           frames: int) -> ShapeSpec:
    dx, dy = _DIRECTIONS[motion]
    x = rng.uniform(*_start_range(dx, size, shape_size, frames))
    y = rng.uniform(*_start_range(dy, size, shape_size, frames))
    return ShapeSpec(colour, shape, motion, float(x), float(y))


def _apart(a: ShapeSpec, b: ShapeSpec, frames: int, shape_size: float) -> bool:
    """True if the two shapes' bounding boxes (plus a pixel) never touch during the video."""
    gap = shape_size + 2
    for f in range(frames):
        (ax, ay), (bx, by) = a.centre(f), b.centre(f)
        if abs(ax - bx) < gap and abs(ay - by) < gap:
            return False
    return True


def scene_from_combo(combo: tuple[str, str, str, str], rng: np.random.Generator, *, size: int = SIZE,
                     shape_size: float = SHAPE_SIZE, frames: int = FRAMES) -> Scene:
    """A one-shape scene of (colour, shape, motion, background) at a random position."""
    colour, shape, motion, background = combo
    return Scene(background, (_place(rng, colour, shape, motion, size=size, shape_size=shape_size, frames=frames),))


def sample_scene(rng: np.random.Generator, *, two_shape_prob: float = 0.2, allow_held_out: bool = False,
                 size: int = SIZE, shape_size: float = SHAPE_SIZE, frames: int = FRAMES) -> Scene:
    """A random scene (uniform over the allowed combinations); held-out ones are skipped unless allowed."""
    while True:
        background = str(rng.choice(list(BACKGROUNDS)))
        colours = [c for c in COLOURS if c != background]
        n = 2 if rng.random() < two_shape_prob else 1
        picked = rng.choice(len(colours), size=n, replace=False)
        shapes = []
        for i in picked:
            shapes.append(_place(rng, colours[int(i)], str(rng.choice(SHAPES)), str(rng.choice(MOTIONS)),
                                 size=size, shape_size=shape_size, frames=frames))
        if n == 2 and not _apart(shapes[0], shapes[1], frames, shape_size):
            continue
        scene = Scene(background, tuple(shapes))
        if allow_held_out or not is_held_out(scene):
            return scene


def iterate_scenes(seed: int, **kwargs) -> Iterator[Scene]:
    """An endless, seeded stream of training scenes (held-out combinations never appear)."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample_scene(rng, **kwargs)
