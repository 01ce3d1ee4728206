"""CogVideoX's causal 3D VAE (diffusers' `AutoencoderKLCogVideoX`) in Flax NNX.

Public layout: videos and latents are `[B, C, F, H, W]` exactly as diffusers takes them; frames are
in [-1, 1]. Internally every tensor is channels-last `[B, F, H, W, C]` (the layout XLA's GPU
convolutions prefer); `encode` / `decode` transpose once at the boundary.

Temporal structure (as upstream): causal 3D convolutions pad time on the left by repeating the
first frame; a video is processed in frame batches (8 frames per batch when encoding, 2 latent
frames when decoding; the first batch also takes the remainder, e.g. 9 frames or 3 latents), and
every causal conv hands the last `k - 1` input frames of one batch to the next (the "conv cache").
GroupNorm statistics are taken over (channels of a group, frames of the batch, H, W), so they
depend on the batch split, which is why we follow it exactly. The first batch is traced on its
own, the rest run as one `lax.scan` carrying the cache, so compile time does not grow with length.

Spatial tiling (`CogVideoXVAETiling`) reproduces diffusers' `tiled_encode` / `tiled_decode`:
overlapping tiles, each run through the full frame-batch loop, blended linearly with the tile
above and to the left (using the already-blended neighbours, as upstream's in-place blend does),
then cropped and stitched. Tiles of equal shape are stacked and run with `lax.map`, so each
distinct tile shape is traced once and only one tile is live at a time. Unlike upstream, each tile
keeps exactly one stride of output and tiles start on the latent grid, so the output always has
the untiled size (upstream's 32 x 32 video with 16 px tiles comes out 36 x 34); for the released
VAEs' default tiling the two geometries are the same.

Not ported (inactive in every released CogVideoX VAE): quant_conv / post_quant_conv, latents
mean/std, temb, dropout. `CogVideoXSafeConv3d`'s chunking is a PyTorch memory workaround with
the same math; XLA plans memory itself.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvid.models import abstract

Array = jax.Array
Cache = dict[str, Any]

_DOWN_BLOCK = "CogVideoXDownBlock3D"
_UP_BLOCK = "CogVideoXUpBlock3D"
# config.json keys that carry no architecture information.
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "architectures", "sample_size"}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CogVideoXVAEConfig:
    """Architecture of `AutoencoderKLCogVideoX` (field names follow diffusers' config.json).

    `latent_frames_batch_size` / `sample_frames_batch_size` are upstream's hard-coded
    `num_latent_frames_batch_size = 2` / `num_sample_frames_batch_size = 8`: the VAE was trained
    with these splits, so change them only to experiment.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    temporal_compression_ratio: int = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    invert_scale_latents: bool = False
    force_upcast: bool = True
    latent_frames_batch_size: int = 2
    sample_frames_batch_size: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
                     "sample_height", "sample_width", "latent_frames_batch_size", "sample_frames_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CogVideoXVAEConfig.{name}={value!r}: expected a positive int")
        if len(self.block_out_channels) < 1 or min(self.block_out_channels) < 1:
            raise ValueError(
                f"CogVideoXVAEConfig.block_out_channels={self.block_out_channels!r}: expected positive ints"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"CogVideoXVAEConfig.block_out_channels={self.block_out_channels!r}: every entry must be divisible "
                f"by norm_num_groups={self.norm_num_groups}"
            )
        ratio = self.temporal_compression_ratio
        if not isinstance(ratio, int) or ratio < 1 or ratio & (ratio - 1):
            raise ValueError(f"CogVideoXVAEConfig.temporal_compression_ratio={ratio!r}: expected a power of two >= 1")
        if self.temporal_compress_level > len(self.block_out_channels) - 1:
            raise ValueError(
                f"CogVideoXVAEConfig.temporal_compression_ratio={ratio}: needs at least "
                f"{self.temporal_compress_level + 1} blocks, block_out_channels has {len(self.block_out_channels)}"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"CogVideoXVAEConfig.norm_eps={self.norm_eps!r}: expected > 0")

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along H and W (8 for the released VAEs)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_compress_level(self) -> int:
        """How many down/up blocks also halve/double time (log2 of temporal_compression_ratio)."""
        return int(math.log2(self.temporal_compression_ratio))

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> CogVideoXVAEConfig:
        """Read diffusers' `vae/config.json`; raises on features this port does not implement and on
        values of the wrong type; unknown keys are ignored with one warning, as diffusers does."""
        from jaxvid.models.hf_config import check_field_types, drop_unknown_keys

        what = "CogVideoX VAE config.json"
        d = {k: v for k, v in d.items() if k not in _BOOKKEEPING and not k.startswith("_")}
        # Known keys that are not fields: each must have the one value this port implements.
        checks = {
            "act_fn": lambda v, n: v == "silu",
            "use_quant_conv": lambda v, n: not v,
            "use_post_quant_conv": lambda v, n: not v,
            "latents_mean": lambda v, n: v is None,
            "latents_std": lambda v, n: v is None,
            "down_block_types": lambda v, n: isinstance(v, (list, tuple)) and list(v) == [_DOWN_BLOCK] * n,
            "up_block_types": lambda v, n: isinstance(v, (list, tuple)) and list(v) == [_UP_BLOCK] * n,
        }
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
        d = drop_unknown_keys(d, names | set(checks), what=what)
        ratio = d.get("temporal_compression_ratio")
        if isinstance(ratio, float) and ratio.is_integer():
            d["temporal_compression_ratio"] = int(ratio)  # diffusers annotates it float and writes 4.0
        d = check_field_types(cls, d, what=what)
        n = len(d.get("block_out_channels", (128, 256, 256, 512)))
        for key, ok in checks.items():
            if key in d and not ok(d[key], n):
                raise ValueError(f"{what}: {key}={d[key]!r} is not supported by jaxvid's CogVideoX VAE")
            d.pop(key, None)
        return cls(**d)

    @classmethod
    def cogvideox_2b(cls, **overrides: Any) -> CogVideoXVAEConfig:
        """THUDM/CogVideoX-2b/vae."""
        return cls(**{"scaling_factor": 1.15258426, **overrides})

    @classmethod
    def cogvideox_5b(cls, **overrides: Any) -> CogVideoXVAEConfig:
        """THUDM/CogVideoX-5b/vae (and -5b-I2V): same weights layout, latents scaled by 0.7."""
        return cls(**{"scaling_factor": 0.7, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> CogVideoXVAEConfig:
        """A few-thousand-parameter VAE with the full structure (2x time, 4x space), for tests."""
        base = dict(
            latent_channels=4,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            norm_num_groups=4,
            sample_height=32,
            sample_width=32,
        )
        return cls(**{**base, **overrides})


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CogVideoXVAETiling:
    """Spatial tiling as diffusers' `enable_tiling(...)` sets it; hashable, so it can be a static jit arg.

    Tiles are `sample_min_height x sample_min_width` pixels (that divided by the spatial
    compression in latents); neighbouring tiles overlap by the given fractions. Tiling only kicks
    in when the input is larger than one tile, as upstream.
    """

    sample_min_height: int
    sample_min_width: int
    overlap_factor_height: float = 1 / 6
    overlap_factor_width: float = 1 / 5

    def __post_init__(self) -> None:
        for name in ("sample_min_height", "sample_min_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CogVideoXVAETiling.{name}={value!r}: expected a positive int")
        for name in ("overlap_factor_height", "overlap_factor_width"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"CogVideoXVAETiling.{name}={value!r}: expected a fraction in [0, 1)")

    @classmethod
    def default(cls, cfg: CogVideoXVAEConfig) -> CogVideoXVAETiling:
        """diffusers' `vae.enable_tiling()` defaults: half the training resolution, 1/6 and 1/5 overlap."""
        return cls(sample_min_height=cfg.sample_height // 2, sample_min_width=cfg.sample_width // 2)


class LatentDistribution(NamedTuple):
    """Diagonal Gaussian posterior; `mean` / `logvar` are `[B, latent_channels, F', H', W']`."""

    mean: Array
    logvar: Array  # clamped to [-30, 20] as upstream

    def mode(self) -> Array:
        return self.mean

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: Array) -> Array:
        noise = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * noise


# ----------------------------------------------------------------------------------------- layers


_LECUN_NORMAL = abstract.initializer(nnx.initializers.lecun_normal())


def _conv_init(shape: tuple[int, ...], cfg: CogVideoXVAEConfig, rngs: nnx.Rngs) -> nnx.Param:
    return nnx.Param(_LECUN_NORMAL(rngs.params(), shape, cfg.param_dtype))


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over channels-last video: statistics per (sample, group) over F, H, W.

    x: [B, F, H, W, C] -> same; statistics in float32 whatever the compute dtype.
    """

    def __init__(self, cfg: CogVideoXVAEConfig, channels: int, *, eps: float, rngs: nnx.Rngs):
        self.groups = cfg.norm_num_groups
        self.eps = eps
        self.weight = nnx.Param(abstract.ones((channels,), cfg.param_dtype))
        self.bias = nnx.Param(abstract.zeros((channels,), cfg.param_dtype))

    def __call__(self, x: Array) -> Array:
        *lead, c = x.shape
        xg = x.astype(jnp.float32).reshape(*lead, self.groups, c // self.groups)
        axes = tuple(range(1, len(lead))) + (len(lead) + 1,)
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class CausalConv3d(nnx.Module):
    """CogVideoXCausalConv3d (pad_mode "first"): k x k x k conv, causal in time, 'same' in space.

    x: [B, F, H, W, Cin] -> [B, F, H, W, Cout]. Time is padded on the left with `cache` (the last
    k-1 input frames of the previous frame batch) or, for the first batch, k-1 copies of frame 0.
    Returns (y, new_cache) where new_cache holds the last k-1 padded input frames ({} for k = 1).
    """

    def __init__(
        self, cfg: CogVideoXVAEConfig, in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs
    ):
        self.kernel_size = kernel_size
        self.dtype = cfg.dtype
        self.kernel = _conv_init((kernel_size,) * 3 + (in_channels, out_channels), cfg, rngs)
        self.bias = nnx.Param(abstract.zeros((out_channels,), cfg.param_dtype))

    def __call__(self, x: Array, cache: Cache | None = None) -> tuple[Array, Cache]:
        k = self.kernel_size
        new_cache: Cache = {}
        if k > 1:
            past = cache["frames"] if cache else jnp.repeat(x[:, :1], k - 1, axis=1)
            x = jnp.concatenate([past.astype(x.dtype), x], axis=1)
            new_cache = {"frames": x[:, -(k - 1):]}
        pad = (k - 1) // 2
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(1, 1, 1),
            padding=((0, 0), (pad, pad), (pad, pad)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + self.bias[...].astype(self.dtype), new_cache


class PointwiseConv3d(nnx.Module):
    """A 1x1x1 Conv3d (the resnet shortcut when channels change). x: [..., Cin] -> [..., Cout]."""

    def __init__(self, cfg: CogVideoXVAEConfig, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.dtype = cfg.dtype
        self.kernel = _conv_init((1, 1, 1, in_channels, out_channels), cfg, rngs)
        self.bias = nnx.Param(abstract.zeros((out_channels,), cfg.param_dtype))

    def __call__(self, x: Array) -> Array:
        w = self.kernel[...].astype(self.dtype)[0, 0, 0]
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), w) + self.bias[...].astype(self.dtype)


def _conv2d_per_frame(x: Array, kernel: Array, bias: Array, *, stride: int, padding: int) -> Array:
    """A 2D conv applied to every frame. x: [B, F, H, W, Cin], kernel [kh, kw, Cin, Cout]."""
    b, f = x.shape[:2]
    y = jax.lax.conv_general_dilated(
        x.reshape(b * f, *x.shape[2:]),
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return (y + bias).reshape(b, f, *y.shape[1:])


def _upsample_space(x: Array) -> Array:
    """Nearest 2x along H and W. x: [B, F, H, W, C] -> [B, F, 2H, 2W, C]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)


class Downsample3D(nnx.Module):
    """CogVideoXDownsample3D: optional 2x average pool in time (frame 0 kept alone when F is odd),
    then a 3x3 stride-2 conv per frame after zero-padding H and W by one on the far side.

    x: [B, F, H, W, C] -> [B, F', H // 2, W // 2, C]; F' = F // 2 (F even) or 1 + (F - 1) // 2 (F odd),
    F' = F without compress_time.
    """

    def __init__(self, cfg: CogVideoXVAEConfig, channels: int, *, compress_time: bool, rngs: nnx.Rngs):
        self.compress_time = compress_time
        self.dtype = cfg.dtype
        self.kernel = _conv_init((3, 3, channels, channels), cfg, rngs)
        self.bias = nnx.Param(abstract.zeros((channels,), cfg.param_dtype))

    def __call__(self, x: Array) -> Array:
        if self.compress_time:
            first, rest = (x[:, :1], x[:, 1:]) if x.shape[1] % 2 == 1 else (x[:, :0], x)
            if rest.shape[1] > 0:
                rest = (rest[:, 0::2] + rest[:, 1::2]) * 0.5
            x = jnp.concatenate([first, rest], axis=1)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
        kernel, bias = self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)
        return _conv2d_per_frame(x.astype(self.dtype), kernel, bias, stride=2, padding=0)


class Upsample3D(nnx.Module):
    """CogVideoXUpsample3D: nearest 2x in space, and in time too when compress_time (frame 0 is
    only upsampled in space when F is odd, so 1 + 2k frames become 1 + 4k); then a 3x3 conv per frame.

    x: [B, F, H, W, C] -> [B, F', 2H, 2W, C].
    """

    def __init__(self, cfg: CogVideoXVAEConfig, channels: int, *, compress_time: bool, rngs: nnx.Rngs):
        self.compress_time = compress_time
        self.dtype = cfg.dtype
        self.kernel = _conv_init((3, 3, channels, channels), cfg, rngs)
        self.bias = nnx.Param(abstract.zeros((channels,), cfg.param_dtype))

    def __call__(self, x: Array) -> Array:
        f = x.shape[1]
        x = _upsample_space(x)
        if self.compress_time and f > 1:
            if f % 2 == 1:
                x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
            else:
                x = jnp.repeat(x, 2, axis=1)
        kernel, bias = self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)
        return _conv2d_per_frame(x.astype(self.dtype), kernel, bias, stride=1, padding=1)


def _nearest_index(out_size: int, in_size: int) -> np.ndarray:
    # torch's 'nearest': src = floor(dst * in / out); all ratios met here are integers.
    return (np.arange(out_size) * in_size) // out_size


def _resize_nearest(z: Array, f: int, h: int, w: int) -> Array:
    """Nearest resize of [B, F, H, W, C] to [B, f, h, w, C] (F.interpolate(..., size=(f, h, w)))."""
    for axis, size in ((1, f), (2, h), (3, w)):
        n = z.shape[axis]
        if n == size:
            continue
        # An integer ratio (every case in this VAE) is a plain repeat: cheaper than a gather.
        z = jnp.repeat(z, size // n, axis=axis) if size % n == 0 else jnp.take(z, _nearest_index(size, n), axis=axis)
    return z


class SpatialNorm3D(nnx.Module):
    """CogVideoXSpatialNorm3D: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized (nearest) to f.

    When f has an odd number (> 1) of frames, frame 0 of zq maps to frame 0 of f and the rest to
    the rest, matching the causal 1 + 4k frame layout. f: [B, F, H, W, C], zq: [B, Fz, Hz, Wz, Cz].
    """

    def __init__(self, cfg: CogVideoXVAEConfig, f_channels: int, zq_channels: int, *, rngs: nnx.Rngs):
        self.norm_layer = GroupNorm(cfg, f_channels, eps=1e-6, rngs=rngs)
        self.conv_y = CausalConv3d(cfg, zq_channels, f_channels, 1, rngs=rngs)
        self.conv_b = CausalConv3d(cfg, zq_channels, f_channels, 1, rngs=rngs)

    def __call__(self, f: Array, zq: Array) -> Array:
        nf, h, w = f.shape[1:4]
        if nf > 1 and nf % 2 == 1:
            zq = jnp.concatenate(
                [_resize_nearest(zq[:, :1], 1, h, w), _resize_nearest(zq[:, 1:], nf - 1, h, w)], axis=1
            )
        else:
            zq = _resize_nearest(zq, nf, h, w)
        scale, _ = self.conv_y(zq)
        shift, _ = self.conv_b(zq)
        return self.norm_layer(f) * scale + shift


class ResnetBlock3D(nnx.Module):
    """CogVideoXResnetBlock3D: norm, SiLU, causal conv, norm, SiLU, causal conv, plus shortcut.

    Norms are GroupNorm (encoder) or SpatialNorm3D conditioned on the latents zq (decoder).
    x: [B, F, H, W, Cin] -> ([B, F, H, W, Cout], cache).
    """

    def __init__(self, cfg: CogVideoXVAEConfig, in_channels: int, out_channels: int, *,
                 spatial_norm_dim: int | None, rngs: nnx.Rngs):
        if spatial_norm_dim is None:
            self.norm1 = GroupNorm(cfg, in_channels, eps=cfg.norm_eps, rngs=rngs)
            self.norm2 = GroupNorm(cfg, out_channels, eps=cfg.norm_eps, rngs=rngs)
        else:
            self.norm1 = SpatialNorm3D(cfg, in_channels, spatial_norm_dim, rngs=rngs)
            self.norm2 = SpatialNorm3D(cfg, out_channels, spatial_norm_dim, rngs=rngs)
        self.conv1 = CausalConv3d(cfg, in_channels, out_channels, 3, rngs=rngs)
        self.conv2 = CausalConv3d(cfg, out_channels, out_channels, 3, rngs=rngs)
        self.conv_shortcut = (
            PointwiseConv3d(cfg, in_channels, out_channels, rngs=rngs) if in_channels != out_channels else None
        )

    def _norm(self, norm: nnx.Module, x: Array, zq: Array | None) -> Array:
        return norm(x, zq) if isinstance(norm, SpatialNorm3D) else norm(x)

    def __call__(self, x: Array, zq: Array | None = None, cache: Cache | None = None) -> tuple[Array, Cache]:
        cache = cache or {}
        h = jax.nn.silu(self._norm(self.norm1, x, zq))
        h, c1 = self.conv1(h, cache.get("conv1"))
        h = jax.nn.silu(self._norm(self.norm2, h, zq))
        h, c2 = self.conv2(h, cache.get("conv2"))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return h + shortcut.astype(h.dtype), {"conv1": c1, "conv2": c2}


def _run_resnets(resnets: nnx.List, x: Array, zq: Array | None, cache: Cache | None) -> tuple[Array, Cache]:
    cache = cache or {}
    new: Cache = {}
    for i, resnet in enumerate(resnets):
        x, new[str(i)] = resnet(x, zq, cache.get(str(i)))
    return x, new


class DownBlock3D(nnx.Module):
    """CogVideoXDownBlock3D: resnets, then (except in the last block) a Downsample3D."""

    def __init__(self, cfg: CogVideoXVAEConfig, in_channels: int, out_channels: int, *,
                 add_downsample: bool, compress_time: bool, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock3D(cfg, in_channels if i == 0 else out_channels, out_channels, spatial_norm_dim=None, rngs=rngs)
            for i in range(cfg.layers_per_block)
        ])
        self.downsamplers = (
            nnx.List([Downsample3D(cfg, out_channels, compress_time=compress_time, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(self, x: Array, cache: Cache | None = None) -> tuple[Array, Cache]:
        x, cache = _run_resnets(self.resnets, x, None, cache)
        for down in self.downsamplers or ():
            x = down(x)
        return x, cache


class MidBlock3D(nnx.Module):
    """CogVideoXMidBlock3D: two resnets at the bottleneck width (SpatialNorm3D in the decoder)."""

    def __init__(self, cfg: CogVideoXVAEConfig, channels: int, *, spatial_norm_dim: int | None, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock3D(cfg, channels, channels, spatial_norm_dim=spatial_norm_dim, rngs=rngs) for _ in range(2)
        ])

    def __call__(self, x: Array, zq: Array | None = None, cache: Cache | None = None) -> tuple[Array, Cache]:
        return _run_resnets(self.resnets, x, zq, cache)


class UpBlock3D(nnx.Module):
    """CogVideoXUpBlock3D: layers_per_block + 1 SpatialNorm resnets, then (except last) an Upsample3D."""

    def __init__(self, cfg: CogVideoXVAEConfig, in_channels: int, out_channels: int, *,
                 add_upsample: bool, compress_time: bool, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock3D(cfg, in_channels if i == 0 else out_channels, out_channels,
                          spatial_norm_dim=cfg.latent_channels, rngs=rngs)
            for i in range(cfg.layers_per_block + 1)
        ])
        self.upsamplers = (
            nnx.List([Upsample3D(cfg, out_channels, compress_time=compress_time, rngs=rngs)]) if add_upsample else None
        )

    def __call__(self, x: Array, zq: Array, cache: Cache | None = None) -> tuple[Array, Cache]:
        x, cache = _run_resnets(self.resnets, x, zq, cache)
        for up in self.upsamplers or ():
            x = up(x)
        return x, cache


class Encoder3D(nnx.Module):
    """CogVideoXEncoder3D on one frame batch. x: [B, F, H, W, in_channels] ->
    ([B, F', H/s, W/s, 2 * latent_channels] (mean and logvar), cache)."""

    def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
        ch = cfg.block_out_channels
        n = len(ch)
        self.conv_in = CausalConv3d(cfg, cfg.in_channels, ch[0], 3, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock3D(cfg, ch[max(i - 1, 0)], ch[i], add_downsample=i < n - 1,
                        compress_time=i < cfg.temporal_compress_level, rngs=rngs)
            for i in range(n)
        ])
        self.mid_block = MidBlock3D(cfg, ch[-1], spatial_norm_dim=None, rngs=rngs)
        self.norm_out = GroupNorm(cfg, ch[-1], eps=1e-6, rngs=rngs)
        self.conv_out = CausalConv3d(cfg, ch[-1], 2 * cfg.latent_channels, 3, rngs=rngs)

    def __call__(self, x: Array, cache: Cache | None = None) -> tuple[Array, Cache]:
        cache = cache or {}
        new: Cache = {}
        h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        for i, block in enumerate(self.down_blocks):
            h, new[f"down_{i}"] = block(h, cache.get(f"down_{i}"))
        h, new["mid"] = self.mid_block(h, None, cache.get("mid"))
        h = jax.nn.silu(self.norm_out(h))
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return h, new


class Decoder3D(nnx.Module):
    """CogVideoXDecoder3D on one latent frame batch. z: [B, F', H', W', latent_channels] ->
    ([B, F, H' * s, W' * s, out_channels], cache); every norm is conditioned on z itself."""

    def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
        ch = tuple(reversed(cfg.block_out_channels))
        n = len(ch)
        self.conv_in = CausalConv3d(cfg, cfg.latent_channels, ch[0], 3, rngs=rngs)
        self.mid_block = MidBlock3D(cfg, ch[0], spatial_norm_dim=cfg.latent_channels, rngs=rngs)
        self.up_blocks = nnx.List([
            UpBlock3D(cfg, ch[max(i - 1, 0)], ch[i], add_upsample=i < n - 1,
                      compress_time=i < cfg.temporal_compress_level, rngs=rngs)
            for i in range(n)
        ])
        self.norm_out = SpatialNorm3D(cfg, ch[-1], cfg.latent_channels, rngs=rngs)
        self.conv_out = CausalConv3d(cfg, ch[-1], cfg.out_channels, 3, rngs=rngs)

    def __call__(self, z: Array, cache: Cache | None = None) -> tuple[Array, Cache]:
        cache = cache or {}
        new: Cache = {}
        h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
        h, new["mid"] = self.mid_block(h, z, cache.get("mid"))
        for i, block in enumerate(self.up_blocks):
            h, new[f"up_{i}"] = block(h, z, cache.get(f"up_{i}"))
        h = jax.nn.silu(self.norm_out(h, z))
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return h, new


# ------------------------------------------------------------------- frame batches and tiling

BatchFn = Callable[[Array, Cache | None], tuple[Array, Cache]]


def run_frame_batches(fn: BatchFn, x: Array, batch_size: int) -> Array:
    """Run `fn` over frame batches of x [B, F, H, W, C] threading the conv cache; concat along F.

    Split as diffusers does: n = max(F // batch_size, 1) batches, the first one also takes the
    remainder F % batch_size (so 49 frames -> 9, 8, 8, ...; 13 latents -> 3, 2, 2, ...). Batches
    after the first have one shape and run as a `lax.scan` with the cache as carry.
    """
    f = x.shape[1]
    n = max(f // batch_size, 1)
    first_len = min(f, batch_size + f % batch_size)
    out, cache = fn(x[:, :first_len], None)
    if n == 1:
        return out
    rest = x[:, first_len:]
    rest = rest.reshape(rest.shape[0], n - 1, batch_size, *rest.shape[2:])
    rest = jnp.moveaxis(rest, 1, 0)

    def step(carry: Cache, chunk: Array) -> tuple[Cache, Array]:
        y, carry = fn(chunk, carry)
        return carry, y

    _, ys = jax.lax.scan(step, cache, rest)  # [n-1, B, f_out, H, W, C]
    ys = jnp.moveaxis(ys, 0, 1)
    ys = ys.reshape(ys.shape[0], -1, *ys.shape[3:])
    return jnp.concatenate([out, ys.astype(out.dtype)], axis=1)


def _blend_weights(extent: int, dtype: Any) -> Array:
    return jnp.asarray(np.arange(extent) / extent, dtype)


def blend_v(above: Array, tile: Array, extent: int, offset: int | None = None) -> Array:
    """Linear cross-fade of `above` into `tile`'s first rows (axis H of [B, F, H, W, C]).

    Row r < extent of `tile` sits at row `offset + r` of `above` (default: `above`'s last
    `extent` rows, upstream's alignment, right when the tiles overlap by exactly `extent`).
    """
    start = above.shape[2] - extent if offset is None else offset
    extent = min(above.shape[2] - start, tile.shape[2], extent)
    if extent <= 0:
        return tile
    w = _blend_weights(extent, tile.dtype)[:, None, None]
    mixed = above[:, :, start:start + extent] * (1 - w) + tile[:, :, :extent] * w
    return jnp.concatenate([mixed, tile[:, :, extent:]], axis=2)


def blend_h(left: Array, tile: Array, extent: int, offset: int | None = None) -> Array:
    """Linear cross-fade of `left` into `tile`'s first columns (axis W); `offset` as in `blend_v`."""
    start = left.shape[3] - extent if offset is None else offset
    extent = min(left.shape[3] - start, tile.shape[3], extent)
    if extent <= 0:
        return tile
    w = _blend_weights(extent, tile.dtype)[:, None]
    mixed = left[:, :, :, start:start + extent] * (1 - w) + tile[:, :, :, :extent] * w
    return jnp.concatenate([mixed, tile[:, :, :, extent:]], axis=3)


@dataclasses.dataclass(frozen=True, slots=True)
class _TileGrid:
    """Tile geometry of one tiled pass, pairs are (height, width).

    Input tiles of `size` start every `stride` input rows/cols; one input stride is `out_stride`
    output rows/cols. Each tile keeps its first `out_stride` output rows/cols (the last tile keeps
    what it has), so the stitched output has exactly the untiled size; neighbours cross-fade over
    `blend` output rows/cols (at most their overlap) where they overlap.
    """

    size: tuple[int, int]
    stride: tuple[int, int]
    out_stride: tuple[int, int]
    blend: tuple[int, int]

    def __post_init__(self) -> None:
        if min(self.size) < 1 or min(self.stride) < 1 or min(self.out_stride) < 1:
            raise ValueError(
                f"tiling: tiles of {self.size} at stride {self.stride} (in latents or pixels); "
                "expected tiles of at least one latent and overlap factors leaving a positive stride"
            )


@dataclasses.dataclass(frozen=True, slots=True)
class TileLayout:
    """The tiles of one tiled pass (hashable, so it can be a static jit argument).

    rows / cols: tile origins along H and W (input units); shapes: ((row, col), (tile_h, tile_w))
    per tile in row-major order. Tiles at the bottom and right edges are smaller, so a pass has at
    most four distinct tile shapes however many tiles it has.
    """

    grid: _TileGrid
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    shapes: tuple[tuple[tuple[int, int], tuple[int, int]], ...]

    def groups(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        """Tile shape -> origins of the tiles of that shape (row-major order)."""
        out: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for origin, shape in self.shapes:
            out[shape].append(origin)
        return dict(out)


def tile_layout(height: int, width: int, grid: _TileGrid) -> TileLayout:
    """The tiles that cover an input of height x width (in the grid's input units)."""
    rows = tuple(range(0, height, grid.stride[0]))
    cols = tuple(range(0, width, grid.stride[1]))
    shapes = tuple(((i, j), (min(grid.size[0], height - i), min(grid.size[1], width - j))) for i in rows for j in cols)
    return TileLayout(grid, rows, cols, shapes)


def stitch_tiles(outputs: dict[tuple[int, int], Array], layout: TileLayout) -> Array:
    """Blend each output tile [B, F, h, w, C] (by origin) with its already blended neighbours above
    and to the left, keep `grid.out_stride` rows/cols of each, and concatenate: [B, F, H, W, C]."""
    grid = layout.grid
    blended: dict[tuple[int, int], Array] = {}
    result_rows = []
    for i in layout.rows:
        row = []
        for j in layout.cols:
            tile = outputs[(i, j)]
            # Blend with the *blended* neighbours (upstream blends in place, tile by tile); the
            # neighbour's rows from its out_stride on are the ones this tile's first rows cover.
            if i > 0:
                tile = blend_v(blended[(i - grid.stride[0], j)], tile, grid.blend[0], grid.out_stride[0])
            if j > 0:
                tile = blend_h(blended[(i, j - grid.stride[1])], tile, grid.blend[1], grid.out_stride[1])
            blended[(i, j)] = tile
            row.append(tile[:, :, : grid.out_stride[0], : grid.out_stride[1]])
        result_rows.append(jnp.concatenate(row, axis=3))
    return jnp.concatenate(result_rows, axis=2)


def run_tiled(fn: Callable[[Array], Array], x: Array, grid: _TileGrid) -> Array:
    """Apply `fn` to overlapping spatial tiles of x [B, F, H, W, C], blend and stitch the outputs.

    The output has the size `fn(x)` would have for every input size (upstream keeps a fixed
    `tile - blend` rows per tile, which overshoots when that differs from the stride, e.g. 36 x 34
    for a 32 x 32 video with small tiles). Where upstream's geometry is consistent (blend ==
    overlap, as for every released CogVideoX VAE at its default tiling) the result is upstream's.
    Tiles of one shape are stacked and mapped (`lax.map`), so each shape is traced once. (The
    pipelines decode instead with one compiled program per tile shape, run from the host:
    `AutoencoderKLCogVideoX.decode_tile` + `stitch_decoded`; the same numbers.)
    """
    layout = tile_layout(x.shape[2], x.shape[3], grid)
    outputs: dict[tuple[int, int], Array] = {}
    for (th, tw), origins in layout.groups().items():
        stacked = jnp.stack([x[:, :, i:i + th, j:j + tw] for i, j in origins])
        mapped = fn(stacked[0])[None] if len(origins) == 1 else jax.lax.map(fn, stacked)
        for k, origin in enumerate(origins):
            outputs[origin] = mapped[k]
    return stitch_tiles(outputs, layout)


# ---------------------------------------------------------------------------------------- model


class AutoencoderKLCogVideoX(nnx.Module):
    """CogVideoX VAE: `encode` videos to a latent Gaussian, `decode` latents to videos.

    Both take and return `[B, C, F, H, W]` (diffusers' layout) and accept `tiling=` (a
    `CogVideoXVAETiling`, or None for untiled). Frame counts: F = 1 + 4k frames <-> 1 + k latents
    (or multiples of 8 frames / 2 latents); H, W multiples of `cfg.spatial_compression`.
    Scaling by `cfg.scaling_factor` is the caller's job (as in diffusers).
    Both methods are jit-able (tiling must be static); all loops unroll at trace time except the
    frame batches after the first (a `lax.scan`) and same-shape tiles (a `lax.map`).
    """

    def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder3D(cfg, rngs=rngs)
        self.decoder = Decoder3D(cfg, rngs=rngs)

    # -- shape checks

    def _check(self, name: str, x: Array, channels: int) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"{name}: expected [B, {channels}, F, H, W], got shape {tuple(x.shape)}")
        s = self.cfg.spatial_compression
        if name == "x" and (x.shape[3] % s or x.shape[4] % s):
            raise ValueError(f"x: height and width must be multiples of {s}, got shape {tuple(x.shape)}")

    # -- encode

    def _encode_frames(self, x: Array) -> Array:
        return run_frame_batches(self.encoder, x, self.cfg.sample_frames_batch_size)

    def encode(self, x: Array, *, tiling: CogVideoXVAETiling | None = None) -> LatentDistribution:
        """x: [B, in_channels, F, H, W] in [-1, 1] -> posterior with mean/logvar
        [B, latent_channels, F', H / s, W / s] (F' = 1 + (F - 1) // 4 for F = 1 + 4k)."""
        self._check("x", x, self.cfg.in_channels)
        h = jnp.transpose(x, (0, 2, 3, 4, 1)).astype(self.cfg.dtype)
        height, width = h.shape[2:4]
        if tiling is not None and (height > tiling.sample_min_height or width > tiling.sample_min_width):
            moments = run_tiled(self._encode_frames, h, self._encode_grid(tiling))
        else:
            moments = self._encode_frames(h)
        moments = jnp.transpose(moments, (0, 4, 1, 2, 3))
        mean, logvar = jnp.split(moments, 2, axis=1)
        return LatentDistribution(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    def _encode_grid(self, t: CogVideoXVAETiling) -> _TileGrid:
        # Pixel tiles and strides are whole latents, so every tile's latents sit on the untiled
        # latent grid (upstream strides by int(px * (1 - overlap)) pixels, the same number for
        # the released VAEs' defaults, but off the grid for others, e.g. 13 px with 4 px latents).
        s = self.cfg.spatial_compression
        lat_h, lat_w = t.sample_min_height // s, t.sample_min_width // s
        stride = (int(lat_h * (1 - t.overlap_factor_height)), int(lat_w * (1 - t.overlap_factor_width)))
        return _TileGrid(
            size=(lat_h * s, lat_w * s),
            stride=(stride[0] * s, stride[1] * s),
            out_stride=stride,
            blend=(int(lat_h * t.overlap_factor_height), int(lat_w * t.overlap_factor_width)),
        )

    # -- decode

    def _decode_frames(self, z: Array) -> Array:
        return run_frame_batches(self.decoder, z, self.cfg.latent_frames_batch_size)

    def decode(self, z: Array, *, tiling: CogVideoXVAETiling | None = None) -> Array:
        """z: [B, latent_channels, F', H', W'] (already divided by scaling_factor) ->
        frames [B, out_channels, F, H' * s, W' * s], roughly in [-1, 1]."""
        self._check("z", z, self.cfg.latent_channels)
        h = jnp.transpose(z, (0, 2, 3, 4, 1)).astype(self.cfg.dtype)
        grid = self._decode_grid(tiling) if tiling is not None else None
        if grid is not None and (h.shape[2] > grid.size[0] or h.shape[3] > grid.size[1]):
            out = run_tiled(self._decode_frames, h, grid)
        else:
            out = self._decode_frames(h)
        return jnp.transpose(out, (0, 4, 1, 2, 3))

    # -- tiled decode as separate programs: one compiled program per tile *shape* (origin traced),
    #    reused for every tile of that shape, instead of one program holding every tile's decoder

    def decode_layout(self, z_shape: tuple[int, ...], tiling: CogVideoXVAETiling | None) -> TileLayout | None:
        """The decode tiles of latents of shape [B, C, F', H', W'] (None: `decode` would not tile)."""
        if tiling is None:
            return None
        grid = self._decode_grid(tiling)
        if z_shape[3] > grid.size[0] or z_shape[4] > grid.size[1]:
            return tile_layout(z_shape[3], z_shape[4], grid)
        return None

    def decode_tile(self, z: Array, origin: tuple[Array, Array], size: tuple[int, int]) -> Array:
        """One decoded tile, before blending: z [B, C, F', H', W'] (divided by scaling_factor),
        `origin` (row, col) in latents (int32 scalars, may be traced so one compiled program serves
        every tile of this `size`) -> [B, F, size[0] * s, size[1] * s, out_channels] channels-last."""
        self._check("z", z, self.cfg.latent_channels)
        h = jnp.transpose(z, (0, 2, 3, 4, 1)).astype(self.cfg.dtype)
        b, f, _, _, c = h.shape
        zero = jnp.zeros((), jnp.int32)
        tile = jax.lax.dynamic_slice(h, (zero, zero, origin[0], origin[1], zero), (b, f, size[0], size[1], c))
        return self._decode_frames(tile)

    @staticmethod
    def stitch_decoded(outputs: dict[tuple[int, int], Array], layout: TileLayout) -> Array:
        """`decode_tile` outputs by origin -> frames [B, out_channels, F, H, W], as `decode(tiling=...)`."""
        return jnp.transpose(stitch_tiles(outputs, layout), (0, 4, 1, 2, 3))

    def _decode_grid(self, t: CogVideoXVAETiling) -> _TileGrid:
        s = self.cfg.spatial_compression
        lat_h, lat_w = t.sample_min_height // s, t.sample_min_width // s
        stride = (int(lat_h * (1 - t.overlap_factor_height)), int(lat_w * (1 - t.overlap_factor_width)))
        return _TileGrid(
            size=(lat_h, lat_w),
            stride=stride,
            out_stride=(stride[0] * s, stride[1] * s),
            blend=(int(t.sample_min_height * t.overlap_factor_height), int(t.sample_min_width * t.overlap_factor_width)),
        )

    def __call__(self, x: Array, *, tiling: CogVideoXVAETiling | None = None) -> Array:
        """Reconstruct x [B, C, F, H, W] through the posterior mode (diffusers' forward default)."""
        return self.decode(self.encode(x, tiling=tiling).mode(), tiling=tiling)
