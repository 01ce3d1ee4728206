"""Abstract models: a module's parameter tree (shapes and dtypes, no values) built without tracing.

Loading fills an abstract model (jaxvid.models.loading). `nnx.eval_shape` would build one by
tracing the whole constructor, random initializers included: about a second per model on a CPU
whatever its size (it is bound by the number of layers written down, not by their width). Here the
constructor runs as plain Python inside `shapes_only()`, where every parameter-creating call of our
models (the initializers below, `zeros`, `ones`, `stack`) returns a `jax.ShapeDtypeStruct` instead
of an array; nothing is computed and no key is drawn.

A model class supports this when every Param its constructor creates comes from these helpers
(flax layers get `initializer`-wrapped inits: layers.linear, layers.embed, layers.layer_norm).
`abstract_model` checks the result and falls back to `nnx.eval_shape` for a constructor that does
not, so loading stays correct, only slower (a warning says which class).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["NotAbstractError", "abstract_model", "build_abstract", "initializer", "ones", "shapes_only", "stack", "zeros"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=nnx.Module)
Initializer = Callable[..., Any]

# a context variable, not a module flag: a build in one thread never changes what another computes
_SHAPES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxvid_shapes_only", default=False)


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Within this block the helpers below return `jax.ShapeDtypeStruct`s instead of arrays."""
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _spec(shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
    # canonical as the array would be (float64 -> float32 unless x64 is on), as eval_shape gives it
    return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jax.dtypes.canonicalize_dtype(dtype))


class _ShapeAwareInit:
    """`init(key, shape, dtype)`, or only its ShapeDtypeStruct inside `shapes_only()`."""

    __slots__ = ("init",)

    def __init__(self, init: Initializer):
        self.init = init

    def __call__(self, key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> Any:
        if _SHAPES_ONLY.get():
            return _spec(shape, dtype)
        return self.init(key, shape, dtype)

    def __repr__(self) -> str:
        return f"initializer({self.init!r})"


def initializer(init: Initializer) -> Initializer:
    """Wrap a flax-style initializer `init(key, shape, dtype)`: the same values outside
    `shapes_only()`, just the shape and dtype inside it (the key is then never used)."""
    return _ShapeAwareInit(init)


def zeros(shape: Sequence[int], dtype: Any) -> Any:
    """`jnp.zeros(shape, dtype)`, or its ShapeDtypeStruct inside `shapes_only()`."""
    return _spec(shape, dtype) if _SHAPES_ONLY.get() else jnp.zeros(shape, dtype)


def ones(shape: Sequence[int], dtype: Any) -> Any:
    """`jnp.ones(shape, dtype)`, or its ShapeDtypeStruct inside `shapes_only()`."""
    return _spec(shape, dtype) if _SHAPES_ONLY.get() else jnp.ones(shape, dtype)


def stack(make: Callable[[nnx.Rngs], M], n: int, rngs: nnx.Rngs) -> M:
    """`n` layers `make(rngs)` stacked along a new leading axis of every Variable (what the models
    scan over): `nnx.split_rngs` + `nnx.vmap`, each layer with its own keys. Inside `shapes_only()`
    one layer is built and `n` put in front of each shape, which is what vmap's output holds."""
    if not _SHAPES_ONLY.get():
        return nnx.split_rngs(splits=n)(nnx.vmap(make, in_axes=(0,), out_axes=0, axis_size=n))(rngs)
    graphdef, state = nnx.split(make(rngs))
    return nnx.merge(graphdef, jax.tree.map(lambda s: _spec((n, *s.shape), s.dtype), state))


class _NoKeys:
    """Stands in for `nnx.Rngs` inside `shapes_only()`: no initializer uses a key there, so none is
    drawn (a constructor that still uses one fails, and `abstract_model` falls back)."""

    def params(self) -> None:
        return None

    def default(self) -> None:
        return None

    def __call__(self) -> None:
        return None


class NotAbstractError(RuntimeError):
    """A constructor created a concrete array inside `shapes_only()` (it bypassed the helpers)."""


def build_abstract(model_cls: Callable[..., M], cfg: Any) -> M:
    """`model_cls(cfg, rngs=...)` built inside `shapes_only()`: every Variable holds a
    ShapeDtypeStruct, with the graph definition and shapes/dtypes `nnx.eval_shape` gives.
    Raises whatever the constructor raises, or NotAbstractError if it made a concrete array."""
    with shapes_only():
        model = model_cls(cfg, rngs=_NoKeys())
    leaves = [(jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(model)]
    if len(leaves) == 1 and leaves[0][1] is model:  # not a pytree in this flax: walk its graph (slower)
        leaves = [(".".join(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))]
    concrete = [name for name, value in leaves if not isinstance(value, jax.ShapeDtypeStruct)]
    if concrete:
        raise NotAbstractError(f"{getattr(model_cls, '__name__', model_cls)}: {len(concrete)} Variables were "
                               f"computed, not declared (first: {concrete[:3]}); create them with "
                               "jaxvid.models.abstract's helpers")
    return model


def abstract_model(model_cls: Callable[..., M], cfg: Any) -> M:
    """The abstract `model_cls(cfg)` (Variables hold ShapeDtypeStructs): `build_abstract`, or
    `nnx.eval_shape` over the constructor (same result, a second or so slower) when that fails;
    a config the constructor rejects raises from there, as it would without this module."""
    try:
        return build_abstract(model_cls, cfg)
    except NotAbstractError as e:
        log.warning("%s; building it with nnx.eval_shape instead", e)
    except Exception as e:  # noqa: BLE001 - eval_shape below raises the genuine error, if any
        log.debug("%s: no shapes-only build (%s: %s); using nnx.eval_shape",
                  getattr(model_cls, "__name__", model_cls), type(e).__name__, e)
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
