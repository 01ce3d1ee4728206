"""Ground truth for block-sparse attention: materialise the token mask, softmax in fp32.

Also the conversions between a block mask and the kernel contract's index lists:

    kv_indices int32 [B or 1, H or 1, n_q_blocks, max_blocks]  sorted, entries past the count ignored
    kv_counts  int32 [B or 1, H or 1, n_q_blocks]

Everything here runs anywhere (CPU CI); it is O(Sq x Sk) in memory, so use it on small shapes.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "block_mask_to_indices",
    "indices_to_block_mask",
    "block_sparse_attention_reference",
    "check_block_sparse_args",
]


def block_mask_to_indices(mask, max_blocks: int | None = None):
    """Block mask [..., n_q, n_k] bool -> (kv_indices [..., n_q, max_blocks], kv_counts [..., n_q]).

    Indices of each row are the True columns in ascending order; slots past the count repeat the
    row's last valid index (0 for empty rows), so a kernel that over-fetches stays in bounds.
    A numpy mask gives numpy int32 tables, with `max_blocks` defaulting to the largest row count
    (at least 1). A jax mask (may be traced) gives jnp tables with `max_blocks` defaulting to n_k,
    the only static bound. A smaller `max_blocks` than a row's count raises (numpy) or is the
    caller's promise (jax).
    """
    if isinstance(mask, np.ndarray):
        return _block_mask_to_indices_np(mask, max_blocks)
    return _block_mask_to_indices_jnp(jnp.asarray(mask), max_blocks)


def _block_mask_to_indices_np(mask: np.ndarray, max_blocks: int | None):
    if mask.ndim < 2:
        raise ValueError(f"block_mask_to_indices: mask.shape={mask.shape}; expected [..., n_q, n_k]")
    mask = mask.astype(bool)
    n_k = mask.shape[-1]
    counts = mask.sum(axis=-1).astype(np.int32)
    needed = max(int(counts.max(initial=0)), 1)
    if max_blocks is None:
        max_blocks = needed
    if max_blocks < needed:
        raise ValueError(f"block_mask_to_indices: max_blocks={max_blocks} < largest row count {needed}")
    # A stable sort of "not selected" puts the selected columns first, in ascending order.
    order = np.argsort(~mask, axis=-1, kind="stable").astype(np.int32)
    if max_blocks > n_k:
        order = np.concatenate([order, np.zeros(order.shape[:-1] + (max_blocks - n_k,), np.int32)], -1)
    order = order[..., :max_blocks]
    last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
    last = np.where(counts[..., None] > 0, last, 0)
    slots = np.arange(max_blocks, dtype=np.int32)
    indices = np.where(slots < counts[..., None], order, last).astype(np.int32)
    return indices, counts


def _block_mask_to_indices_jnp(mask: jax.Array, max_blocks: int | None):
    if mask.ndim < 2:
        raise ValueError(f"block_mask_to_indices: mask.shape={mask.shape}; expected [..., n_q, n_k]")
    mask = mask.astype(bool)
    n_k = mask.shape[-1]
    if max_blocks is None:
        max_blocks = n_k
    counts = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    order = jnp.argsort(jnp.logical_not(mask), axis=-1, stable=True).astype(jnp.int32)
    if max_blocks > n_k:
        pad = jnp.zeros(order.shape[:-1] + (max_blocks - n_k,), jnp.int32)
        order = jnp.concatenate([order, pad], axis=-1)
    order = order[..., :max_blocks]
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    last = jnp.where(counts[..., None] > 0, last, 0)
    slots = jnp.arange(max_blocks, dtype=jnp.int32)
    indices = jnp.where(slots < jnp.minimum(counts, max_blocks)[..., None], order, last)
    return indices, jnp.minimum(counts, max_blocks)


def indices_to_block_mask(kv_indices, kv_counts, num_kv_blocks: int):
    """(kv_indices [..., n_q, M], kv_counts [..., n_q]) -> block mask [..., n_q, num_kv_blocks] bool.

    numpy in, numpy out; otherwise jnp. Entries past each count are ignored.
    """
    xp = np if isinstance(kv_indices, np.ndarray) and isinstance(kv_counts, np.ndarray) else jnp
    kv_indices = xp.asarray(kv_indices)
    kv_counts = xp.asarray(kv_counts)
    valid = xp.arange(kv_indices.shape[-1]) < kv_counts[..., None]  # [..., n_q, M]
    hits = (kv_indices[..., None] == xp.arange(num_kv_blocks)) & valid[..., None]
    return hits.any(axis=-2)


def check_block_sparse_args(q, k, v, kv_indices, kv_counts, block_q: int, block_kv: int) -> None:
    """Shape checks shared by every implementation of the contract; raises ValueError."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"block_sparse_attention: {name}.shape={x.shape}; expected [B, S, H, D]")
    if k.shape != v.shape:
        raise ValueError(f"block_sparse_attention: k.shape={k.shape} != v.shape={v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"block_sparse_attention: q.shape={q.shape} and k.shape={k.shape} differ in B, H or D")
    if block_q < 1 or block_kv < 1:
        raise ValueError(f"block_sparse_attention: block_q={block_q}, block_kv={block_kv}; expected >= 1")
    if q.shape[1] % block_q:
        raise ValueError(f"block_sparse_attention: q length {q.shape[1]} is not a multiple of block_q={block_q}")
    if k.shape[1] % block_kv:
        raise ValueError(f"block_sparse_attention: k length {k.shape[1]} is not a multiple of block_kv={block_kv}")
    batch, _, heads, _ = q.shape
    n_q = q.shape[1] // block_q
    if kv_indices.ndim != 4 or kv_indices.shape[0] not in (1, batch) or kv_indices.shape[1] not in (1, heads) \
            or kv_indices.shape[2] != n_q:
        raise ValueError(
            f"block_sparse_attention: kv_indices.shape={kv_indices.shape}; expected "
            f"[{batch} or 1, {heads} or 1, {n_q}, max_blocks]")
    if kv_counts.shape != kv_indices.shape[:3]:
        raise ValueError(
            f"block_sparse_attention: kv_counts.shape={kv_counts.shape}; expected {kv_indices.shape[:3]}")


def block_sparse_attention_reference(
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
    """Block-sparse softmax attention by materialising the [Sq, Sk] token mask; fp32 maths.

    q: [B, Sq, H, D]; k, v: [B, Sk, H, D]; tables as in the module docstring (leading dims may be 1).
    Keys at positions >= kv_len get no weight; a query row with no allowed key outputs zeros.
    Returns [B, Sq, H, D] in q's dtype. `scale` defaults to 1/sqrt(D).
    """
    check_block_sparse_args(q, k, v, kv_indices, kv_counts, block_q, block_kv)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if kv_len is None:
        kv_len = k.shape[1]
    return _reference(q, k, v, jnp.asarray(kv_indices, jnp.int32), jnp.asarray(kv_counts, jnp.int32),
                      jnp.asarray(kv_len, jnp.int32), block_q=block_q, block_kv=block_kv, scale=float(scale))


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale"))
def _reference(q, k, v, kv_indices, kv_counts, kv_len, *, block_q: int, block_kv: int, scale: float):
    n_k = k.shape[1] // block_kv
    block_mask = indices_to_block_mask(kv_indices, kv_counts, n_k)  # [b, h, nq, nk]
    token_mask = jnp.repeat(jnp.repeat(block_mask, block_q, axis=-2), block_kv, axis=-1)  # [b, h, Sq, Sk]
    token_mask = token_mask & (jnp.arange(k.shape[1]) < kv_len)
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
    logits = jnp.where(token_mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(token_mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, vf, precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)
