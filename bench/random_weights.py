"""Real-size models with random weights, made on the device without a host copy (benchmarks only)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def random_model(model_cls: Any, cfg: Any, *, seed: int = 0, std: float = 0.02) -> nnx.Module:
    """Build `model_cls(cfg)` abstractly and fill every Param with N(0, std^2) in its own dtype.

    Each parameter is drawn by one small jitted call straight into device memory, so building a
    13B model needs no host RAM beyond bookkeeping.
    """
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    key = jax.random.key(seed)
    filled = []
    for i, (path, var) in enumerate(flat):
        spec = var.get_value()
        value = _normal(jax.random.fold_in(key, i), spec.shape, spec.dtype, std)
        filled.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled), rest)


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, std: float) -> jax.Array:
    return _normal_jit(key, tuple(shape), jnp.dtype(dtype), std)


def _normal_impl(key, shape, dtype, std):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


_normal_jit = jax.jit(_normal_impl, static_argnums=(1, 2, 3))
