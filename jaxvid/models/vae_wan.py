"""Wan 2.1 VAE (diffusers' `AutoencoderKLWan`), the video autoencoder LongCat-Video uses.

Frames [B, 3, F, H, W] in [-1, 1] <-> latents [B, z, 1 + (F-1)/4, H/8, W/8] (real preset).

Everything inside runs channels-last, [B, T, H, W, C]; the public `encode` / `decode` take and
return diffusers' channels-first layout. Every 3D conv is causal in time (2 frames of left
context for a time kernel of 3). Like diffusers, the video is processed in chunks that carry a
feature cache: encode runs the first frame, then chunks of 4 frames; decode runs one latent frame
at a time. The cache holds, per causal conv, the last 2 frames of its input (zeros before the
first chunk), which makes the chunked result equal to diffusers' to float rounding.

Chunks after the first are run by `jax.lax.scan` with the cache as the carry, so one chunk's
activations live at a time (at 93 frames 480p the decoder's full-resolution activations are
~0.3 GB per tensor per 4-frame chunk in bf16 instead of ~7 GB for the whole clip), and the chunk
body is compiled once. The first chunk has other shapes (1 frame, no time up/down-sampling) and
is traced separately, so a jitted encode/decode holds two copies of the network's graph.

What differs from the PyTorch reference, on purpose:
- the `temperal_downsample` config key is the field `temporal_downsample`;
- the spatial 2D conv of a resample block is the parameter `resample` (diffusers: `resample.1`,
  index 1 of an nn.Sequential whose index 0 is the parameter-free up/zero-pad step);
- encode requires (F - 1) % 4 == 0 (diffusers silently drops the trailing frames otherwise).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvid.attention import attend
from jaxvid.models import abstract

Array = jax.Array
Cache = Any  # nested tuples of [B, t, H, W, C] arrays (or None), mirroring the module tree

# diffusers AutoencoderKLWan defaults = the Wan 2.1 VAE's per-channel latent statistics.
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

# Frames per encoder chunk after the first frame: fixed in diffusers' `_encode`, not a config value.
ENCODE_CHUNK_FRAMES = 4
# Left context a causal conv with time kernel 3 needs (diffusers' CACHE_T).
CACHE_FRAMES = 2
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's default eps

ResampleMode = Literal["upsample2d", "upsample3d", "downsample2d", "downsample3d"]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class WanVAEConfig:
    """AutoencoderKLWan hyper-parameters (diffusers config.json names, see `from_hf_config`).

    `temporal_downsample[i]` says whether encoder stage i (of len(dim_mult) - 1 downsampling
    stages) also halves time; the decoder mirrors it. `latents_mean` / `latents_std` are the
    per-channel statistics LongCat's pipeline normalises latents with.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"WanVAEConfig.{name}={value!r}; expected a positive int")
        if self.decoder_base_dim is not None and (not isinstance(self.decoder_base_dim, int) or self.decoder_base_dim < 1):
            raise ValueError(f"WanVAEConfig.decoder_base_dim={self.decoder_base_dim!r}; expected None or a positive int")
        if len(self.dim_mult) < 1 or any(not isinstance(m, int) or m < 1 for m in self.dim_mult):
            raise ValueError(f"WanVAEConfig.dim_mult={self.dim_mult!r}; expected a non-empty tuple of positive ints")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig.temporal_downsample={self.temporal_downsample!r}; expected "
                f"len(dim_mult) - 1 = {len(self.dim_mult) - 1} booleans"
            )
        # A 4-frame encoder chunk halves once per temporal stage; a third halving would leave the
        # strided time conv a window of 2 frames (diffusers fails there too).
        if 2 ** sum(self.temporal_downsample) > ENCODE_CHUNK_FRAMES:
            raise ValueError(
                f"WanVAEConfig.temporal_downsample={self.temporal_downsample!r}; at most 2 temporal "
                f"stages fit diffusers' {ENCODE_CHUNK_FRAMES}-frame encoder chunks"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"WanVAEConfig.{name} has {len(getattr(self, name))} values; expected z_dim={self.z_dim}")
        if any(s == 0 for s in self.latents_std):
            raise ValueError(f"WanVAEConfig.latents_std={self.latents_std!r} contains 0")
        # The decoder's 2D/3D upsample halves the channels (Wan 2.1), so decoder stage widths must be even.
        if any((self.decoder_dim * m) % 2 for m in self.dim_mult[1:]):
            raise ValueError(f"WanVAEConfig: decoder widths {self.decoder_dim} * {self.dim_mult} must be even")

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def wan21(cls, **overrides: Any) -> "WanVAEConfig":
        """The Wan 2.1 VAE shipped with LongCat-Video (and Wan 2.1): 8x spatial, 4x temporal."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "WanVAEConfig":
        """A few-thousand-parameter VAE with the real topology, for tests."""
        z_dim = overrides.pop("z_dim", 4)
        fields: dict[str, Any] = dict(
            base_dim=8,
            z_dim=z_dim,
            dim_mult=(1, 2, 4, 4),
            num_res_blocks=1,
            temporal_downsample=(False, True, True),
            latents_mean=tuple(0.1 * (i - z_dim / 2) for i in range(z_dim)),
            latents_std=tuple(0.5 + 0.25 * i for i in range(z_dim)),
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "WanVAEConfig":
        """Read diffusers' AutoencoderKLWan config.json (missing keys take diffusers' defaults).

        Keys starting with "_" are bookkeeping and ignored; unknown keys are ignored with one warning
        (as diffusers does); values of variants this port does not implement (Wan 2.2's is_residual /
        patch_size, attn_scales) and values of the wrong type raise ValueError.
        """
        from jaxvid.models.hf_config import check_field_types, drop_unknown_keys

        what = "AutoencoderKLWan config.json"
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # _class_name, _diffusers_version, ...
        fixed = {"attn_scales": [], "is_residual": False, "patch_size": None}
        for key, supported in fixed.items():
            if key in d and d[key] != supported and not (key == "attn_scales" and not d[key]):
                raise ValueError(
                    f"AutoencoderKLWan config {key}={d[key]!r} is not supported (Wan 2.2 / attention-in-encoder "
                    f"variants); expected {supported!r}"
                )
        renames = {"temperal_downsample": "temporal_downsample"}
        known = {
            "base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample",
            "in_channels", "out_channels", "latents_mean", "latents_std",
        }
        ignored = {"dropout", "scale_factor_temporal", "scale_factor_spatial", *fixed}  # dropout: inference only
        d = drop_unknown_keys(d, known | ignored, what=what)
        kwargs = {renames.get(key, key): d[key] for key in known & set(d)}
        cfg = cls(**check_field_types(cls, kwargs, what=what))
        for key, got in (("scale_factor_temporal", cfg.temporal_compression), ("scale_factor_spatial", cfg.spatial_compression)):
            if d.get(key) is not None and d[key] != got:
                raise ValueError(f"AutoencoderKLWan config {key}={d[key]!r} contradicts the topology, which gives {got}")
        return cfg

    # -- derived layout (shared with convert/keymaps/vae_wan.py) ----------------------------------
    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def encoder_layout(self) -> list[tuple[str, int, int | str]]:
        """Encoder `down_blocks` in order: ("res", in_dim, out_dim) or ("resample", dim, mode)."""
        dims = [self.base_dim * m for m in (1, *self.dim_mult)]
        out: list[tuple[str, int, int | str]] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(self.num_res_blocks):
                out.append(("res", in_dim, out_dim))
                in_dim = out_dim
            if i != len(self.dim_mult) - 1:
                out.append(("resample", out_dim, "downsample3d" if self.temporal_downsample[i] else "downsample2d"))
        return out

    def decoder_layout(self) -> list[tuple[int, int, str | None]]:
        """Decoder `up_blocks` in order: (in_dim, out_dim, upsample mode or None)."""
        dims = [self.decoder_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        temporal_upsample = self.temporal_downsample[::-1]
        out: list[tuple[int, int, str | None]] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # Wan 2.1: the previous block's upsampler halved the channels
            mode = None
            if i != len(self.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            out.append((in_dim, out_dim, mode))
        return out

    @property
    def encoder_out_dim(self) -> int:
        return self.base_dim * self.dim_mult[-1]


# ---------------------------------------------------------------------------------------------
# Layers (all channels-last: x [B, T, H, W, C])
# ---------------------------------------------------------------------------------------------


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype: Any) -> nnx.Param:
    bound = 1.0 / math.sqrt(fan_in)
    uniform = abstract.initializer(functools.partial(jax.random.uniform, minval=-bound, maxval=bound))
    return nnx.Param(uniform(rngs.params(), shape, dtype))


class CausalConv3d(nnx.Module):
    """3D conv, causal in time: `2 * padding_t` frames of left context, symmetric spatial padding.

    kernel: [kt, kh, kw, in, out] (DHWIO). `__call__(x [B, T, H, W, I], cache) -> (y, new_cache)`:
    `cache` [B, 2*padding_t, H, W, I] holds the frames before x (None = zeros, the first chunk);
    `new_cache` is the last 2*padding_t frames of [cache, x] (None when padding_t == 0).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel: tuple[int, int, int],
        *,
        stride: tuple[int, int, int] = (1, 1, 1),
        padding: tuple[int, int, int] = (0, 0, 0),
        cfg: WanVAEConfig,
        rngs: nnx.Rngs,
    ):
        self.context = 2 * padding[0]
        self.spatial_padding = ((padding[1], padding[1]), (padding[2], padding[2]))
        self.stride = stride
        self.dtype = cfg.dtype
        fan_in = in_dim * kernel[0] * kernel[1] * kernel[2]
        self.kernel = _init(rngs, (*kernel, in_dim, out_dim), fan_in, cfg.param_dtype)
        self.bias = _init(rngs, (out_dim,), fan_in, cfg.param_dtype)

    def conv(self, x: Array) -> Array:
        """The conv alone: valid in time, the configured spatial padding. x [B, T, H, W, I]."""
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=self.stride,
            padding=((0, 0), *self.spatial_padding),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + self.bias[...].astype(self.dtype)

    def __call__(self, x: Array, cache: Array | None = None) -> tuple[Array, Array | None]:
        if self.context == 0:
            return self.conv(x), None
        if cache is None:
            cache = jnp.zeros((x.shape[0], self.context, *x.shape[2:]), x.dtype)
        x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        return self.conv(x), x[:, -self.context :]


class Conv2d(nnx.Module):
    """Per-frame 2D conv. kernel [kh, kw, in, out] (HWIO); x [N, H, W, in] -> [N, H', W', out]."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, *, stride: int = 1, padding: int = 0,
                 cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.stride = stride
        self.padding = padding
        self.dtype = cfg.dtype
        fan_in = in_dim * kernel * kernel
        self.kernel = _init(rngs, (kernel, kernel, in_dim, out_dim), fan_in, cfg.param_dtype)
        self.bias = _init(rngs, (out_dim,), fan_in, cfg.param_dtype)

    def __call__(self, x: Array) -> Array:
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """Wan's RMS norm: x / ||x||_2 over channels (last axis) * sqrt(C) * gamma, computed in fp32."""

    def __init__(self, dim: int, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        del rngs
        self.scale = dim**0.5
        self.dtype = cfg.dtype
        self.gamma = nnx.Param(abstract.ones((dim,), cfg.param_dtype))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        # diffusers normalises in fp32 and casts back before the scale (LongCat's copy stays in x.dtype).
        normalized = (x32 / jnp.maximum(norm, _NORM_EPS)).astype(self.dtype)
        return normalized * self.scale * self.gamma[...].astype(self.dtype)


class ResidualBlock(nnx.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a (1x1x1 conv) shortcut.

    `__call__(x [B, T, H, W, in], cache (c1, c2) | None) -> (y [B, T, H, W, out], new cache)`.
    """

    def __init__(self, in_dim: int, out_dim: int, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(in_dim, cfg=cfg, rngs=rngs)
        self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), padding=(1, 1, 1), cfg=cfg, rngs=rngs)
        self.norm2 = RMSNorm(out_dim, cfg=cfg, rngs=rngs)
        self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), padding=(1, 1, 1), cfg=cfg, rngs=rngs)
        self.conv_shortcut = (
            CausalConv3d(in_dim, out_dim, (1, 1, 1), cfg=cfg, rngs=rngs) if in_dim != out_dim else None
        )

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        c1, c2 = (None, None) if cache is None else cache
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        x, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        # dropout: inference only
        x, c2 = self.conv2(jax.nn.silu(self.norm2(x)), c2)
        return x + h, (c1, c2)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H*W positions of each frame (no mixing across time)."""

    def __init__(self, dim: int, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, cfg=cfg, rngs=rngs)
        self.to_qkv = Conv2d(dim, 3 * dim, 1, cfg=cfg, rngs=rngs)
        self.proj = Conv2d(dim, dim, 1, cfg=cfg, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, t, h, w, c = x.shape
        frames = x.reshape(b * t, h, w, c)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, h * w, 1, 3 * c)  # [N, S, heads=1, 3C]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = attend(q, k, v, scale=1.0 / math.sqrt(c)).reshape(b * t, h, w, c)
        return self.proj(out).reshape(b, t, h, w, c) + x


def _upsample_nearest2x(x: Array) -> Array:
    """[N, H, W, C] -> [N, 2H, 2W, C]; nearest-exact at an integer factor of 2 repeats each pixel."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Resample(nnx.Module):
    """Spatial (and optionally temporal) up/down-sampling by 2.

    upsample: nearest 2x + 3x3 conv to `dim // 2` channels; "upsample3d" first doubles time with a
    causal (3,1,1) conv to 2*dim channels read as two frames, except on the first chunk.
    downsample: zero-pad right/bottom + 3x3 stride-2 conv; "downsample3d" then halves time with a
    (3,1,1) stride-2 conv over [previous chunk's last frame, x], except on the first chunk.
    `__call__(x [B, T, H, W, dim], cache) -> (y, new cache)`.
    """

    def __init__(self, dim: int, mode: ResampleMode, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"Resample: mode={mode!r}; expected upsample2d/3d or downsample2d/3d")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = Conv2d(dim, dim // 2, 3, padding=1, cfg=cfg, rngs=rngs)
        else:
            self.resample = Conv2d(dim, dim, 3, stride=2, cfg=cfg, rngs=rngs)
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), cfg=cfg, rngs=rngs)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), cfg=cfg, rngs=rngs)
        else:
            self.time_conv = None

    def _spatial(self, x: Array) -> Array:
        b, t, h, w, c = x.shape
        frames = x.reshape(b * t, h, w, c)
        if self.mode.startswith("up"):
            frames = _upsample_nearest2x(frames)
        else:
            frames = jnp.pad(frames, ((0, 0), (0, 1), (0, 1), (0, 0)))
        y = self.resample(frames)
        return y.reshape(b, t, *y.shape[1:])

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        if self.mode == "upsample3d":
            if cache is None:
                # diffusers' "Rep" marker: the first chunk is not doubled in time, and the next
                # chunk's time conv sees zeros as its left context.
                new_cache = jnp.zeros((x.shape[0], CACHE_FRAMES, *x.shape[2:]), x.dtype)
            else:
                y, new_cache = self.time_conv(x, cache)
                b, t, h, w, _ = y.shape
                # channels [0:C] are the first of the two output frames, [C:2C] the second
                y = y.reshape(b, t, h, w, 2, -1).transpose(0, 1, 4, 2, 3, 5)
                x = y.reshape(b, 2 * t, h, w, -1)
            return self._spatial(x), new_cache
        x = self._spatial(x)
        if self.mode == "downsample3d":
            new_cache = x[:, -1:]
            if cache is not None:
                x = self.time_conv.conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))
            return x, new_cache
        return x, None


class MidBlock(nnx.Module):
    """resnets[0] -> attentions[0] -> resnets[1] at the lowest resolution."""

    def __init__(self, dim: int, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, cfg=cfg, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, cfg=cfg, rngs=rngs)])

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        c0, c1 = (None, None) if cache is None else cache
        x, c0 = self.resnets[0](x, c0)
        x = self.attentions[0](x)
        x, c1 = self.resnets[1](x, c1)
        return x, (c0, c1)


class Encoder3d(nnx.Module):
    """frames chunk [B, T, H, W, in_channels] -> [B, T', H/s, W/s, 2*z_dim] (mean and log-variance)."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.conv_in = CausalConv3d(cfg.in_channels, cfg.base_dim, (3, 3, 3), padding=(1, 1, 1), cfg=cfg, rngs=rngs)
        blocks: list[nnx.Module] = []
        for kind, a, b in cfg.encoder_layout():
            if kind == "res":
                blocks.append(ResidualBlock(a, b, cfg=cfg, rngs=rngs))
            else:
                blocks.append(Resample(a, b, cfg=cfg, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        dim = cfg.encoder_out_dim
        self.mid_block = MidBlock(dim, cfg=cfg, rngs=rngs)
        self.norm_out = RMSNorm(dim, cfg=cfg, rngs=rngs)
        self.conv_out = CausalConv3d(dim, 2 * cfg.z_dim, (3, 3, 3), padding=(1, 1, 1), cfg=cfg, rngs=rngs)

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        c_in, c_blocks, c_mid, c_out = (None, (None,) * len(self.down_blocks), None, None) if cache is None else cache
        x, c_in = self.conv_in(x, c_in)
        new_blocks = []
        for block, c in zip(self.down_blocks, c_blocks):
            x, c = block(x, c)
            new_blocks.append(c)
        x, c_mid = self.mid_block(x, c_mid)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c_out)
        return x, (c_in, tuple(new_blocks), c_mid, c_out)


class UpBlock(nnx.Module):
    """num_res_blocks + 1 residual blocks, then an optional upsampler (`upsamplers[0]`)."""

    def __init__(self, in_dim: int, out_dim: int, mode: str | None, *, cfg: WanVAEConfig, rngs: nnx.Rngs):
        resnets = []
        for _ in range(cfg.num_res_blocks + 1):
            resnets.append(ResidualBlock(in_dim, out_dim, cfg=cfg, rngs=rngs))
            in_dim = out_dim
        self.resnets = nnx.List(resnets)
        self.upsamplers = nnx.List([Resample(out_dim, mode, cfg=cfg, rngs=rngs)]) if mode else None

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        c_res, c_up = ((None,) * len(self.resnets), None) if cache is None else cache
        new_res = []
        for resnet, c in zip(self.resnets, c_res):
            x, c = resnet(x, c)
            new_res.append(c)
        if self.upsamplers is not None:
            x, c_up = self.upsamplers[0](x, c_up)
        return x, (tuple(new_res), c_up)


class Decoder3d(nnx.Module):
    """latent chunk [B, T, h, w, z_dim] -> frames [B, T', h*s, w*s, out_channels] (unclamped)."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        layout = cfg.decoder_layout()
        top = layout[0][0]
        self.conv_in = CausalConv3d(cfg.z_dim, top, (3, 3, 3), padding=(1, 1, 1), cfg=cfg, rngs=rngs)
        self.mid_block = MidBlock(top, cfg=cfg, rngs=rngs)
        self.up_blocks = nnx.List([UpBlock(i, o, m, cfg=cfg, rngs=rngs) for i, o, m in layout])
        out_dim = layout[-1][1]
        self.norm_out = RMSNorm(out_dim, cfg=cfg, rngs=rngs)
        self.conv_out = CausalConv3d(out_dim, cfg.out_channels, (3, 3, 3), padding=(1, 1, 1), cfg=cfg, rngs=rngs)

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        c_in, c_mid, c_blocks, c_out = (None, None, (None,) * len(self.up_blocks), None) if cache is None else cache
        x, c_in = self.conv_in(x, c_in)
        x, c_mid = self.mid_block(x, c_mid)
        new_blocks = []
        for block, c in zip(self.up_blocks, c_blocks):
            x, c = block(x, c)
            new_blocks.append(c)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c_out)
        return x, (c_in, c_mid, tuple(new_blocks), c_out)


# ---------------------------------------------------------------------------------------------
# Chunked streaming and the model
# ---------------------------------------------------------------------------------------------


def _stream(step: Callable[[Array, Cache], tuple[Array, Cache]], first: Array, rest: Array | None) -> Array:
    """Run `step` on `first` with an empty cache, then `lax.scan` it over `rest` carrying the cache.

    first: [B, t0, ...]; rest: [N, B, t, ...] or None -> [B, t0' + N * t', ...] (outputs in time order).
    """
    y0, cache = step(first, None)
    if rest is None:
        return y0

    def body(carry: Cache, chunk: Array) -> tuple[Cache, Array]:
        y, carry = step(chunk, carry)
        return carry, y

    _, ys = jax.lax.scan(body, cache, rest)  # [N, B, t', ...]
    ys = jnp.moveaxis(ys, 0, 1)
    ys = ys.reshape(ys.shape[0], ys.shape[1] * ys.shape[2], *ys.shape[3:])
    return jnp.concatenate([y0, ys.astype(y0.dtype)], axis=1)


def _split_chunks(x: Array, chunk: int) -> tuple[Array, Array | None]:
    """[B, 1 + N*chunk, ...] -> first frame [B, 1, ...], rest [N, B, chunk, ...] (None if N == 0)."""
    first, rest = x[:, :1], x[:, 1:]
    n = rest.shape[1] // chunk
    if n == 0:
        return first, None
    rest = rest.reshape(rest.shape[0], n, chunk, *rest.shape[2:])
    return first, jnp.moveaxis(rest, 1, 0)


class AutoencoderKLWan(nnx.Module):
    """The Wan 2.1 VAE: `encode` frames to latent moments / latents, `decode` latents to frames.

    Parameter names follow diffusers' checkpoint (encoder.down_blocks.3.conv1, decoder.up_blocks.0.
    upsamplers.0.time_conv, quant_conv, ...) with `weight` -> `kernel` and `resample.1` -> `resample`.
    """

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder3d(cfg, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), cfg=cfg, rngs=rngs)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), cfg=cfg, rngs=rngs)
        self.decoder = Decoder3d(cfg, rngs=rngs)

    # -- checks ----------------------------------------------------------------------------------
    def _check_frames(self, frames: Array) -> None:
        cfg = self.cfg
        if frames.ndim != 5 or frames.shape[1] != cfg.in_channels:
            raise ValueError(f"frames.shape={tuple(frames.shape)}; expected [B, {cfg.in_channels}, F, H, W]")
        f, h, w = frames.shape[2:]
        if f < 1 or (f - 1) % ENCODE_CHUNK_FRAMES:
            raise ValueError(
                f"frames has F={f} frames; the Wan VAE encodes 1 + {ENCODE_CHUNK_FRAMES}k frames (1, 5, 9, ...)"
            )
        s = cfg.spatial_compression
        if h % s or w % s:
            raise ValueError(f"frames has H x W = {h} x {w}; both must be multiples of {s}")

    def _check_latents(self, latents: Array) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.cfg.z_dim or latents.shape[2] < 1:
            raise ValueError(f"latents.shape={tuple(latents.shape)}; expected [B, {self.cfg.z_dim}, F', h, w] with F' >= 1")

    # -- public API ------------------------------------------------------------------------------
    def encode_moments(self, frames: Array) -> Array:
        """frames [B, C, 1 + 4k, H, W] in [-1, 1] -> moments [B, 2z, 1 + k * 4 / tc, H / s, W / s].

        tc = cfg.temporal_compression, s = cfg.spatial_compression (4 and 8 for Wan 2.1, so 93
        frames give 24 latent frames). This is diffusers' `_encode` result: channels [0:z] the
        posterior mean, [z:2z] its log-variance (unclamped).
        """
        self._check_frames(frames)
        x = jnp.moveaxis(frames.astype(self.cfg.dtype), 1, -1)  # [B, F, H, W, C]
        first, rest = _split_chunks(x, ENCODE_CHUNK_FRAMES)
        moments = _stream(self.encoder, first, rest)
        moments, _ = self.quant_conv(moments)
        return jnp.moveaxis(moments, -1, 1)

    def encode(self, frames: Array, *, key: Array | None = None) -> Array:
        """frames [B, C, F, H, W] -> latents [B, z, F', H/8, W/8] (not normalised).

        key None: the posterior mean (diffusers' `latent_dist.mode()`); with a key: a sample
        mean + exp(logvar/2) * noise with logvar clamped to [-30, 20] (`latent_dist.sample()`,
        which LongCat's pipeline uses for conditioning frames).
        """
        return latents_from_moments(self.encode_moments(frames), key=key)

    def decode(self, latents: Array) -> Array:
        """latents [B, z, F', h, w] (denormalised) -> frames [B, C, 1 + (F'-1) * tc, h * s, w * s] in [-1, 1].

        One latent frame per chunk, as diffusers' `_decode` (tc = 4, s = 8 for Wan 2.1).
        """
        self._check_latents(latents)
        z = jnp.moveaxis(latents.astype(self.cfg.dtype), 1, -1)  # [B, F', h, w, z]
        z, _ = self.post_quant_conv(z)
        first, rest = _split_chunks(z, 1)
        frames = _stream(self.decoder, first, rest)
        return jnp.moveaxis(jnp.clip(frames, -1.0, 1.0), -1, 1)

    def normalize_latents(self, latents: Array) -> Array:
        return normalize_latents(latents, self.cfg)

    def denormalize_latents(self, latents: Array) -> Array:
        return denormalize_latents(latents, self.cfg)


def latents_from_moments(moments: Array, *, key: Array | None = None) -> Array:
    """moments [B, 2z, ...] (mean, log-variance) -> latents [B, z, ...]: the mean, or a sample with `key`.

    Like diffusers' DiagonalGaussianDistribution: logvar is clamped to [-30, 20] before sampling.
    """
    mean, logvar = jnp.split(moments, 2, axis=1)
    if key is None:
        return mean
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    return mean + std * jax.random.normal(key, mean.shape, mean.dtype)


# ---------------------------------------------------------------------------------------------
# Latent normalisation (LongCat pipeline's normalize_latents / denormalize_latents)
# ---------------------------------------------------------------------------------------------


def _stats(latents: Array, cfg: WanVAEConfig) -> tuple[Array, Array]:
    if latents.ndim != 5 or latents.shape[1] != cfg.z_dim:
        raise ValueError(f"latents.shape={tuple(latents.shape)}; expected [B, {cfg.z_dim}, F, h, w]")
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = jnp.asarray(cfg.latents_mean, jnp.float32).astype(latents.dtype).reshape(shape)
    # upstream casts std to the latents' dtype first, then takes the reciprocal in that dtype
    inv_std = 1.0 / jnp.asarray(cfg.latents_std, jnp.float32).astype(latents.dtype).reshape(shape)
    return mean, inv_std


def normalize_latents(latents: Array, cfg: WanVAEConfig) -> Array:
    """VAE latents [B, z, F, h, w] -> DiT latents: (latents - mean) * (1 / std), in latents.dtype."""
    mean, inv_std = _stats(latents, cfg)
    return (latents - mean) * inv_std


def denormalize_latents(latents: Array, cfg: WanVAEConfig) -> Array:
    """DiT latents [B, z, F, h, w] -> VAE latents: latents / (1 / std) + mean, in latents.dtype."""
    mean, inv_std = _stats(latents, cfg)
    return latents / inv_std + mean


_JITTABLE = ("encode_moments", "encode", "decode")


def jitted(model: AutoencoderKLWan, method: Literal["encode_moments", "encode", "decode"]) -> Callable[..., Array]:
    """`model.<method>(x, **kw)` jitted with the weights as an argument (one compile per input shape).

    e.g. `decode = jitted(vae, "decode"); frames = decode(latents)`;
    `encode = jitted(vae, "encode"); z = encode(frames, key=jax.random.key(0))`.
    """
    if method not in _JITTABLE:
        raise ValueError(f"method={method!r}; expected one of {_JITTABLE}")
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state: nnx.State, x: Array, **kwargs: Any) -> Array:
        return getattr(nnx.merge(graphdef, state), method)(x, **kwargs)

    return lambda x, **kwargs: run(state, x, **kwargs)
