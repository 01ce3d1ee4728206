"""T5 v1.1 and umT5 text encoders (transformers' `T5EncoderModel` / `UMT5EncoderModel`).

CogVideoX encodes prompts with T5 v1.1 XXL, LongCat-Video with umT5 XXL. Both are the same
pre-norm encoder: RMS norm without mean ("T5 LayerNorm"), self-attention without the 1/sqrt(d)
scale plus a learned relative position bias, and a gated-GELU feed-forward. They differ only in
where the relative position bias lives: T5 learns one table in the first layer and reuses it in
every layer; umT5 learns one table per layer.

The layers are stacked (built with `abstract.stack`, run with `lax.scan`), so the 24 XXL layers compile
once, and under offload="blocks" each layer's weights stream in from pinned host memory inside the scan
(`offload.stream_in`). Parameter names follow the transformers checkpoint; `convert/keymaps/t5.py` maps them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvid.models import abstract
from jaxvid.models.layers import embed, linear
from jaxvid.models.offload import stream_in

log = logging.getLogger(__name__)

# config.json keys that say nothing about the encoder's computation (decoder, generation,
# training bookkeeping) and are accepted as they are.
_IGNORED_HF_KEYS = frozenset(
    {
        "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
        "num_decoder_layers", "decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id",
        "dropout_rate", "classifier_dropout", "initializer_factor", "is_encoder_decoder", "use_cache",
        "output_past", "tie_word_embeddings", "tokenizer_class", "task_specific_params", "n_positions",
        "is_decoder", "scalable_attention", "gradient_checkpointing", "return_dict", "output_hidden_states",
        "output_attentions", "is_gated_act", "dense_act_fn", "id2label", "label2id", "_attn_implementation",
        "quantization_config", "prefix", "max_length", "scale_decoder_outputs", "feed_forward_proj",
    }
)

# transformers' "gated-gelu" means gelu_new, the tanh approximation.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class T5Config:
    """Shape and numerics of a T5 v1.1 / umT5 encoder.

    `relative_bias_per_layer` is False for T5 (one table, first layer, shared by all) and True
    for umT5 (one table per layer). `activation` is the FFN nonlinearity ("gelu_tanh" for
    transformers' gelu_new); `gated` selects wi_0/wi_1 (T5 v1.1, umT5) over a single wi (T5 1.0).
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    gated: bool = True
    activation: str = "gelu_tanh"
    relative_bias_per_layer: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"T5Config.{name}={value!r}: expected a positive int")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(
                f"T5Config.relative_attention_num_buckets={self.relative_attention_num_buckets}: expected >= 4 "
                "(bidirectional buckets are halved, then half of those are exact)"
            )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"T5Config.layer_norm_epsilon={self.layer_norm_epsilon!r}: expected > 0")
        if self.activation not in ("gelu_tanh", "gelu", "relu"):
            raise ValueError(f"T5Config.activation={self.activation!r}: expected 'gelu_tanh', 'gelu' or 'relu'")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            try:
                jnp.dtype(value)
            except TypeError:
                raise ValueError(f"T5Config.{name}={value!r}: expected a numpy/jax dtype") from None

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "T5Config":
        """Read transformers' config.json for T5EncoderModel (T5 v1.1) or UMT5EncoderModel."""
        arch = (d.get("architectures") or [None])[0]
        model_type = d.get("model_type")
        if model_type == "umt5" or (arch is not None and arch.startswith("UMT5")):
            per_layer = True
        elif model_type in (None, "t5") and (arch is None or arch.startswith("T5")):
            per_layer = False
        else:
            raise ValueError(f"config.json: model_type={model_type!r}, architectures={arch!r}: expected a T5 or UMT5 encoder")
        if d.get("is_decoder"):
            raise ValueError("config.json: is_decoder=True: jaxvid implements the T5 encoder only")

        proj = d.get("feed_forward_proj", "gated-gelu" if per_layer else "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"config.json: feed_forward_proj={proj!r}: expected 'gated-<act>' or '<act>'")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        if act not in _ACTIVATIONS:
            raise ValueError(f"config.json: feed_forward_proj={proj!r}: activation {act!r} is not one of {sorted(_ACTIVATIONS)}")

        known = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                 "relative_attention_max_distance", "layer_norm_epsilon")
        unknown = sorted(k for k in d if k not in known and k not in _IGNORED_HF_KEYS)
        if unknown:
            log.warning("config.json: ignoring keys the T5 encoder does not use: %s", unknown)
        kwargs = {k: d[k] for k in known if k in d}
        return cls(**kwargs, gated=len(parts) == 2, activation=_ACTIVATIONS[act], relative_bias_per_layer=per_layer)

    @classmethod
    def t5_v1_1_xxl(cls, **override: Any) -> "T5Config":
        """google/t5-v1_1-xxl encoder: CogVideoX's text encoder."""
        return cls(**{**dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64), **override})

    @classmethod
    def umt5_xxl(cls, **override: Any) -> "T5Config":
        """google/umt5-xxl encoder: LongCat-Video's (and Wan's) text encoder."""
        return cls(**{**dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                             relative_bias_per_layer=True), **override})

    @classmethod
    def tiny(cls, **override: Any) -> "T5Config":
        """A few-kilobyte encoder for tests (T5 layout; pass relative_bias_per_layer=True for umT5)."""
        return cls(**{**dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                             relative_attention_num_buckets=8, relative_attention_max_distance=20), **override})


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets of (key - query) positions: int32 [length, length], values in [0, num_buckets).

    Half the buckets are for keys after the query; within each half, distances below a quarter of
    the buckets are exact and larger ones are binned logarithmically up to `max_distance`.
    Computed in float32 with the same operation order as transformers, because a distance that
    lands exactly on a bin edge (e.g. 16 with 32 buckets, max 128) must round the same way.
    """
    if length <= 0:
        raise ValueError(f"length={length}: expected a positive sequence length")
    pos = np.arange(length, dtype=np.int64)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) only where the exact branch is taken
        scaled = np.log(dist.astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(np.isfinite(scaled), scaled, 0).astype(np.int64)
    large = np.minimum(large, half - 1)
    buckets += np.where(dist < max_exact, dist, large)
    return buckets.astype(np.int32)


class T5LayerNorm(nnx.Module):
    """RMS norm without mean or bias: x / sqrt(mean(x^2) + eps) * weight. x: [..., D].

    The mean square is taken in float32 so bf16 activations (whose XXL values reach ~1e4) stay exact.
    """

    def __init__(self, dim: int, cfg: T5Config, *, rngs: nnx.Rngs):
        del rngs
        self.eps = cfg.layer_norm_epsilon
        self.dtype = cfg.dtype
        self.weight = nnx.Param(abstract.ones((dim,), cfg.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * normed).astype(self.dtype)


def _linear(n_in: int, n_out: int, cfg: T5Config, rngs: nnx.Rngs) -> nnx.Linear:
    return linear(n_in, n_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class T5SelfAttention(nnx.Module):
    """Unscaled multi-head self-attention with an additive position bias.

    umT5 layers own their `relative_attention_bias` table [num_buckets, H]; T5 layers receive the
    first layer's bias from the encoder.
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.dtype = cfg.dtype
        self.q = _linear(cfg.d_model, cfg.inner_dim, cfg, rngs)
        self.k = _linear(cfg.d_model, cfg.inner_dim, cfg, rngs)
        self.v = _linear(cfg.d_model, cfg.inner_dim, cfg, rngs)
        self.o = _linear(cfg.inner_dim, cfg.d_model, cfg, rngs)
        if cfg.relative_bias_per_layer:
            self.relative_attention_bias = embed(
                cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32, param_dtype=cfg.param_dtype, rngs=rngs
            )

    def __call__(self, x: jax.Array, bias: jax.Array | None, buckets: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x: [B, L, D]; bias: float32 [H, L, L] or None (use own table over `buckets` int32 [L, L]);
        key_mask: bool [B, L] (False = padding key) -> [B, L, D]."""
        b, length, _ = x.shape
        split = lambda t: t.reshape(b, length, self.num_heads, self.d_kv)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if bias is None:
            bias = jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores + bias[None].astype(jnp.float32)
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, self.num_heads * self.d_kv)
        return self.o(out)


class T5FeedForward(nnx.Module):
    """act(x @ wi_0) * (x @ wi_1) @ wo (gated) or act(x @ wi) @ wo. x: [B, L, D]."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.gated = cfg.gated
        self.activation = cfg.activation
        if cfg.gated:
            self.wi_0 = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
            self.wi_1 = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
        else:
            self.wi = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
        self.wo = _linear(cfg.d_ff, cfg.d_model, cfg, rngs)

    def _act(self, x: jax.Array) -> jax.Array:
        if self.activation == "relu":
            return jax.nn.relu(x)
        return jax.nn.gelu(x, approximate=self.activation == "gelu_tanh")

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self._act(self.wi_0(x)) * self.wi_1(x) if self.gated else self._act(self.wi(x))
        return self.wo(h)


class T5Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.attention_norm = T5LayerNorm(cfg.d_model, cfg, rngs=rngs)
        self.attention = T5SelfAttention(cfg, rngs=rngs)
        self.ffn_norm = T5LayerNorm(cfg.d_model, cfg, rngs=rngs)
        self.ffn = T5FeedForward(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array | None, buckets: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), bias, buckets, key_mask)
        return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nnx.Module):
    """Token ids -> last hidden state, as transformers' T5EncoderModel / UMT5EncoderModel."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.shared = embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        if not cfg.relative_bias_per_layer:
            # T5 keeps this table in layer 0 and shares its output with every layer.
            self.relative_attention_bias = embed(
                cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32, param_dtype=cfg.param_dtype, rngs=rngs
            )

        self.blocks = abstract.stack(lambda r: T5Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids: int32 [B, L]; attention_mask: [B, L] (1 = token, 0 = padding; None = all tokens)
        -> last_hidden_state [B, L, d_model] in cfg.dtype (padding positions included, as transformers)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids: shape {input_ids.shape}: expected [batch, length]")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: shape {attention_mask.shape}: expected {input_ids.shape} like input_ids")
        cfg = self.cfg
        key_mask = attention_mask.astype(bool)
        buckets = jnp.asarray(relative_position_buckets(
            input_ids.shape[1], cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        ))
        shared_bias = None
        if not cfg.relative_bias_per_layer:
            shared_bias = jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))

        graphdef, state = nnx.split(self.blocks)

        def body(x: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, None]:
            # offload="blocks": this layer's host-resident weights are copied in here
            return nnx.merge(graphdef, stream_in(layer_state))(x, shared_bias, buckets, key_mask), None

        x, _ = jax.lax.scan(body, self.shared(input_ids), state)
        return self.final_layer_norm(x)
