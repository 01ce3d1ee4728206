"""Block-sparse attention kernels (Pallas Mosaic GPU for Hopper) and their pure-jnp references.

Knows nothing about models: it consumes per-(batch, head, query block) key-block index lists.
"""
