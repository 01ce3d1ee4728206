"""Real-size models with random weights, made on the device without a host copy (benchmarks, tests).

    random_model(model_cls, cfg, seed=0, std=0.02)    any NNX model: every Param ~ N(0, std^2)
    random_longcat(cfg, seed=0, std=0.02)             the LongCat DiT, norm scales around 1
    random_longcat_params(cfg, seed=0, std=0.02)      the same as (graphdef, state)
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvid.models.abstract import abstract_model

if TYPE_CHECKING:
    from jaxvid.models.longcat import LongCatConfig, LongCatVideoTransformer3D

__all__ = ["random_model", "random_longcat", "random_longcat_params"]


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "std", "mean"))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, std: float, mean: float = 0.0) -> jax.Array:
    """N(mean, std^2) drawn in float32 on the default device, cast to `dtype` (one compile per shape)."""
    return (jax.random.normal(key, shape, jnp.float32) * std + mean).astype(dtype)


def random_model(model_cls: Any, cfg: Any, *, seed: int = 0, std: float = 0.02) -> nnx.Module:
    """Build `model_cls(cfg)` abstractly and fill every Param with N(0, std^2) in its own dtype.

    Each parameter is drawn by one small jitted call straight into device memory, so building a
    13B model needs no host RAM beyond bookkeeping.
    """
    abstract = abstract_model(model_cls, cfg)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    key = jax.random.key(seed)
    filled = []
    for i, (path, var) in enumerate(flat):
        spec = var.get_value()
        value = _normal(jax.random.fold_in(key, i), tuple(spec.shape), jnp.dtype(spec.dtype), std)
        filled.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled), rest)


def random_longcat_params(cfg: LongCatConfig, seed: int = 0, *, std: float = 0.02) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, Param state) of a LongCat DiT with N(0, std^2) weights in cfg.param_dtype, norms around 1.

    Built abstractly (no PyTorch checkpoint, no float32 copy of the model): each leaf is drawn on the
    default device by one jitted function per leaf shape (XLA's RngBitGenerator keys: cheap to
    compile), so the 13.6B model in bf16 needs ~27 GB there and nothing else.
    """
    from jaxvid.models.longcat import LongCatVideoTransformer3D

    abstract = abstract_model(LongCatVideoTransformer3D, cfg)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    keys = jax.random.split(jax.random.key(seed, impl="rbg"), len(flat))
    filled = []
    for (path, var), key in zip(flat, keys):
        spec = var.get_value()
        is_norm = str(path[-1]) == "weight" and "norm" in ".".join(str(p) for p in path)
        value = _normal(key, tuple(spec.shape), jnp.dtype(spec.dtype), std, 1.0 if is_norm else 0.0)
        filled.append((path, var.replace(value)))
    return graphdef, nnx.from_flat_state(filled)


def random_longcat(cfg: LongCatConfig, seed: int = 0, *, std: float = 0.02) -> LongCatVideoTransformer3D:
    """`random_longcat_params` merged into a model."""
    return nnx.merge(*random_longcat_params(cfg, seed, std=std))
