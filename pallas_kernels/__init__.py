"""Block-sparse attention kernels (Pallas Mosaic GPU for Hopper) and their pure-jnp references.

Knows nothing about models: it consumes per-(batch, head, query block) key-block index lists.
Importing this package never imports Mosaic GPU; the kernel module loads it on first use.
"""
from pallas_kernels.api import IMPLEMENTATIONS, block_sparse_attention

__all__ = ["IMPLEMENTATIONS", "block_sparse_attention"]
