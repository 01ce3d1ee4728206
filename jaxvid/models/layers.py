"""Shared NNX building blocks: activations, timestep embedding, modulated norms, MLPs, 3D RoPE, sincos tables.

Positional tables (`rope_3d`, `sincos_3d`) are plain numpy: they depend only on static shapes and
config, so models build them at trace time and they enter the graph as constants.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvid.models import abstract

__all__ = [
    "ACTIVATIONS",
    "AdaLayerNorm",
    "FeedForward",
    "TimestepEmbedding",
    "apply_rotary",
    "embed",
    "layer_norm",
    "linear",
    "rope_1d",
    "rope_3d",
    "sincos_1d",
    "sincos_3d",
    "timestep_embedding",
]

def _mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


# Named module-level functions, not lambdas: modules keep them as static attributes, and the
# executable cache (jaxvid.pipelines.executable_cache) describes a function by its importable name.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "mish": _mish,
    "gelu": _gelu,
    "gelu-approximate": _gelu_tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------------------------
# Timestep embedding
# --------------------------------------------------------------------------------------------


def timestep_embedding(
    t: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / diffusers.

    t: [B] -> [B, dim] float32. Frequencies exp(-log(max_period) * k / (dim/2 - freq_shift));
    halves are [sin, cos] (or [cos, sin] with `flip_sin_to_cos`); odd dims get one zero column.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = scale * (t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :])
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_1 -> activation -> linear_2: [B, in_dim] -> [B, out_dim] (diffusers TimestepEmbedding)."""

    def __init__(
        self, in_dim: int, out_dim: int, *, act: str = "silu", dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        self.act = activation(act)
        self.linear_1 = linear(in_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = linear(out_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


# --------------------------------------------------------------------------------------------
# Norms and MLPs
# --------------------------------------------------------------------------------------------


def _flax_default(cls: type, name: str) -> Callable[..., jax.Array]:
    """The initializer `cls.__init__` uses for `name` when given none (the same values as before)."""
    return abstract.initializer(inspect.signature(cls.__init__).parameters[name].default)


# flax's own default initializers, also declaring shapes only inside abstract.shapes_only()
_LINEAR_KERNEL_INIT = _flax_default(nnx.Linear, "kernel_init")
_LINEAR_BIAS_INIT = _flax_default(nnx.Linear, "bias_init")
_EMBED_INIT = _flax_default(nnx.Embed, "embedding_init")
_NORM_SCALE_INIT = _flax_default(nnx.LayerNorm, "scale_init")
_NORM_BIAS_INIT = _flax_default(nnx.LayerNorm, "bias_init")


def linear(
    in_features: int, out_features: int, *, use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """`nnx.Linear` (kernel [in, out], bias [out]) with flax's initializers, buildable abstractly."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=_LINEAR_KERNEL_INIT, bias_init=_LINEAR_BIAS_INIT, rngs=rngs)


def embed(num_embeddings: int, features: int, *, dtype: Any = None, param_dtype: Any = jnp.float32,
          rngs: nnx.Rngs) -> nnx.Embed:
    """`nnx.Embed` (table [num_embeddings, features]) with flax's initializer, buildable abstractly."""
    return nnx.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype, embedding_init=_EMBED_INIT,
                     rngs=rngs)


def layer_norm(
    dim: int, *, eps: float, affine: bool = True, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.LayerNorm:
    """torch.nn.LayerNorm(dim, eps, elementwise_affine=affine) as NNX (params `scale`, `bias`)."""
    return nnx.LayerNorm(
        dim, epsilon=eps, use_scale=affine, use_bias=affine, dtype=dtype, param_dtype=param_dtype,
        scale_init=_NORM_SCALE_INIT, bias_init=_NORM_BIAS_INIT, rngs=rngs,
    )


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x * (1 + scale) + shift with shift/scale [B, D] broadcast over the tokens of x [B, S, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AdaLayerNorm(nnx.Module):
    """LayerNorm whose shift and scale come from a conditioning vector (diffusers AdaLayerNorm, chunk_dim=1).

    linear(silu(cond)) -> [shift, scale] (that order); x: [B, S, D], cond: [B, C] -> [B, S, D].
    """

    def __init__(
        self, cond_dim: int, dim: int, *, eps: float, affine: bool = True, dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        self.linear = linear(cond_dim, 2 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = layer_norm(dim, eps=eps, affine=affine, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.linear(jax.nn.silu(cond)), 2, axis=-1)
        return modulate(self.norm(x), shift, scale)


class FeedForward(nnx.Module):
    """linear_in -> activation -> linear_out (diffusers FeedForward with a GELU-style activation).

    diffusers names these `net.0.proj` and `net.2` (`net.1` is dropout); the key table maps them.
    """

    def __init__(
        self, dim: int, inner_dim: int, *, act: str = "gelu-approximate", bias: bool = True,
        dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        self.act = activation(act)
        self.linear_in = linear(dim, inner_dim, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_out = linear(inner_dim, dim, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_out(self.act(self.linear_in(x)))


# --------------------------------------------------------------------------------------------
# Rotary embedding (pairs interleaved, as CogVideoX / Flux use it)
# --------------------------------------------------------------------------------------------


def rope_1d(dim: int, pos: np.ndarray, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [len(pos), dim] float32, each frequency repeated twice (interleaved pairs)."""
    if dim % 2:
        raise ValueError(f"rope_1d: dim={dim} must be even")
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    angles = np.outer(pos.astype(np.float32), freqs.astype(np.float32))
    return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)


def rope_3d(
    head_dim: int, grid_t: np.ndarray, grid_h: np.ndarray, grid_w: np.ndarray, theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    """3D RoPE table over a (T, H, W) grid of positions, tokens in (t, h, w) raster order.

    head_dim splits into t: head_dim // 4, h and w: head_dim // 8 * 3 each. Returns cos, sin
    [T*H*W, head_dim] float32.
    """
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    if dim_t + 2 * dim_hw != head_dim or dim_t % 2 or dim_hw % 2:
        raise ValueError(f"rope_3d: head_dim={head_dim} does not split into even t/h/w parts; expected a multiple of 16")
    nt, nh, nw = len(grid_t), len(grid_h), len(grid_w)
    parts = [rope_1d(dim_t, grid_t, theta), rope_1d(dim_hw, grid_h, theta), rope_1d(dim_hw, grid_w, theta)]

    def combine(i: int) -> np.ndarray:
        t, h, w = (p[i] for p in parts)
        full = np.concatenate(
            [
                np.broadcast_to(t[:, None, None, :], (nt, nh, nw, dim_t)),
                np.broadcast_to(h[None, :, None, :], (nt, nh, nw, dim_hw)),
                np.broadcast_to(w[None, None, :, :], (nt, nh, nw, dim_hw)),
            ],
            axis=-1,
        )
        return full.reshape(nt * nh * nw, head_dim)

    return combine(0), combine(1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, S, H, D] by cos/sin [S, D]; math in float32."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Sinusoidal (absolute) position tables
# --------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-2k/dim): [len(pos), dim] float64."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim={dim} must be even")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d(
    dim: int, frames: int, height: int, width: int, *, spatial_scale: float = 1.0, temporal_scale: float = 1.0
) -> np.ndarray:
    """3D sincos table [frames * height * width, dim] float64, tokens in (t, h, w) raster order.

    Channels: dim // 4 temporal, then 3 * dim // 4 spatial, which are (as in diffusers'
    get_3d_sincos_pos_embed) first the width coordinate's half, then the height coordinate's.
    Coordinates are index / scale.
    """
    if dim % 4:
        raise ValueError(f"sincos_3d: dim={dim} must be divisible by 4")
    dim_s, dim_t = 3 * dim // 4, dim // 4
    if dim_s % 4:
        raise ValueError(f"sincos_3d: dim={dim}: spatial part {dim_s} must be divisible by 4")
    gw, gh = np.meshgrid(
        np.arange(width, dtype=np.float32) / np.float32(spatial_scale),
        np.arange(height, dtype=np.float32) / np.float32(spatial_scale),
        indexing="xy",
    )  # each [height, width]
    spatial = np.concatenate([sincos_1d(dim_s // 2, gw), sincos_1d(dim_s // 2, gh)], axis=1)  # [h*w, dim_s]
    temporal = sincos_1d(dim_t, np.arange(frames, dtype=np.float32) / np.float32(temporal_scale))  # [t, dim_t]
    n = height * width
    table = np.concatenate(
        [np.broadcast_to(temporal[:, None, :], (frames, n, dim_t)), np.broadcast_to(spatial[None], (frames, n, dim_s))],
        axis=-1,
    )
    return table.reshape(frames * n, dim)
