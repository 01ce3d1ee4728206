"""Block-sparse attention in pure jnp that touches only the listed key blocks.

Used on CPU and on GPUs without the Hopper kernel. A `lax.scan` over the `max_blocks` slots
gathers, for every query block at once, its next key/value block and folds it into an online
softmax, so memory is O(Sq x block_kv) per step, never Sq x Sk. Maths in fp32 for any input dtype.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.reference import check_block_sparse_args

__all__ = ["block_sparse_attention_portable"]


def block_sparse_attention_portable(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_indices: jax.Array,
    kv_counts: jax.Array,
    *,
    block_q: int,
    block_kv: int,
    scale: float | None = None,
    kv_len: int | jax.Array | None = None,
) -> jax.Array:
    """Same contract as `block_sparse_attention_reference`.

    q: [B, Sq, H, D]; k, v: [B, Sk, H, D]; kv_indices int32 [B or 1, H or 1, Sq/block_q, M] (sorted,
    entries past the count ignored); kv_counts int32 [B or 1, H or 1, Sq/block_q]. Keys at positions
    >= kv_len get no weight; a query block with count 0 outputs zeros. Returns [B, Sq, H, D], q.dtype.
    """
    check_block_sparse_args(q, k, v, kv_indices, kv_counts, block_q, block_kv)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if kv_len is None:
        kv_len = k.shape[1]
    return _portable(q, k, v, jnp.asarray(kv_indices, jnp.int32), jnp.asarray(kv_counts, jnp.int32),
                     jnp.asarray(kv_len, jnp.int32), block_q=block_q, block_kv=block_kv, scale=float(scale))


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale"))
def _portable(q, k, v, kv_indices, kv_counts, kv_len, *, block_q: int, block_kv: int, scale: float):
    batch, len_q, heads, dim = q.shape
    n_q, n_k = len_q // block_q, k.shape[1] // block_kv
    # Blocked, head-major views: q [B, H, nq, bq, D]; k, v [B, H, nk, bkv, D].
    qb = q.reshape(batch, n_q, block_q, heads, dim).transpose(0, 3, 1, 2, 4).astype(jnp.float32) * scale
    kb = k.reshape(batch, n_k, block_kv, heads, dim).transpose(0, 3, 1, 2, 4)
    vb = v.reshape(batch, n_k, block_kv, heads, dim).transpose(0, 3, 1, 2, 4)
    table_shape = (batch, heads, n_q)
    indices = jnp.broadcast_to(kv_indices, table_shape + kv_indices.shape[-1:])
    counts = jnp.broadcast_to(kv_counts, table_shape)
    key_offsets = jnp.arange(block_kv, dtype=jnp.int32)

    def fold_in_block(carry, slot):
        acc, row_max, row_sum = carry  # [B,H,nq,bq,D], [B,H,nq,bq], [B,H,nq,bq]
        block_ids = jnp.clip(indices[..., slot], 0, n_k - 1)  # [B, H, nq]
        k_blk = jnp.take_along_axis(kb, block_ids[..., None, None], axis=2).astype(jnp.float32)
        v_blk = jnp.take_along_axis(vb, block_ids[..., None, None], axis=2).astype(jnp.float32)
        logits = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, k_blk, precision=jax.lax.Precision.HIGHEST)
        key_pos = block_ids[..., None] * block_kv + key_offsets  # [B, H, nq, bkv]
        allowed = (key_pos < kv_len) & (slot < counts)[..., None]
        logits = jnp.where(allowed[..., None, :], logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
        # Rows that have seen no allowed key keep max = -inf; shift by 0 there to avoid inf - inf.
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        correction = jnp.exp(row_max - safe_max)
        weights = jnp.exp(logits - safe_max[..., None])
        acc = acc * correction[..., None] + jnp.einsum(
            "bhnqk,bhnkd->bhnqd", weights, v_blk, precision=jax.lax.Precision.HIGHEST)
        row_sum = row_sum * correction + jnp.sum(weights, axis=-1)
        return (acc, new_max, row_sum), None

    init = (
        jnp.zeros((batch, heads, n_q, block_q, dim), jnp.float32),
        jnp.full((batch, heads, n_q, block_q), -jnp.inf, jnp.float32),
        jnp.zeros((batch, heads, n_q, block_q), jnp.float32),
    )
    (acc, _, row_sum), _ = jax.lax.scan(fold_in_block, init, jnp.arange(indices.shape[-1]))
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[..., None]
    return out.transpose(0, 2, 3, 1, 4).reshape(batch, len_q, heads, dim).astype(q.dtype)
