"""Default tuning configs for the Mosaic block-sparse kernel, and the space the tuner searches.

Block sizes are not tuned: for BSA and radial they are the chunk size, a meaning (see DESIGN.md).
What is tuned is how deep the K/V ring is and whether the consumer warpgroups ping-pong.
"""
from __future__ import annotations

import itertools

import jax.numpy as jnp

from pallas_kernels.block_sparse_mgpu import TuningConfig

__all__ = ["default_config", "tuning_space"]

# (head_dim, block_q, block_kv) -> best of `tuning_space` by bench/attention.py --sweep on an
# H100 80GB HBM3, jax 0.11.2 (CogVideoX-2b dense for D64; LongCat 720p BSA 0.9375 for D128).
# Where a shape is missing, the deepest ring that fits wins.
_MEASURED: dict[tuple[int, int, int], TuningConfig] = {
    (64, 128, 128): TuningConfig(num_slots=2, use_schedule_barrier=True),    # 10.85 ms vs 11.70 (3 slots)
    (128, 64, 64): TuningConfig(num_slots=2, use_schedule_barrier=False),    # 15.89 ms vs 16.91
    (128, 128, 128): TuningConfig(num_slots=3, use_schedule_barrier=True),   # 12.27 ms vs 12.72
}


def default_config(*, head_dim: int, block_q: int, block_kv: int, dtype=jnp.bfloat16) -> TuningConfig:
    """The config used when the caller passes none: a measured one, else the deepest ring that
    fits in shared memory, capped at 3 slots (deeper rings did not pay in FA3-style kernels);
    full-size K/V tiles are preferred over split ones."""
    measured = _MEASURED.get((head_dim, block_q, block_kv))
    if measured is not None:
        return measured
    itemsize = jnp.dtype(dtype).itemsize
    tiles = (None, 64) if block_kv > 64 else (None,)
    for tile, slots in itertools.product(tiles, (3, 2)):
        cfg = TuningConfig(num_slots=slots, kv_tile=tile)
        if cfg.fits(block_q=block_q, block_kv=block_kv, head_dim=head_dim, itemsize=itemsize):
            return cfg
    raise ValueError(f"no TuningConfig fits shared memory for head_dim={head_dim}, "
                     f"block_q={block_q}, block_kv={block_kv}, dtype={jnp.dtype(dtype)}")


def tuning_space(*, head_dim: int, block_q: int, block_kv: int, dtype=jnp.bfloat16) -> list[TuningConfig]:
    """Every config that fits shared memory for these shapes."""
    itemsize = jnp.dtype(dtype).itemsize
    space = []
    tiles = (None, 64) if block_kv > 64 else (None,)
    for tile, slots, sched in itertools.product(
            tiles, range(TuningConfig.MIN_SLOTS, TuningConfig.MAX_SLOTS + 1), (True, False)):
        cfg = TuningConfig(num_slots=slots, use_schedule_barrier=sched, kv_tile=tile)
        if cfg.fits(block_q=block_q, block_kv=block_kv, head_dim=head_dim, itemsize=itemsize):
            space.append(cfg)
    return space
