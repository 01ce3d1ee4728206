"""Dense softmax attention: cuDNN on GPU, XLA elsewhere."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None) -> jax.Array:
    """Softmax attention. q: [B, Sq, H, D], k/v: [B, Sk, H, D] -> [B, Sq, H, D]."""
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
