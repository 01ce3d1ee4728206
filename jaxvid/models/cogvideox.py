"""CogVideoX transformer (2b, 5b, 1.5-5b and their I2V variants) in Flax NNX.

Faithful to diffusers' `CogVideoXTransformer3DModel` (diffusers 0.42.1,
models/transformers/cogvideox_transformer_3d.py). Unlike diffusers, the model computes its own
positional embeddings (sincos table, learned table or 3D RoPE) from the config and the input
shape, exactly as diffusers' pipelines do (`_prepare_rotary_positional_embeddings`).

Layers are stacked (built with nnx.vmap) and run with a scan; an attention plan may split that
scan into a dense prefix and a sparse rest.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvid.attention import AttentionPlan, VideoLayout, attend
from jaxvid.models import abstract
from jaxvid.models.fp8 import Fp8Linear, fused_fp8_dot
from jaxvid.models.layers import (
    ACTIVATIONS,
    AdaLayerNorm,
    FeedForward,
    TimestepEmbedding,
    apply_rotary,
    layer_norm,
    linear,
    modulate,
    rope_3d,
    sincos_3d,
    timestep_embedding,
)
from jaxvid.models.offload import stream_in
from jaxvid.parallel import shard_tokens

__all__ = ["CogVideoXConfig", "CogVideoXBlock", "CogVideoXTransformer3D", "rotary_table", "resize_crop_region"]

_FF_ACTIVATIONS = ("gelu", "gelu-approximate")
_QK_NORM_EPS = 1e-6  # diffusers' CogVideoXBlock builds its Attention with eps=1e-6 for the q/k LayerNorms
_ROPE_THETA = 10000.0
# config.json keys that carry no model facts
_BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "architectures")


# ============================================================================================
# Config and presets
# ============================================================================================


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CogVideoXConfig:
    """Every field of diffusers' CogVideoXTransformer3DModel config, plus dtypes.

    `sample_frames` is in pixel frames (49 -> 13 latent frames), `sample_height`/`sample_width`
    in latent pixels; `patch_size_t` None = CogVideoX 1.0 (Conv2d patches), 2 = 1.5 (linear over
    t x h x w patches). `dropout` is accepted and ignored (inference only). Only the Conv2d patch
    embedding has a bias switch (`patch_bias`), as in diffusers.
    """

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        for name in (
            "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "time_embed_dim",
            "text_embed_dim", "num_layers", "sample_width", "sample_height", "sample_frames", "patch_size",
            "temporal_compression_ratio", "max_text_seq_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CogVideoXConfig.{name}={value!r}; expected a positive integer")
        if self.patch_size_t is not None and (not isinstance(self.patch_size_t, int) or self.patch_size_t < 1):
            raise ValueError(f"CogVideoXConfig.patch_size_t={self.patch_size_t!r}; expected None or a positive integer")
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            # diffusers adds the ofs embedding to the time embedding, so the two must match
            raise ValueError(
                f"CogVideoXConfig.ofs_embed_dim={self.ofs_embed_dim}; expected None or time_embed_dim={self.time_embed_dim}"
            )
        if self.activation_fn not in _FF_ACTIVATIONS:
            raise ValueError(f"CogVideoXConfig.activation_fn={self.activation_fn!r}; expected one of {_FF_ACTIVATIONS}")
        if self.timestep_activation_fn not in ACTIVATIONS:
            raise ValueError(
                f"CogVideoXConfig.timestep_activation_fn={self.timestep_activation_fn!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError(
                "CogVideoXConfig.use_learned_positional_embeddings=True needs use_rotary_positional_embeddings=True "
                "(no CogVideoX checkpoint has learned embeddings without RoPE; diffusers rejects it too)"
            )
        if self.use_rotary_positional_embeddings:
            d = self.attention_head_dim
            if d // 4 + 2 * (d // 8 * 3) != d or (d // 4) % 2 or (d // 8 * 3) % 2:
                raise ValueError(f"CogVideoXConfig.attention_head_dim={d}; 3D RoPE needs a multiple of 16")
        elif self.inner_dim % 16:
            raise ValueError(f"CogVideoXConfig: inner dim {self.inner_dim} must be a multiple of 16 for the sincos table")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_volume(self) -> int:
        return self.patch_size * self.patch_size * (self.patch_size_t or 1)

    @property
    def sample_latent_frames(self) -> int:
        return (self.sample_frames - 1) // self.temporal_compression_ratio + 1

    @property
    def learned_pos_tokens(self) -> int:
        """Length of the learned table: text slots + patches of the sample size."""
        p = self.patch_size
        return self.max_text_seq_length + (self.sample_height // p) * (self.sample_width // p) * self.sample_latent_frames

    # ---- config.json --------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> CogVideoXConfig:
        """Read a diffusers config.json dict: unknown keys are ignored with one warning (as diffusers
        does; bookkeeping keys silently), a value of the wrong type is a ValueError naming the key."""
        from jaxvid.models.hf_config import check_field_types, drop_unknown_keys

        what = "CogVideoX transformer config.json"
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
        kwargs = {k: v for k, v in d.items() if k not in _BOOKKEEPING and not k.startswith("_")}
        kwargs = drop_unknown_keys(kwargs, names, what=what)
        if kwargs.get("out_channels", 1) is None:
            raise ValueError(f"{what}: out_channels=None; expected an integer")
        return cls(**check_field_types(cls, kwargs, what=what))

    def to_hf_config(self) -> dict[str, Any]:
        """The diffusers config.json dict of this config (dtypes left out)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("dtype", "param_dtype")}
        return {"_class_name": "CogVideoXTransformer3DModel", **out}

    # ---- presets (the transformer configs of the THUDM / zai-org checkpoints) --------------
    @classmethod
    def cogvideox_2b(cls, **overrides: Any) -> CogVideoXConfig:
        return cls(**{"num_attention_heads": 30, "num_layers": 30, **overrides})

    @classmethod
    def cogvideox_5b(cls, **overrides: Any) -> CogVideoXConfig:
        return cls(**{"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True, **overrides})

    @classmethod
    def cogvideox_5b_i2v(cls, **overrides: Any) -> CogVideoXConfig:
        return cls.cogvideox_5b(**{"in_channels": 32, "use_learned_positional_embeddings": True, **overrides})

    @classmethod
    def cogvideox1_5_5b(cls, **overrides: Any) -> CogVideoXConfig:
        return cls.cogvideox_5b(
            **{"patch_size_t": 2, "patch_bias": False, "sample_height": 300, "sample_width": 300, "sample_frames": 81,
               **overrides}
        )

    @classmethod
    def cogvideox1_5_5b_i2v(cls, **overrides: Any) -> CogVideoXConfig:
        return cls.cogvideox1_5_5b(**{"in_channels": 32, "ofs_embed_dim": 512, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> CogVideoXConfig:
        """A few-thousand-parameter 5b-like model for tests and the demo."""
        return cls(
            **{
                "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
                "time_embed_dim": 8, "text_embed_dim": 16, "num_layers": 2, "sample_width": 8, "sample_height": 8,
                "sample_frames": 9, "max_text_seq_length": 4, "use_rotary_positional_embeddings": True, **overrides,
            }
        )


PRESETS = {
    "cogvideox-2b": CogVideoXConfig.cogvideox_2b,
    "cogvideox-5b": CogVideoXConfig.cogvideox_5b,
    "cogvideox-5b-i2v": CogVideoXConfig.cogvideox_5b_i2v,
    "cogvideox1.5-5b": CogVideoXConfig.cogvideox1_5_5b,
    "cogvideox1.5-5b-i2v": CogVideoXConfig.cogvideox1_5_5b_i2v,
    "tiny": CogVideoXConfig.tiny,
}


# ============================================================================================
# Positional embeddings (static: numpy at trace time)
# ============================================================================================


def resize_crop_region(grid: tuple[int, int], base_width: int, base_height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a (h, w) grid sits inside the base grid after an aspect-preserving resize and centre crop.

    diffusers' pipelines/cogvideo `get_resize_crop_region_for_grid`: returns ((top, left), (bottom, right)).
    """
    h, w = grid
    if h / w > base_height / base_width:
        rh, rw = base_height, int(round(base_height / h * w))
    else:
        rw, rh = base_width, int(round(base_width / w * h))
    top, left = int(round((base_height - rh) / 2.0)), int(round((base_width - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def _linspace_f32(start: float, stop: float, n: int) -> np.ndarray:
    return np.linspace(start, stop, n, dtype=np.float64).astype(np.float32)


def rotary_table(cfg: CogVideoXConfig, frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """3D RoPE cos/sin [frames' * h' * w', head_dim] for a latent video of `frames` x `height` x `width`.

    As diffusers' CogVideoX pipelines compute it: 1.0 models use a "linspace" grid cropped from
    the base grid (sample size / patch); 1.5 models (patch_size_t set) slice the first h' x w'
    positions of the base grid and use ceil(frames / patch_size_t) temporal positions.
    """
    p, pt = cfg.patch_size, cfg.patch_size_t
    gh, gw = height // p, width // p
    base_h, base_w = cfg.sample_height // p, cfg.sample_width // p
    if pt is None:
        (top, left), (bottom, right) = resize_crop_region((gh, gw), base_w, base_h)
        grid_h = _linspace_f32(top, bottom * (gh - 1) / gh, gh)
        grid_w = _linspace_f32(left, right * (gw - 1) / gw, gw)
        grid_t = _linspace_f32(0, frames * (frames - 1) / frames, frames)
    else:
        if gh > base_h or gw > base_w:
            raise ValueError(
                f"hidden_states grid {gh}x{gw} (height={height}, width={width}) exceeds the RoPE base grid "
                f"{base_h}x{base_w} (sample_height={cfg.sample_height}, sample_width={cfg.sample_width})"
            )
        grid_h = np.arange(gh, dtype=np.float32)
        grid_w = np.arange(gw, dtype=np.float32)
        grid_t = np.arange(-(-frames // pt), dtype=np.float32)
    return rope_3d(cfg.attention_head_dim, grid_t, grid_h, grid_w, _ROPE_THETA)


def sincos_table(cfg: CogVideoXConfig, frames: int, height: int, width: int) -> np.ndarray:
    """Absolute sincos table [frames * h' * w', inner_dim] (CogVideoX-2b), float64."""
    p = cfg.patch_size
    return sincos_3d(
        cfg.inner_dim, frames, height // p, width // p,
        spatial_scale=cfg.spatial_interpolation_scale, temporal_scale=cfg.temporal_interpolation_scale,
    )


# ============================================================================================
# Blocks
# ============================================================================================


class CogVideoXLayerNormZero(nnx.Module):
    """AdaLN-zero for the two streams: one LayerNorm, six modulation vectors from the time embedding.

    linear(silu(temb)) -> shift, scale, gate, enc_shift, enc_scale, enc_gate (each [B, D]).
    """

    def __init__(self, cfg: CogVideoXConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.linear = linear(cfg.time_embed_dim, 6 * d, **kw)
        self.norm = layer_norm(d, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine, **kw)

    def __call__(self, x: jax.Array, enc: jax.Array, temb: jax.Array):
        shift, scale, gate, e_shift, e_scale, e_gate = jnp.split(self.linear(jax.nn.silu(temb)), 6, axis=-1)
        x = modulate(self.norm(x), shift, scale)
        enc = modulate(self.norm(enc), e_shift, e_scale)
        return x, enc, gate[:, None, :], e_gate[:, None, :]


class CogVideoXAttention(nnx.Module):
    """Joint attention over [text; video] with per-head q/k LayerNorm and RoPE on the video tokens."""

    def __init__(self, cfg: CogVideoXConfig, *, rngs: nnx.Rngs):
        d, dh = cfg.inner_dim, cfg.attention_head_dim
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.heads, self.head_dim = cfg.num_attention_heads, dh
        self.to_q = linear(d, d, use_bias=cfg.attention_bias, **kw)
        self.to_k = linear(d, d, use_bias=cfg.attention_bias, **kw)
        self.to_v = linear(d, d, use_bias=cfg.attention_bias, **kw)
        self.norm_q = layer_norm(dh, eps=_QK_NORM_EPS, **kw)
        self.norm_k = layer_norm(dh, eps=_QK_NORM_EPS, **kw)
        # diffusers: to_out = [Linear, Dropout]; only the Linear carries weights (to_out.0)
        self.to_out = linear(d, d, use_bias=True, **kw)

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The three projections as one [D, 3D] matmul (one GEMM reads x once); weights stay separate
        so the parameters keep diffusers' names."""
        projs = (self.to_q, self.to_k, self.to_v)
        if isinstance(self.to_q, Fp8Linear):  # fp8 weights (jaxvid.models.fp8): one f8 GEMM
            return tuple(jnp.split(fused_fp8_dot(x, projs), 3, axis=-1))
        dtype = x.dtype if self.to_q.dtype is None else self.to_q.dtype
        kernel = jnp.concatenate([p.kernel[...] for p in projs], axis=1).astype(dtype)
        y = jnp.dot(x.astype(dtype), kernel)
        if self.to_q.bias is not None:
            y = y + jnp.concatenate([p.bias[...] for p in projs]).astype(dtype)
        return tuple(jnp.split(y, 3, axis=-1))

    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None, *, text_tokens: int, spec: Any,
        layout: VideoLayout,
    ) -> jax.Array:
        """x: [B, L + N, D] (text first) -> [B, L + N, D]. rope: cos/sin [N, head_dim] or None."""
        b, s, _ = x.shape

        def heads(t: jax.Array) -> jax.Array:
            return t.reshape(b, s, self.heads, self.head_dim)

        q, k, v = (heads(t) for t in self._qkv(x))
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            cos, sin = rope
            q = jnp.concatenate([q[:, :text_tokens], apply_rotary(q[:, text_tokens:], cos, sin)], axis=1)
            k = jnp.concatenate([k[:, :text_tokens], apply_rotary(k[:, text_tokens:], cos, sin)], axis=1)
        out = attend(q, k, v, spec, layout=layout, scale=1.0 / math.sqrt(self.head_dim))
        return self.to_out(out.reshape(b, s, self.heads * self.head_dim))


class CogVideoXBlock(nnx.Module):
    """One transformer block: AdaLN-zero -> joint attention -> AdaLN-zero -> MLP, gated residuals."""

    def __init__(self, cfg: CogVideoXConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm1 = CogVideoXLayerNormZero(cfg, rngs=rngs)
        self.attn1 = CogVideoXAttention(cfg, rngs=rngs)
        self.norm2 = CogVideoXLayerNormZero(cfg, rngs=rngs)
        self.ff = FeedForward(cfg.inner_dim, 4 * cfg.inner_dim, act=cfg.activation_fn, **kw)

    def __call__(
        self, x: jax.Array, enc: jax.Array, temb: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None,
        *, spec: Any = None, layout: VideoLayout, cached_attention: jax.Array | None = None,
        reuse_attention: jax.Array | None = None,
    ) -> tuple[jax.Array, ...]:
        """x: [B, N, D] video tokens, enc: [B, L, D] text tokens, temb: [B, time_embed_dim] -> (x, enc).

        Step caching (pyramid attention broadcast): with `cached_attention` [B, L + N, D] (this
        layer's attention output from an earlier step) and `reuse_attention` (bool scalar, may be
        traced), the attention is skipped (`lax.cond`) and the cached output used when the flag is
        set; returns (x, enc, attention output) then, the output to cache for the next step.
        """
        n_text = enc.shape[1]
        nx, nenc, gate, e_gate = self.norm1(x, enc, temb)

        def attention() -> jax.Array:
            return self.attn1(jnp.concatenate([nenc, nx], axis=1), rope, text_tokens=n_text, spec=spec, layout=layout)

        if cached_attention is None:
            attn = attention()
        else:
            attn = jax.lax.cond(reuse_attention, lambda: cached_attention.astype(nx.dtype), attention)
        x = x + gate * attn[:, n_text:]
        enc = enc + e_gate * attn[:, :n_text]

        nx, nenc, gate, e_gate = self.norm2(x, enc, temb)
        ff = self.ff(jnp.concatenate([nenc, nx], axis=1))
        x = x + gate * ff[:, n_text:]
        enc = enc + e_gate * ff[:, :n_text]
        return (x, enc) if cached_attention is None else (x, enc, attn)


# ============================================================================================
# Model
# ============================================================================================


class CogVideoXPatchEmbed(nnx.Module):
    """Text projection plus video patch projection (and the learned position table when the config has one).

    Both patch variants are one linear map over flattened (C, [pt,] p, p) patches: CogVideoX 1.0's
    Conv2d with stride = kernel is exactly that, so one code path serves both.
    """

    def __init__(self, cfg: CogVideoXConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.cfg = cfg
        use_bias = cfg.patch_bias if cfg.patch_size_t is None else True  # diffusers' 1.5 Linear ignores patch_bias
        self.proj = linear(cfg.in_channels * cfg.patch_volume, cfg.inner_dim, use_bias=use_bias, **kw)
        self.text_proj = linear(cfg.text_embed_dim, cfg.inner_dim, **kw)
        if cfg.use_learned_positional_embeddings:
            self.pos_embedding = nnx.Param(abstract.zeros((1, cfg.learned_pos_tokens, cfg.inner_dim), cfg.param_dtype))

    def patchify(self, video: jax.Array) -> jax.Array:
        """[B, F, C, H, W] -> [B, F' * h * w, C * pt * p * p] in (t, h, w) token order."""
        b, f, c, h, w = video.shape
        p, pt = self.cfg.patch_size, self.cfg.patch_size_t or 1
        x = video.reshape(b, f // pt, pt, c, h // p, p, w // p, p)
        x = x.transpose(0, 1, 4, 6, 3, 2, 5, 7)  # b, t, h, w, c, pt, ph, pw
        return x.reshape(b, (f // pt) * (h // p) * (w // p), c * pt * p * p)

    def __call__(self, text: jax.Array, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> text tokens [B, L, D], video tokens [B, N, D] with the absolute position table added."""
        cfg = self.cfg
        b, f, _, h, w = video.shape
        text = self.text_proj(text)
        tokens = self.proj(self.patchify(video.astype(cfg.dtype)))
        table = self._position_table(text.shape[1], f, h, w)
        if table is not None:
            text, tokens = text + table[:, : text.shape[1]].astype(text.dtype), tokens + table[:, text.shape[1]:].astype(tokens.dtype)
        return text, tokens

    def _position_table(self, n_text: int, f: int, h: int, w: int) -> jax.Array | None:
        """The [1, L + N, D] table diffusers adds (text slots are zero), or None under RoPE alone."""
        cfg = self.cfg
        if cfg.use_rotary_positional_embeddings and not cfg.use_learned_positional_embeddings:
            return None
        if n_text != cfg.max_text_seq_length:
            raise ValueError(
                f"encoder_hidden_states has {n_text} tokens; this model adds an absolute position table built for "
                f"max_text_seq_length={cfg.max_text_seq_length} text tokens"
            )
        if cfg.use_learned_positional_embeddings:
            if (h, w) != (cfg.sample_height, cfg.sample_width):
                raise ValueError(
                    f"hidden_states height x width = {h}x{w}; the learned position table only covers "
                    f"sample_height x sample_width = {cfg.sample_height}x{cfg.sample_width}"
                )
            if cfg.patch_size_t is not None:
                raise ValueError("learned positional embeddings with patch_size_t set are unsupported (diffusers fails too)")
            if (f - 1) * cfg.temporal_compression_ratio + 1 == cfg.sample_frames:
                return self.pos_embedding[...]
            # Upstream quirk (diffusers CogVideoXPatchEmbed.forward): for any other frame count the
            # learned table is silently replaced by the sincos table.
        table = sincos_table(cfg, f, h, w)
        full = np.zeros((1, n_text + table.shape[0], cfg.inner_dim), np.float64)
        full[0, n_text:] = table
        return jnp.asarray(full, dtype=jnp.float32)


class CogVideoXTransformer3D(nnx.Module):
    """CogVideoX DiT: `model(hidden_states, encoder_hidden_states, timestep, ofs=None, *, attention=None)`.

    hidden_states [B, F, C, H, W] latents (frames first), encoder_hidden_states [B, L, text_embed_dim],
    timestep [B] (or scalar), ofs [B] / [1] / scalar (models with `ofs_embed_dim` only) ->
    [B, F, out_channels, H, W]. `attention` is an optional (static) AttentionPlan: its first
    `dense_layers` layers run dense, the rest with `plan.sparse`, as two scans (None = one dense scan).
    The attention layout handed to each layer is VideoLayout(frames=F / patch_size_t,
    height=H / patch_size, width=W / patch_size, text_tokens=L, text_first=True).
    """

    def __init__(self, cfg: CogVideoXConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        d = cfg.inner_dim
        self.patch_embed = CogVideoXPatchEmbed(cfg, rngs=rngs)
        self.time_embedding = TimestepEmbedding(d, cfg.time_embed_dim, act=cfg.timestep_activation_fn, **kw)
        if cfg.ofs_embed_dim:
            self.ofs_embedding = TimestepEmbedding(
                cfg.ofs_embed_dim, cfg.ofs_embed_dim, act=cfg.timestep_activation_fn, **kw
            )

        self.transformer_blocks = abstract.stack(lambda r: CogVideoXBlock(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm_final = layer_norm(d, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine, **kw)
        self.norm_out = AdaLayerNorm(cfg.time_embed_dim, d, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine, **kw)
        self.proj_out = linear(d, cfg.patch_volume * cfg.out_channels, **kw)

    # ---- checks -------------------------------------------------------------------------
    def _check_inputs(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array) -> None:
        cfg = self.cfg
        if hidden_states.ndim != 5 or hidden_states.shape[2] != cfg.in_channels:
            raise ValueError(
                f"hidden_states shape {tuple(hidden_states.shape)}; expected [B, F, {cfg.in_channels}, H, W]"
            )
        _, f, _, h, w = hidden_states.shape
        p, pt = cfg.patch_size, cfg.patch_size_t
        if h % p or w % p:
            raise ValueError(f"hidden_states height x width = {h}x{w}; expected multiples of patch_size={p}")
        if pt is not None and f % pt:
            raise ValueError(
                f"hidden_states has {f} latent frames; expected a multiple of patch_size_t={pt} "
                f"(pad the latents, as diffusers' CogVideoX 1.5 pipelines do)"
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.text_embed_dim:
            raise ValueError(
                f"encoder_hidden_states shape {tuple(encoder_hidden_states.shape)}; expected [B, L, {cfg.text_embed_dim}]"
            )
        if encoder_hidden_states.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} != hidden_states batch {hidden_states.shape[0]}"
            )

    # ---- layer scan ---------------------------------------------------------------------
    def _segments(self, attention: AttentionPlan | None) -> list[tuple[int, int, Any]]:
        """(start, stop, spec) runs of layers: all dense without a plan; else the plan's dense prefix, then `plan.sparse`."""
        n = self.cfg.num_layers
        if attention is None:
            return [(0, n, None)]
        if not isinstance(attention, AttentionPlan):
            raise ValueError(f"attention={attention!r}; expected None or a jaxvid.attention.AttentionPlan")
        n_dense, _ = attention.layer_split(n)
        return [(a, b, s) for a, b, s in ((0, n_dense, attention.dense_spec()), (n_dense, n, attention.sparse)) if b > a]

    def _run_blocks(self, x, enc, temb, rope, *, attention: Any, layout: VideoLayout, cache=None, reuse=None):
        graphdef, state = nnx.split(self.transformer_blocks)
        if cache is not None:  # step caching: scan over (layer weights, layer's cached attention output)
            outputs = []
            for start, stop, spec in self._segments(attention):
                seg = jax.tree.map(lambda a: a[start:stop], state)

                def body(carry, layer, spec=spec):
                    layer_state, cached = layer
                    block = nnx.merge(graphdef, layer_state)
                    x, enc, attn = block(*carry, temb, rope, spec=spec, layout=layout, cached_attention=cached,
                                         reuse_attention=reuse)
                    return (x, enc), attn

                (x, enc), attn = jax.lax.scan(body, (x, enc), (seg, cache[start:stop]))
                outputs.append(attn)
            return x, enc, jnp.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0]
        for start, stop, spec in self._segments(attention):
            # The whole stack is not sliced, so blocks parked in host memory (offload="blocks") are
            # only ever sliced by the scan, one layer at a time.
            seg = state if (start, stop) == (0, self.cfg.num_layers) else jax.tree.map(lambda a: a[start:stop], state)

            def body(carry, layer_state, spec=spec):
                # offload="blocks": this layer's host-resident weights are copied in here
                block = nnx.merge(graphdef, stream_in(layer_state))
                x, enc = carry
                # tokens over the mesh's `seq` axis outside attention (no-op without a mesh)
                return block(shard_tokens(x), enc, temb, rope, spec=spec, layout=layout), None

            (x, enc), _ = jax.lax.scan(body, (x, enc), seg)
        return x, enc

    # ---- forward ------------------------------------------------------------------------
    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        ofs: jax.Array | None = None,
        *,
        attention: AttentionPlan | None = None,
        attention_cache: jax.Array | None = None,
        reuse_attention: jax.Array | bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """See the class docstring. Step caching: with `attention_cache` [num_layers, B, L + N, D]
        (every layer's attention output of an earlier step, text tokens first) each layer uses its
        cached output instead of attending when `reuse_attention` (bool scalar, may be traced) is
        set; returns (output, the attention outputs to cache) then."""
        cfg = self.cfg
        self._check_inputs(hidden_states, encoder_hidden_states)
        b, f, _, h, w = hidden_states.shape
        p, pt = cfg.patch_size, cfg.patch_size_t or 1

        # 1. Time (and ofs) embedding
        timestep = jnp.asarray(timestep)
        if timestep.ndim > 1 or timestep.size not in (1, b):
            raise ValueError(f"timestep.shape={timestep.shape}; expected [{b}], [1] or a scalar")
        timestep = jnp.broadcast_to(timestep.reshape(-1), (b,))
        t = timestep_embedding(timestep, cfg.inner_dim, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        temb = self.time_embedding(t.astype(cfg.dtype))
        if cfg.ofs_embed_dim:
            if ofs is None:
                raise ValueError(f"ofs=None; this model has an ofs embedding (ofs_embed_dim={cfg.ofs_embed_dim}), pass ofs [B]")
            ofs = jnp.atleast_1d(jnp.asarray(ofs))
            if ofs.ndim != 1 or ofs.shape[0] not in (1, b):
                raise ValueError(f"ofs.shape={ofs.shape}; expected [{b}], [1] or a scalar")
            o = timestep_embedding(ofs, cfg.ofs_embed_dim, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
            temb = temb + self.ofs_embedding(o.astype(cfg.dtype))

        # 2. Patch embedding (+ absolute positions) and rotary table
        enc, x = self.patch_embed(encoder_hidden_states.astype(cfg.dtype), hidden_states)
        grid = (f // pt, h // p, w // p)
        rope = None
        if cfg.use_rotary_positional_embeddings:
            cos, sin = rotary_table(cfg, f, h, w)
            rope = (jnp.asarray(cos), jnp.asarray(sin))
        layout = VideoLayout(frames=grid[0], height=grid[1], width=grid[2], text_tokens=enc.shape[1], text_first=True)

        # 3. Transformer blocks
        new_cache = None
        if attention_cache is None:
            x, enc = self._run_blocks(x, enc, temb, rope, attention=attention, layout=layout)
        else:
            want = (cfg.num_layers, b, enc.shape[1] + x.shape[1], cfg.inner_dim)
            if tuple(attention_cache.shape) != want:
                raise ValueError(f"attention_cache.shape={tuple(attention_cache.shape)}; expected {want}")
            x, enc, new_cache = self._run_blocks(x, enc, temb, rope, attention=attention, layout=layout,
                                                 cache=attention_cache, reuse=jnp.asarray(reuse_attention, bool))

        # 4. Final norm, AdaLN and projection
        x = self.norm_final(x)
        x = self.norm_out(x, temb)
        x = self.proj_out(x)  # [B, N, C * pt * p * p]

        # 5. Unpatchify
        x = x.reshape(b, grid[0], grid[1], grid[2], cfg.out_channels, pt, p, p)
        x = x.transpose(0, 1, 5, 4, 2, 6, 3, 7)  # b, t, pt, c, h, ph, w, pw
        x = x.reshape(b, f, cfg.out_channels, h, w)
        return x if new_cache is None else (x, new_cache)
