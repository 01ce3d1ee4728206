"""Dense attention in the 8-bit precisions ("fp8", "int8-fp8"): the block-sparse path with every
key block listed, so dense, radial and BSA layers share one 8-bit kernel family and one reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.api import block_sparse_attention

__all__ = ["DENSE_8BIT_BLOCK", "quantized_dense_attention"]

# Quantization block (tokens per Q / K scale) of dense 8-bit attention, and the kernel's tile.
DENSE_8BIT_BLOCK = 128


def quantized_dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, precision: str,
                              scale: float | None = None, implementation: str | None = None) -> jax.Array:
    """Softmax attention in `precision`. q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H, D] (q's dtype).

    Q and K are padded to one length that is a multiple of DENSE_8BIT_BLOCK (the Mosaic kernel
    takes one padded sequence); padded keys are masked through kv_len, padded query rows dropped.
    """
    block = DENSE_8BIT_BLOCK
    sq, sk = q.shape[1], k.shape[1]
    length = -(-max(sq, sk) // block) * block
    n_k = -(-sk // block)

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))

    n_q = length // block
    indices = np.broadcast_to(np.arange(n_k, dtype=np.int32), (1, 1, n_q, n_k))
    counts = np.full((1, 1, n_q), n_k, np.int32)
    out = block_sparse_attention(pad(q), pad(k), pad(v), jnp.asarray(indices), jnp.asarray(counts),
                                 block_q=block, block_kv=block, scale=scale,
                                 kv_len=sk if sk != length else None, implementation=implementation,
                                 precision=precision)
    return out[:, :sq]
