"""Dense softmax attention: cuDNN on GPU, XLA elsewhere."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# cuDNN's fused attention takes head dims up to 128 on every GPU generation we target (some allow
# 256); larger heads, such as the Wan VAE's single 384-wide mid-block head, go through XLA.
_CUDNN_MAX_HEAD_DIM = 128


def check_float_qkv(fn: str, q, k, v) -> None:
    """TypeError naming the argument unless q, k and v are floating point (ints gave all-zero outputs)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{fn}: {name} has dtype {dtype}; expected a floating dtype "
                            "(float32, bfloat16 or float16)")


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                    kv_lengths: jax.Array | None = None) -> jax.Array:
    """Softmax attention. q: [B, Sq, H, D], k/v: [B, Sk, H, D] -> [B, Sq, H, D].

    kv_lengths: int [B], only the first kv_lengths[b] keys of item b are attended (text tokens).
    """
    check_float_qkv("dense_attention", q, k, v)
    head_dim = q.shape[-1]
    lengths = {} if kv_lengths is None else {"key_value_seq_lengths": kv_lengths.astype(jnp.int32)}
    if (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim <= _CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn", **lengths)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla", **lengths)
