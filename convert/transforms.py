"""Named weight transforms from PyTorch layouts to jaxvid (Flax NNX) layouts.

Each transform carries its array function and the matching shape function, so a key table can be
checked against an abstract model before a single tensor is read.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Transform:
    """A named array rewrite plus the shape rule it implies."""

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    shape_fn: Callable[[Shape], Shape]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)


_TILE = 512  # transpose tile: two 512x512 tiles of 2-byte values fit in L2


def _as_uint(x: np.ndarray) -> np.ndarray:
    # ml_dtypes (bfloat16) arrays copy element by element through a slow generic path; moving the
    # same bytes as unsigned ints is several times faster and exact.
    return x.view(f"u{x.dtype.itemsize}") if x.dtype.itemsize in (1, 2, 4, 8) else x


def transpose(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """np.transpose(x, axes) as a contiguous copy; 2-D matrices go tile by tile (cache-friendly)."""
    u = _as_uint(x)
    if u.ndim != 2 or tuple(axes) != (1, 0):
        return np.ascontiguousarray(np.transpose(u, axes)).view(x.dtype)
    rows, cols = u.shape
    out = np.empty((cols, rows), dtype=u.dtype)
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            out[j : j + _TILE, i : i + _TILE] = u[i : i + _TILE, j : j + _TILE].T
    return out.view(x.dtype)


def _perm(*axes: int) -> Transform:
    def shape_fn(s: Shape) -> Shape:
        if len(s) != len(axes):
            raise ValueError(f"expected a rank-{len(axes)} tensor, got shape {s}")
        return tuple(s[a] for a in axes)

    return Transform(f"transpose{axes}", lambda x: transpose(x, axes), shape_fn)


identity = Transform("identity", lambda x: x, lambda s: s)
# torch Linear weight [out, in] -> nnx.Linear kernel [in, out]
linear_T = Transform("linear_T", _perm(1, 0).fn, _perm(1, 0).shape_fn)
# torch Conv1d [O, I, K] -> [K, I, O]
conv1d_to_kio = Transform("conv1d_to_kio", _perm(2, 1, 0).fn, _perm(2, 1, 0).shape_fn)
# torch Conv2d [O, I, H, W] -> [H, W, I, O]
conv2d_to_hwio = Transform("conv2d_to_hwio", _perm(2, 3, 1, 0).fn, _perm(2, 3, 1, 0).shape_fn)
# torch Conv3d [O, I, D, H, W] -> [D, H, W, I, O]
conv3d_to_dhwio = Transform("conv3d_to_dhwio", _perm(2, 3, 4, 1, 0).fn, _perm(2, 3, 4, 1, 0).shape_fn)


def reshape(shape: Shape, name: str | None = None) -> Transform:
    """Reshape to a fixed shape (e.g. squeeze a leading 1, or [C] -> [C, 1, 1, 1])."""

    def shape_fn(s: Shape) -> Shape:
        if int(np.prod(s)) != int(np.prod(shape)):
            raise ValueError(f"cannot reshape {s} to {shape}")
        return tuple(shape)

    return Transform(name or f"reshape{tuple(shape)}", lambda x: x.reshape(shape), shape_fn)


def chain(*ts: Transform) -> Transform:
    """Apply transforms left to right."""

    def fn(x: np.ndarray) -> np.ndarray:
        for t in ts:
            x = t.fn(x)
        return x

    def shape_fn(s: Shape) -> Shape:
        for t in ts:
            s = t.shape_fn(s)
        return s

    return Transform("+".join(t.name for t in ts), fn, shape_fn)
