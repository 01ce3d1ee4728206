"""The one call from the attention layer into the block-sparse kernels.

`pallas_kernels.api.block_sparse_attention` picks the implementation (Mosaic GPU on Hopper,
else the portable jnp path). Until that module lands, the local implementations are used.
TODO(coordinator): drop the fallback below once pallas_kernels/api.py is in the tree.
"""
from __future__ import annotations

import jax

__all__ = ["block_sparse_attention", "LOCAL_IMPLEMENTATIONS"]

LOCAL_IMPLEMENTATIONS = ("portable", "reference")


def _local(implementation: str | None):
    from pallas_kernels.portable import block_sparse_attention_portable
    from pallas_kernels.reference import block_sparse_attention_reference

    if implementation in (None, "portable"):
        return block_sparse_attention_portable
    if implementation == "reference":
        return block_sparse_attention_reference
    raise ValueError(f"implementation={implementation!r}; expected None or one of {LOCAL_IMPLEMENTATIONS}")


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_indices, kv_counts, *,
                           block_q: int, block_kv: int, scale: float | None, kv_len=None,
                           implementation: str | None = None) -> jax.Array:
    """DESIGN.md's contract: q [B, Sq, H, D], k/v [B, Sk, H, D], tables [B|1, H|1, Sq/block_q, M]."""
    try:
        from pallas_kernels.api import block_sparse_attention as api_block_sparse_attention
    except ModuleNotFoundError as err:
        if err.name != "pallas_kernels.api":
            raise
        fn = _local(implementation)
        return fn(q, k, v, kv_indices, kv_counts, block_q=block_q, block_kv=block_kv, scale=scale,
                  kv_len=kv_len)
    return api_block_sparse_attention(q, k, v, kv_indices, kv_counts, block_q=block_q, block_kv=block_kv,
                                      scale=scale, kv_len=kv_len, implementation=implementation)
