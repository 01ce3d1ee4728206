"""LongCat-Video's single-stream video DiT (meituan-longcat/LongCat-Video, 13.6B) in Flax NNX.

Faithful to upstream's `LongCatVideoTransformer3DModel` (`longcat_video/modules/`):

    latents [B, C, T, H, W] --patch embed (1, 2, 2)--> tokens [B, T*H'*W', D]   (T, H', W') raster order
    timestep [B] or [B, T] --sinusoid + MLP (fp32)--> t [B, T, C_t]          one embedding per latent frame
    text [B, 1, L, C_txt] --caption MLP--> y [B, L, D]; valid tokens from encoder_attention_mask
    depth x single-stream block (scanned):
        AdaLN(t) per frame in fp32 -> self-attention (per-head RMSNorm q/k, 3D RoPE, dense or BSA)
        -> gated residual -> LayerNorm + cross-attention to the valid text tokens
        -> AdaLN -> SwiGLU FFN -> gated residual
    fp32 final layer (AdaLN + linear) -> unpatchify -> [B, C_out, T, H, W] float32

Conditioning frames (`num_cond_latents`): the first frames' queries attend only among themselves,
the noisy frames attend to all frames, and cross-attention is skipped for the conditioning tokens.
Video continuation with a KV cache: `return_kv=True` returns every layer's keys/values (after the
q/k norm, before RoPE); a later call with `kv_cache_dict` and only the noisy frames prepends them
(RoPE over the joint grid, the new frames after the cached ones) and lets every token cross-attend.

Differences from upstream kept on purpose: cross-attention uses a key mask over a fixed-size text
tensor instead of packing the valid tokens (same maths, no data-dependent shapes); upstream's
context-parallel split (`cp_split_hw` other than [1, 1]) is not supported (shard with a mesh).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvid.attention import BSA, PRECISIONS, AttentionPlan, Dense, VideoLayout, attend
from jaxvid.attention.dense import dense_attention
from jaxvid.attention.presets import BSARow, bsa_table_from_config
from jaxvid.models import abstract
from jaxvid.models.offload import stream_in
from jaxvid.parallel import shard_tokens

log = logging.getLogger(__name__)

__all__ = [
    "BSAParams",
    "LongCatConfig",
    "LongCatVideoTransformer3D",
    "LoRAFactors",
]

_EPS = 1e-6
_ROPE_BASE = 10000.0
_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
# config.json keys that say nothing about the maths: diffusers bookkeeping and upstream's choice
# of attention library (flash-attn 2/3, xformers all compute the same softmax attention).
_IGNORED_HF_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "architectures",
    "enable_flashattn3", "enable_flashattn2", "enable_xformers",
})


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def _int_tuple(name: str, value: Any, n: int) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
        ok = len(out) == n and all(o == v for o, v in zip(out, value)) and all(o >= 1 for o in out)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r}; expected {n} positive ints")
    return out


# Upstream's `bsa_params` are the attention layer's BSA spec (jaxvid.attention.plan.BSA): one class,
# read from config.json by `BSA.from_dict`; the old name stays for code written against it.
BSAParams = BSA


def _bsa_table(rows: tuple[BSARow, ...], what: str) -> tuple[tuple[BSARow, ...], BSA | None]:
    """A per-resolution bsa_params table, each row checked as a BSA spec, and the params of its
    largest BSA row (what `enable_bsa()` without a size uses; None if every row is dense)."""
    from jaxvid.models.hf_config import check_field_types

    default = None
    for row in rows:
        if row.params is not None:
            params = check_field_types(BSA, row.params, what=f"{what} bsa_params[{row.name!r}]")
            spec = BSA.from_dict(params)
            default = default or spec
    return rows, default


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LongCatConfig:
    """LongCat-Video DiT hyperparameters (upstream `LongCatVideoTransformer3DModel.__init__`).

    enable_bsa / bsa_params: the model's default attention (config.json's switches): BSA with these
    parameters when enabled (only for latents with > 1 frame), else dense; `attention_plan()` turns
    them into the AttentionPlan the forward pass uses when it is given none.
    bsa_table: config.json's `bsa_params` when it is a table per resolution ({"720p": {...},
    "480p": {...}}, see jaxvid.attention.presets); bsa_params is then its largest BSA row, and the
    pipeline picks the row by video size.
    text_tokens_zero_pad: zero the padded text embeddings and let every text token be attended.
    cp_split_hw: upstream's context-parallel split; only (1, 1) (single device) is supported.
    """

    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 4096
    depth: int = 48
    num_heads: int = 32
    caption_channels: int = 4096
    mlp_ratio: int = 4
    adaln_tembed_dim: int = 512
    frequency_embedding_size: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    enable_bsa: bool = False
    bsa_params: BSA | None = None
    bsa_table: tuple[BSARow, ...] | None = None
    cp_split_hw: tuple[int, int] = (1, 1)
    text_tokens_zero_pad: bool = False
    attention_precision: str = "bf16"  # jaxvid's, not upstream's: the default plan's attention arithmetic
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "hidden_size", "depth", "num_heads", "caption_channels",
                     "mlp_ratio", "adaln_tembed_dim", "frequency_embedding_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LongCatConfig.{name}={v!r}; expected a positive int")
        object.__setattr__(self, "patch_size", _int_tuple("LongCatConfig.patch_size", self.patch_size, 3))
        if self.patch_size[0] != 1:
            raise ValueError(f"LongCatConfig.patch_size={self.patch_size}; upstream supports no temporal patching "
                             "(patch_size[0] must be 1)")
        object.__setattr__(self, "cp_split_hw", _int_tuple("LongCatConfig.cp_split_hw", self.cp_split_hw, 2))
        if self.cp_split_hw != (1, 1):
            raise ValueError(f"LongCatConfig.cp_split_hw={self.cp_split_hw}; only (1, 1) is supported "
                             "(jaxvid shards over devices with a mesh, not upstream's context-parallel split)")
        if self.attention_precision not in PRECISIONS:
            raise ValueError(f"LongCatConfig.attention_precision={self.attention_precision!r}; expected one of "
                             f"{PRECISIONS}")
        if isinstance(self.bsa_params, Mapping):
            rows = bsa_table_from_config(self.bsa_params)
            if rows is None:
                object.__setattr__(self, "bsa_params", BSA.from_dict(self.bsa_params))
            else:
                rows, default = _bsa_table(rows, "LongCatConfig")
                object.__setattr__(self, "bsa_table", rows)
                object.__setattr__(self, "bsa_params", default)
        if self.bsa_params is not None and not isinstance(self.bsa_params, BSA):
            raise ValueError(f"LongCatConfig.bsa_params={self.bsa_params!r}; expected a BSA spec, a dict or None")
        if self.enable_bsa and self.bsa_params is None:
            raise ValueError("LongCatConfig.enable_bsa=True needs bsa_params (upstream asserts the same)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"LongCatConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.head_dim % 8:
            raise ValueError(f"LongCatConfig: head dim {self.head_dim} (hidden_size / num_heads) must be a multiple "
                             "of 8 for the 3D RoPE")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Upstream's SwiGLU width: 2/3 of hidden * mlp_ratio, rounded up to a multiple of 256."""
        h = int(2 * self.hidden_size * self.mlp_ratio / 3)
        return 256 * ((h + 255) // 256)

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim channels of the (t, h, w) rotary embeddings."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @classmethod
    def longcat_video(cls, **overrides: Any) -> LongCatConfig:
        """The released 13.6B model (meituan-longcat/LongCat-Video `dit/config.json`)."""
        base = dict(
            in_channels=16, out_channels=16, hidden_size=4096, depth=48, num_heads=32, caption_channels=4096,
            mlp_ratio=4, adaln_tembed_dim=512, frequency_embedding_size=256, patch_size=(1, 2, 2),
            enable_bsa=False, bsa_params=BSA(sparsity=0.9375, chunk_3d_shape_q=(4, 4, 4), chunk_3d_shape_k=(4, 4, 4)),
            text_tokens_zero_pad=True,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> LongCatConfig:
        """The size of ../shared/fixtures/longcat (hidden 64, 2 blocks, 4 heads of 16)."""
        base = dict(
            in_channels=4, out_channels=4, hidden_size=64, depth=2, num_heads=4, caption_channels=32,
            mlp_ratio=4, adaln_tembed_dim=32, frequency_embedding_size=64,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any]) -> LongCatConfig:
        """Read upstream's config.json (diffusers `save_pretrained` of LongCatVideoTransformer3DModel).

        Unknown keys are ignored with one warning (as diffusers does); a value of the wrong type is a
        ValueError naming the key.
        """
        from jaxvid.models.hf_config import check_field_types, drop_unknown_keys

        what = "LongCat transformer config.json"
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype", "bsa_table"}
        d = {k: v for k, v in d.items() if k not in _IGNORED_HF_KEYS and not k.startswith("_")}
        kwargs = drop_unknown_keys(d, fields, what=what)
        if kwargs.get("cp_split_hw") is None:
            kwargs.pop("cp_split_hw", None)  # upstream's None means no split
        table = bsa_table_from_config(kwargs.get("bsa_params"))  # a table per resolution (jaxvid's extension)
        if table is not None:
            kwargs["bsa_table"], kwargs["bsa_params"] = _bsa_table(table, what)
        kwargs = check_field_types(cls, kwargs, what=what)
        if isinstance(kwargs.get("bsa_params"), Mapping):
            params = check_field_types(BSA, kwargs["bsa_params"], what=f"{what} bsa_params")
            kwargs["bsa_params"] = BSA.from_dict(params)
        return cls(**kwargs)

    def attention_plan(self) -> AttentionPlan:
        """The plan config.json asks for: BSA (bsa_params) on every layer and step when enable_bsa, else dense;
        in `attention_precision` (jaxvid.attention.plan.PRECISIONS)."""
        plan = AttentionPlan(sparse=self.bsa_params) if self.enable_bsa else AttentionPlan.dense()
        return plan.with_precision(self.attention_precision) if self.attention_precision != "bf16" else plan


# --------------------------------------------------------------------------------------------
# Small layers (LongCat-specific numerics: fp32 norms and modulation)
# --------------------------------------------------------------------------------------------

class LoRAFactors(NamedTuple):
    """A low-rank update of one linear layer: y += ((x @ down) * scale) @ up.

    down [in, R], up [R, out], scale [R] (multiplier * alpha / rank of each LoRA, per rank column,
    so several LoRAs concatenated along R add up). Stacked layers carry a leading [depth] axis.
    """

    down: jax.Array
    up: jax.Array
    scale: jax.Array


def _sub_lora(lora: Mapping[str, LoRAFactors] | None, prefix: str) -> dict[str, LoRAFactors]:
    """The entries of `lora` under `prefix.` with the prefix removed."""
    if not lora:
        return {}
    p = prefix + "."
    return {k[len(p):]: v for k, v in lora.items() if k.startswith(p)}


_LECUN_NORMAL = abstract.initializer(nnx.initializers.lecun_normal())


class _Linear(nnx.Module):
    """x @ kernel + bias (kernel [in, out], PyTorch weight transposed), with an optional LoRA update."""

    def __init__(self, d_in: int, d_out: int, cfg: LongCatConfig, *, bias: bool = True, rngs: nnx.Rngs):
        self.dtype = cfg.dtype
        self.kernel = nnx.Param(_LECUN_NORMAL(rngs.params(), (d_in, d_out), cfg.param_dtype))
        self.bias = nnx.Param(abstract.zeros((d_out,), cfg.param_dtype)) if bias else None

    def __call__(self, x: jax.Array, lora: LoRAFactors | None = None, *, fp32: bool = False) -> jax.Array:
        dt = _F32 if fp32 else self.dtype
        prec = _HIGHEST if fp32 else None  # upstream runs these under fp32 autocast, not TF32
        x = x.astype(dt)
        y = jnp.dot(x, self.kernel[...].astype(dt), precision=prec)
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        if lora is not None:
            low = jnp.dot(x, lora.down.astype(dt), precision=prec) * lora.scale.astype(dt)
            y = y + jnp.dot(low, lora.up.astype(dt), precision=prec)
        return y


def _layer_norm_fp32(x: jax.Array, weight: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    """LayerNorm over the last axis computed in fp32 (returns fp32)."""
    x = x.astype(_F32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + _EPS)
    if weight is not None:
        y = y * weight.astype(_F32) + bias.astype(_F32)
    return y


class _LayerNormFP32(nnx.Module):
    """Affine LayerNorm computed in fp32, cast back to the input dtype (upstream LayerNorm_FP32)."""

    def __init__(self, dim: int, cfg: LongCatConfig):
        self.weight = nnx.Param(abstract.ones((dim,), cfg.param_dtype))
        self.bias = nnx.Param(abstract.zeros((dim,), cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return _layer_norm_fp32(x, self.weight[...], self.bias[...]).astype(x.dtype)


class _RMSNormFP32(nnx.Module):
    """RMSNorm over the last axis in fp32, cast back, then scaled (upstream RMSNorm_FP32)."""

    def __init__(self, dim: int, cfg: LongCatConfig):
        self.weight = nnx.Param(abstract.ones((dim,), cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(_F32)
        normed = (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + _EPS)).astype(x.dtype)
        return normed * self.weight[...].astype(x.dtype)


def _modulate_fp32(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """Parameter-free LayerNorm then x * (1 + scale) + shift, in fp32, cast back to x's dtype."""
    return (_layer_norm_fp32(x) * (scale + 1.0) + shift).astype(x.dtype)


def _per_frame(x: jax.Array, frames: int) -> jax.Array:
    """[B, T*S, C] -> [B, T, S, C] so per-frame [B, T, 1, C] modulation broadcasts."""
    b, n, c = x.shape
    return x.reshape(b, frames, n // frames, c)


# --------------------------------------------------------------------------------------------
# Positional tables
# --------------------------------------------------------------------------------------------

def _rope_axis(positions: jax.Array, dim: int) -> jax.Array:
    """Angles [n, dim] of one axis: each frequency repeated for its (even, odd) channel pair."""
    freqs = 1.0 / jnp.power(_ROPE_BASE, jnp.arange(0, dim, 2, dtype=_F32)[: dim // 2] / dim)
    return jnp.repeat(positions[:, None] * freqs[None, :], 2, axis=-1)


def rope_3d_tables(grid: Sequence[int], dims: Sequence[int], t_offset: int = 0) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T*H*W, 1, D] of LongCat's 3D RoPE for a (T, H, W) grid, frames from `t_offset`.

    Channels are [t | h | w] blocks of sizes `dims`; positions are integer grid indices.
    """
    T, H, W = grid
    dt, dh, dw = dims
    at = _rope_axis(jnp.arange(t_offset, t_offset + T, dtype=_F32), dt)
    ah = _rope_axis(jnp.arange(H, dtype=_F32), dh)
    aw = _rope_axis(jnp.arange(W, dtype=_F32), dw)
    angles = jnp.concatenate([
        jnp.broadcast_to(at[:, None, None, :], (T, H, W, dt)),
        jnp.broadcast_to(ah[None, :, None, :], (T, H, W, dh)),
        jnp.broadcast_to(aw[None, None, :, :], (T, H, W, dw)),
    ], axis=-1).reshape(T * H * W, 1, dt + dh + dw)
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, H, D] rotated in fp32 by interleaved pairs (x0, x1) -> (-x1, x0), cast back."""
    x32 = x.astype(_F32)
    pairs = x32.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def _timestep_frequencies(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding [N, dim] of fp32 timesteps [N]: [cos | sin] (upstream order)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=_F32) / half)
    args = t.astype(_F32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


# --------------------------------------------------------------------------------------------
# Embedders, attention, FFN, block, final layer
# --------------------------------------------------------------------------------------------

class _PatchConv(nnx.Module):
    """Conv3d with kernel = stride = patch, as a reshape and one matmul (kernel [pt, ph, pw, C, D])."""

    def __init__(self, cfg: LongCatConfig, *, rngs: nnx.Rngs):
        self.patch, self.dtype = cfg.patch_size, cfg.dtype
        shape = (*cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.kernel = nnx.Param(_LECUN_NORMAL(rngs.params(), shape, cfg.param_dtype))
        self.bias = nnx.Param(abstract.zeros((cfg.hidden_size,), cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, C, T, H, W] -> tokens [B, T'*H'*W', D] in (T', H', W') raster order."""
        b, c, t, h, w = x.shape
        pt, ph, pw = self.patch
        x = x.astype(self.dtype).reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
        y = jnp.einsum("bcTtHhWw,thwcd->bTHWd", x, self.kernel[...].astype(self.dtype))
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, -1, y.shape[-1])


class PatchEmbed3D(nnx.Module):
    def __init__(self, cfg: LongCatConfig, *, rngs: nnx.Rngs):
        self.proj = _PatchConv(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class TimestepEmbedder(nnx.Module):
    """Timesteps [N] -> [N, C_t] in fp32: sinusoid, Linear, SiLU, Linear (mlp.0 / mlp.2)."""

    def __init__(self, cfg: LongCatConfig, *, rngs: nnx.Rngs):
        self.freq_dim = cfg.frequency_embedding_size
        c = cfg.adaln_tembed_dim
        self.mlp = nnx.List([_Linear(self.freq_dim, c, cfg, rngs=rngs), None, _Linear(c, c, cfg, rngs=rngs)])

    def __call__(self, t: jax.Array, lora: Mapping[str, LoRAFactors]) -> jax.Array:
        h = self.mlp[0](_timestep_frequencies(t, self.freq_dim), lora.get("mlp.0"), fp32=True)
        return self.mlp[2](jax.nn.silu(h), lora.get("mlp.2"), fp32=True)


class CaptionEmbedder(nnx.Module):
    """Text [.., C_txt] -> [.., D]: Linear, GELU(tanh), Linear (y_proj.0 / y_proj.2), model dtype."""

    def __init__(self, cfg: LongCatConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.y_proj = nnx.List([_Linear(cfg.caption_channels, d, cfg, rngs=rngs), None, _Linear(d, d, cfg, rngs=rngs)])

    def __call__(self, y: jax.Array, lora: Mapping[str, LoRAFactors]) -> jax.Array:
        h = jax.nn.gelu(self.y_proj[0](y, lora.get("y_proj.0")), approximate=True)
        return self.y_proj[2](h, lora.get("y_proj.2"))


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """What one forward pass does in a run of layers (static: Python values fixed at trace time)."""

    grid: tuple[int, int, int]  # (T, H', W') of the tokens in hidden_states
    num_cond_latents: int
    spec: Dense | BSA  # the self-attention of these layers (from the AttentionPlan)
    use_cache: bool
    return_kv: bool
    skip_crs_attn: bool

    @property
    def frame_tokens(self) -> int:
        return self.grid[1] * self.grid[2]


def _self_attend(q, k, v, frames_q: int, frames_k: int, plan: _Plan) -> jax.Array:
    """Softmax attention q [B, Sq, H, D] over k/v [B, Sk, H, D] through `attend`: dense, or BSA on the 3D grid."""
    _, h, w = plan.grid
    # BSA keeps its own 1/sqrt(D) default (upstream's); the dense path is upstream's D ** -0.5
    scale = None if isinstance(plan.spec, BSA) else q.shape[-1] ** -0.5
    return attend(q, k, v, plan.spec, layout=VideoLayout(frames=frames_q, height=h, width=w),
                  kv_layout=VideoLayout(frames=frames_k, height=h, width=w), scale=scale)


class Attention(nnx.Module):
    """Self-attention: fused qkv, per-head RMSNorm on q/k, 3D RoPE, dense or block-sparse softmax."""

    def __init__(self, cfg: LongCatConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = _Linear(d, 3 * d, cfg, rngs=rngs)
        self.q_norm = _RMSNormFP32(cfg.head_dim, cfg)
        self.k_norm = _RMSNormFP32(cfg.head_dim, cfg)
        self.proj = _Linear(d, d, cfg, rngs=rngs)

    def __call__(self, x, rope, plan: _Plan, kv_cache, lora: Mapping[str, LoRAFactors]):
        """x [B, N, D] -> ([B, N, D], (k, v) [B, N, H, Dh] before RoPE if plan.return_kv else None).

        rope: (cos, sin) of the queries and (cos, sin) of the keys. kv_cache: (k, v) [1 or B, Nc, H, Dh]
        of the cached conditioning frames, or None.
        """
        b, n, c = x.shape
        qkv = self.qkv(x, lora.get("qkv")).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = self.q_norm(q), self.k_norm(k)
        new_kv = (k, v) if plan.return_kv else None
        (cos_q, sin_q), (cos_k, sin_k) = rope
        t = plan.grid[0]
        if kv_cache is not None:
            k_cache, v_cache = (jnp.broadcast_to(a.astype(k.dtype), (b,) + a.shape[1:]) for a in kv_cache)
            k = jnp.concatenate([k_cache, k], axis=1)
            v = jnp.concatenate([v_cache, v], axis=1)
            q, k = _apply_rope(q, cos_q, sin_q), _apply_rope(k, cos_k, sin_k)
            out = _self_attend(q, k, v, t, t + plan.num_cond_latents, plan)
        else:
            q, k = _apply_rope(q, cos_q, sin_q), _apply_rope(k, cos_k, sin_k)
            nc = plan.num_cond_latents
            if nc > 0:
                s = nc * plan.frame_tokens
                out_cond = _self_attend(q[:, :s], k[:, :s], v[:, :s], nc, nc, plan)
                out_noise = _self_attend(q[:, s:], k, v, t - nc, t, plan)
                out = jnp.concatenate([out_cond, out_noise], axis=1)
            else:
                out = _self_attend(q, k, v, t, t, plan)
        return self.proj(out.reshape(b, n, c), lora.get("proj")), new_kv


def _text_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array) -> jax.Array:
    """q [B, N, H, D] over the first kv_lengths[b] of k/v [B, L, H, D]; zero where no key is valid."""
    out = dense_attention(q, k, v, kv_lengths=kv_lengths)
    return jnp.where((kv_lengths > 0)[:, None, None, None], out, jnp.zeros_like(out))


class MultiHeadCrossAttention(nnx.Module):
    """Cross-attention of video tokens to the valid text tokens, per-head RMSNorm on q/k, no RoPE."""

    def __init__(self, cfg: LongCatConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_linear = _Linear(d, d, cfg, rngs=rngs)
        self.kv_linear = _Linear(d, 2 * d, cfg, rngs=rngs)
        self.proj = _Linear(d, d, cfg, rngs=rngs)
        self.q_norm = _RMSNormFP32(cfg.head_dim, cfg)
        self.k_norm = _RMSNormFP32(cfg.head_dim, cfg)

    def __call__(self, x, y, y_lengths, lora: Mapping[str, LoRAFactors]):
        """x [B, N, D], y [B, L, D] with the valid tokens first, y_lengths [B] -> [B, N, D]."""
        b, n, c = x.shape
        q = self.q_linear(x, lora.get("q_linear")).reshape(b, n, self.num_heads, self.head_dim)
        kv = self.kv_linear(y, lora.get("kv_linear")).reshape(b, y.shape[1], 2, self.num_heads, self.head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]
        q, k = self.q_norm(q), self.k_norm(k)
        out = _text_attention(q, k, v, y_lengths)
        return self.proj(out.reshape(b, n, c), lora.get("proj"))


class FeedForwardSwiGLU(nnx.Module):
    """w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, cfg: LongCatConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.ffn_hidden_dim
        self.w1 = _Linear(d, f, cfg, bias=False, rngs=rngs)
        self.w2 = _Linear(f, d, cfg, bias=False, rngs=rngs)
        self.w3 = _Linear(d, f, cfg, bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, lora: Mapping[str, LoRAFactors]) -> jax.Array:
        h = jax.nn.silu(self.w1(x, lora.get("w1"))) * self.w3(x, lora.get("w3"))
        return self.w2(h, lora.get("w2"))


class LongCatSingleStreamBlock(nnx.Module):
    def __init__(self, cfg: LongCatConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.adaLN_modulation = nnx.List([None, _Linear(cfg.adaln_tembed_dim, 6 * d, cfg, rngs=rngs)])
        self.pre_crs_attn_norm = _LayerNormFP32(d, cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.cross_attn = MultiHeadCrossAttention(cfg, rngs=rngs)
        self.ffn = FeedForwardSwiGLU(cfg, rngs=rngs)

    def __call__(self, x, y, y_lengths, t_emb, rope, plan: _Plan, kv_cache, lora: Mapping[str, LoRAFactors]):
        """x [B, N, D]; y [B, L, D]; t_emb [B, T, C_t] fp32 -> (x, (k, v) or None)."""
        b, n, c = x.shape
        frames = plan.grid[0]
        mod = self.adaLN_modulation[1](jax.nn.silu(t_emb), lora.get("adaLN_modulation.1"), fp32=True)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod[:, :, None, :], 6, axis=-1)

        x_m = _modulate_fp32(_per_frame(x, frames), shift_msa, scale_msa).reshape(b, n, c)
        attn_out, new_kv = self.attn(x_m, rope, plan, kv_cache, _sub_lora(lora, "attn"))
        x = (_per_frame(x, frames).astype(_F32) + gate_msa * _per_frame(attn_out, frames).astype(_F32))
        x = x.reshape(b, n, c).astype(x_m.dtype)

        if not plan.skip_crs_attn:
            cross_lora = _sub_lora(lora, "cross_attn")
            # Conditioning-frame tokens skip cross-attention, except when they sit in the KV cache.
            s = 0 if plan.use_cache else plan.num_cond_latents * plan.frame_tokens
            h = self.pre_crs_attn_norm(x[:, s:])
            x = x.at[:, s:].add(self.cross_attn(h, y, y_lengths, cross_lora).astype(x.dtype))

        x_m = _modulate_fp32(_per_frame(x, frames), shift_mlp, scale_mlp).reshape(b, n, c)
        ffn_out = self.ffn(x_m, _sub_lora(lora, "ffn"))
        x = (_per_frame(x, frames).astype(_F32) + gate_mlp * _per_frame(ffn_out, frames).astype(_F32))
        return x.reshape(b, n, c).astype(x_m.dtype), new_kv


class FinalLayer(nnx.Module):
    """fp32 AdaLN (shift, scale) + LayerNorm, then a linear to patch pixels."""

    def __init__(self, cfg: LongCatConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        n_patch = int(np.prod(cfg.patch_size))
        self.linear = _Linear(d, n_patch * cfg.out_channels, cfg, rngs=rngs)
        self.adaLN_modulation = nnx.List([None, _Linear(cfg.adaln_tembed_dim, 2 * d, cfg, rngs=rngs)])

    def __call__(self, x, t_emb, frames: int, lora: Mapping[str, LoRAFactors]) -> jax.Array:
        b, n, c = x.shape
        mod = self.adaLN_modulation[1](jax.nn.silu(t_emb), lora.get("adaLN_modulation.1"), fp32=True)
        shift, scale = jnp.split(mod[:, :, None, :], 2, axis=-1)
        x = _modulate_fp32(_per_frame(x, frames), shift, scale).reshape(b, n, c)
        return self.linear(x, lora.get("linear"), fp32=True)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

KVCache = dict[int, tuple[jax.Array, jax.Array]]


def bsa_plan(default: BSA | None, params: BSA | Mapping[str, Any] | None = None, **overrides: Any) -> AttentionPlan:
    """The AttentionPlan of `enable_bsa(params, **overrides)`: `params` (a BSA spec or a bsa_params dict)
    or else `default` (the config's bsa_params), with single fields replaced by `overrides`."""
    if isinstance(params, Mapping):
        params = BSA.from_dict(params)
    params = params or default
    if params is None:
        raise ValueError("enable_bsa: the config has no bsa_params; pass params=BSA(...)")
    if overrides:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(BSA)})
        if unknown:
            raise ValueError(f"enable_bsa: unknown BSA fields {unknown}; expected sparsity, cdf_threshold, "
                             "chunk_3d_shape_q, chunk_3d_shape_k, implementation")
        params = dataclasses.replace(params, **overrides)
    return AttentionPlan(sparse=params)


class LongCatVideoTransformer3D(nnx.Module):
    """LongCat-Video DiT. Parameter names follow upstream's checkpoint (blocks stacked on axis 0)."""

    def __init__(self, cfg: LongCatConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.x_embedder = PatchEmbed3D(cfg, rngs=rngs)
        self.t_embedder = TimestepEmbedder(cfg, rngs=rngs)
        self.y_embedder = CaptionEmbedder(cfg, rngs=rngs)

        self.blocks = abstract.stack(lambda r: LongCatSingleStreamBlock(cfg, rngs=r), cfg.depth, rngs)
        self.final_layer = FinalLayer(cfg, rngs=rngs)
        if cfg.enable_bsa:
            log.info("LongCat: block sparse attention enabled %s", cfg.bsa_params)

    # ---- switches (upstream's names; they set the default plan) -----------------------------

    def attention_plan(self) -> AttentionPlan:
        """The plan a call without `attention=` uses: the config's (enable_bsa, bsa_params)."""
        return self.cfg.attention_plan()

    def enable_bsa(self, params: BSA | Mapping[str, Any] | None = None, **overrides: Any) -> AttentionPlan:
        """Make BSA the default self-attention (for latents with more than one frame); returns its plan.

        A convenience over `model(..., attention=AttentionPlan(sparse=BSA(...)))`: `params` replaces the
        config's bsa_params, `overrides` change single fields (e.g. `sparsity=0.875`). The module's
        config changes, so re-split the model before jitting again (or pass plans explicitly).
        """
        plan = bsa_plan(self.cfg.bsa_params, params, **overrides)
        self.cfg = dataclasses.replace(self.cfg, enable_bsa=True, bsa_params=plan.sparse)
        log.info("LongCat: block sparse attention enabled %s", plan.sparse)
        return plan

    def set_attention_precision(self, precision: str) -> AttentionPlan:
        """Attention arithmetic of the default plan from now on ("bf16", "fp8", "int8-fp8"); returns the plan."""
        plan = self.cfg.attention_plan().with_precision(precision)  # checks the name
        self.cfg = dataclasses.replace(self.cfg, attention_precision=precision)
        log.info("LongCat: attention precision %s", precision)
        return plan

    def disable_bsa(self) -> AttentionPlan:
        """Back to dense self-attention by default; returns the dense plan."""
        self.cfg = dataclasses.replace(self.cfg, enable_bsa=False)
        log.info("LongCat: block sparse attention disabled")
        return AttentionPlan.dense()

    # ---- forward --------------------------------------------------------------------------

    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array | None,
        encoder_attention_mask: jax.Array | None = None,
        num_cond_latents: int = 0,
        return_kv: bool = False,
        kv_cache_dict: KVCache | None = None,
        skip_crs_attn: bool = False,
        *,
        lora: Mapping[str, LoRAFactors] | None = None,
        attention: AttentionPlan | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Predict the flow for latents [B, C, T, H, W]; returns [B, C_out, T, H, W] float32.

        timestep: [B] (every frame) or [B, T]. encoder_hidden_states: [B, 1, L, C_txt];
        encoder_attention_mask: [B, L] (nonzero = valid token; may be None only with skip_crs_attn).
        num_cond_latents (static int): leading frames that are clean conditioning frames; with
        kv_cache_dict, the number of cached frames before hidden_states.
        return_kv: also return {layer: (k, v)} with k/v [B, T*H'*W', heads, head_dim] (normed, no RoPE).
        kv_cache_dict: {layer: (k, v)} of the conditioning frames from a `return_kv` call (batch 1 or B).
        skip_crs_attn: skip cross-attention (as when caching the conditioning frames).
        lora: run-time LoRA updates, module path -> LoRAFactors (see jaxvid.models.lora).
        attention: the (static) AttentionPlan: its first `dense_layers` blocks run dense, the rest with
        `plan.sparse` (Dense() or BSA(...)); None = the config's plan (`attention_plan()`). Dense
        timesteps are the denoising loop's business (jaxvid.pipelines.loop.with_plan_switch).
        """
        cfg = self.cfg
        b, t, h, w = self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                        num_cond_latents, return_kv, kv_cache_dict, skip_crs_attn)
        grid = (t, h // cfg.patch_size[1], w // cfg.patch_size[2])
        use_cache = bool(kv_cache_dict)
        attention = cfg.attention_plan() if attention is None else attention
        if not isinstance(attention, AttentionPlan) or not isinstance(attention.sparse, (Dense, BSA)):
            raise ValueError(f"attention={attention!r}; expected None or an AttentionPlan whose sparse spec is "
                             "Dense() or BSA(...) (LongCat's self-attention)")
        # BSA only for latents with more than one frame ("bsa will not be used in image sampling")
        sparse = attention.sparse if t > 1 else attention.dense_spec()
        if isinstance(sparse, BSA):
            self._check_bsa(sparse, grid, num_cond_latents, use_cache)
        plan = _Plan(grid=grid, num_cond_latents=int(num_cond_latents), spec=sparse, use_cache=use_cache,
                     return_kv=return_kv, skip_crs_attn=skip_crs_attn)
        n_dense = cfg.depth if isinstance(sparse, Dense) else attention.layer_split(cfg.depth)[0]
        lora = dict(lora or {})
        dtype = cfg.dtype

        if timestep.ndim == 1:
            timestep = jnp.broadcast_to(timestep[:, None], (b, t))
        # Upstream casts the timestep to the model dtype before embedding it in fp32.
        timestep = timestep.astype(dtype).astype(_F32)

        x = self.x_embedder(hidden_states.astype(dtype))
        t_emb = self.t_embedder(timestep.reshape(-1), _sub_lora(lora, "t_embedder")).reshape(b, t, -1)
        y, y_lengths = self._text(encoder_hidden_states, encoder_attention_mask, skip_crs_attn, b, lora)

        nc = plan.num_cond_latents if use_cache else 0
        cos_k, sin_k = rope_3d_tables((grid[0] + nc, grid[1], grid[2]), cfg.rope_dims)
        q_start = nc * plan.frame_tokens
        rope = ((cos_k[q_start:], sin_k[q_start:]), (cos_k, sin_k))

        cache = self._stack_cache(kv_cache_dict) if use_cache else None
        block_lora = _sub_lora(lora, "blocks")

        x, new_kv = self._run_blocks(x, (y, y_lengths, t_emb, rope), plan, n_dense, cache, block_lora)

        x = self.final_layer(x, t_emb, grid[0], _sub_lora(lora, "final_layer"))
        out = self._unpatchify(x, grid).astype(_F32)
        if return_kv:
            k_all, v_all = new_kv
            return out, {i: (k_all[i], v_all[i]) for i in range(cfg.depth)}
        return out

    def _run_blocks(self, x, inputs, plan: _Plan, n_dense: int, cache, block_lora):
        """The stacked blocks as one scan per run of layers: blocks [0, n_dense) dense, the rest `plan.spec`.

        Returns x and the stacked (k, v) of every layer (None unless plan.return_kv).
        """
        depth = self.cfg.depth
        graphdef, state = nnx.split(self.blocks)
        segments = [(a, z, spec) for a, z, spec in ((0, n_dense, Dense(precision=plan.spec.precision)), (n_dense, depth, plan.spec)) if z > a]
        outputs = []
        for start, stop, spec in segments:
            layer_plan = dataclasses.replace(plan, spec=spec)
            # The whole stack is not sliced, so blocks parked in host memory (offload="blocks") are
            # only ever sliced by the scan, one layer at a time.
            xs = (state, cache, block_lora)
            if (start, stop) != (0, depth):
                xs = jax.tree.map(lambda a: a[start:stop], xs)

            def body(x, layer, layer_plan=layer_plan):
                layer_state, layer_cache, layer_lora = layer
                x = shard_tokens(x)  # tokens over the mesh's `seq` axis outside attention (no-op without a mesh)
                # offload="blocks": this layer's host-resident weights are copied in here
                return nnx.merge(graphdef, stream_in(layer_state))(x, *inputs, layer_plan, layer_cache, layer_lora)

            x, kv = jax.lax.scan(body, x, xs)
            outputs.append(kv)
        if not plan.return_kv:
            return x, None
        return x, jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)

    def _text(self, y, mask, skip_crs_attn, b, lora):
        """Caption embedding [B, L, D] with the valid tokens moved first (stable), and their counts [B]."""
        if skip_crs_attn and y is None:
            return None, None
        y = self.y_embedder(y.astype(self.cfg.dtype), _sub_lora(lora, "y_embedder"))[:, 0]
        if mask is None:  # only reachable with skip_crs_attn: the text is not used
            return y, jnp.full((b,), y.shape[1], jnp.int32)
        mask = mask.reshape(b, -1)
        if self.cfg.text_tokens_zero_pad:
            y = y * mask[:, :, None].astype(y.dtype)
            mask = jnp.ones_like(mask)
        valid = mask != 0
        # Cross-attention has no positions, so moving valid tokens first changes nothing but lets
        # the kernel take per-item key lengths.
        order = jnp.argsort(jnp.logical_not(valid), axis=1, stable=True)
        y = jnp.take_along_axis(y, order[:, :, None], axis=1)
        return y, valid.sum(axis=1).astype(jnp.int32)

    def _stack_cache(self, kv_cache_dict: KVCache) -> tuple[jax.Array, jax.Array]:
        depth = self.cfg.depth
        if set(kv_cache_dict) != set(range(depth)):
            raise ValueError(f"kv_cache_dict has layers {sorted(kv_cache_dict)}; expected all of 0..{depth - 1}")
        ks = [jnp.asarray(kv_cache_dict[i][0]) for i in range(depth)]
        vs = [jnp.asarray(kv_cache_dict[i][1]) for i in range(depth)]
        return jnp.stack(ks), jnp.stack(vs)

    def _unpatchify(self, x: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """[B, T*H'*W', pt*ph*pw*C] -> [B, C, T*pt, H'*ph, W'*pw]."""
        b = x.shape[0]
        t, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_channels
        x = x.reshape(b, t, h, w, pt, ph, pw, c)
        x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, t * pt, h * ph, w * pw)

    # ---- input checks (shapes only: everything here is static under jit) --------------------

    def _check_inputs(self, hidden_states, timestep, y, mask, num_cond_latents, return_kv, kv_cache_dict,
                      skip_crs_attn) -> tuple[int, int, int, int]:
        cfg = self.cfg
        if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(f"hidden_states.shape={hidden_states.shape}; expected [B, {cfg.in_channels}, T, H, W]")
        b, _, t, h, w = hidden_states.shape
        _, ph, pw = cfg.patch_size
        if h % ph or w % pw:
            raise ValueError(f"hidden_states latent H, W = {h}, {w} must be divisible by the patch size "
                             f"{cfg.patch_size[1:]}")
        if timestep.shape not in ((b,), (b, t)):
            raise ValueError(f"timestep.shape={timestep.shape}; expected [{b}] or [{b}, {t}]")
        if not isinstance(num_cond_latents, (int, np.integer)) or isinstance(num_cond_latents, bool):
            raise ValueError(f"num_cond_latents={num_cond_latents!r}; expected a Python int (it sets shapes)")
        if kv_cache_dict:
            if return_kv:
                raise ValueError("return_kv=True together with kv_cache_dict is not supported (upstream neither)")
            if num_cond_latents < 1:
                raise ValueError(f"num_cond_latents={num_cond_latents} with kv_cache_dict; expected the number "
                                 "(>= 1) of cached conditioning frames")
            for i, (k, v) in kv_cache_dict.items():
                want = num_cond_latents * (h // ph) * (w // pw)
                if k.shape != v.shape or k.ndim != 4 or k.shape[0] not in (1, b) or k.shape[1] != want \
                        or k.shape[2:] != (cfg.num_heads, cfg.head_dim):
                    raise ValueError(f"kv_cache_dict[{i}] shapes {k.shape}, {v.shape}; expected [1 or {b}, {want}, "
                                     f"{cfg.num_heads}, {cfg.head_dim}] (num_cond_latents frames of tokens)")
        elif not 0 <= num_cond_latents < t:
            raise ValueError(f"num_cond_latents={num_cond_latents}; expected 0 <= num_cond_latents < T={t} "
                             "(at least one noisy frame)")
        if y is None:
            if not skip_crs_attn:
                raise ValueError("encoder_hidden_states is None; expected [B, 1, L, caption_channels]")
        else:
            if y.ndim != 4 or y.shape[0] != b or y.shape[1] != 1 or y.shape[3] != cfg.caption_channels:
                raise ValueError(f"encoder_hidden_states.shape={y.shape}; expected [{b}, 1, L, {cfg.caption_channels}]")
            if mask is None and not skip_crs_attn:
                raise ValueError("encoder_attention_mask is None; expected [B, L] (1 = valid text token); "
                                 "pass jnp.ones((B, L)) if every token is valid")
            if mask is not None and (math.prod(mask.shape) != b * y.shape[2] or mask.shape[0] != b):
                raise ValueError(f"encoder_attention_mask.shape={mask.shape}; expected [{b}, {y.shape[2]}]")
        return b, t, h, w

    @staticmethod
    def _check_bsa(bsa: BSA, grid, num_cond_latents: int, use_cache: bool) -> None:
        t, h, w = grid
        if use_cache:
            parts = [("queries", (t, h, w), bsa.chunk_3d_shape_q), ("keys", (t + num_cond_latents, h, w),
                                                                    bsa.chunk_3d_shape_k)]
        elif num_cond_latents:
            nc = num_cond_latents
            parts = [("conditioning queries/keys", (nc, h, w), bsa.chunk_3d_shape_q),
                     ("conditioning keys", (nc, h, w), bsa.chunk_3d_shape_k),
                     ("noisy-frame queries", (t - nc, h, w), bsa.chunk_3d_shape_q),
                     ("keys", (t, h, w), bsa.chunk_3d_shape_k)]
        else:
            parts = [("queries", grid, bsa.chunk_3d_shape_q), ("keys", grid, bsa.chunk_3d_shape_k)]
        for what, shape, chunk in parts:
            if any(s % c for s, c in zip(shape, chunk)):
                raise ValueError(f"BSA: token grid {shape} (T, H/patch, W/patch) of the {what} is not divisible by "
                                 f"the chunk shape {chunk}; pick latent sizes that are, or disable_bsa()")
