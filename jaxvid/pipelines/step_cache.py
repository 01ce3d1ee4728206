"""Step caching: reuse a layer's attention output across nearby denoising steps (opt-in).

    PyramidAttentionBroadcast(block_skip_range=2, timestep_skip_range=(100, 800))

Pyramid attention broadcast (Zhao et al. 2024, arXiv 2408.12588), as diffusers applies it to
CogVideoX (`diffusers.hooks.PyramidAttentionBroadcastConfig` with spatial_attention_block_skip_range):
every transformer block's self-attention output is kept from the step that computed it; at step i
(0-based, counting the steps this call runs) the attention is computed again when i == 0, when the
step's timestep t is outside the open interval timestep_skip_range, or when i % block_skip_range
== 0, and the kept output is used otherwise. The rest of each block (norms, MLP, gates) always
runs, so only attention is saved; the kept outputs live in the jitted loop's carry
([layers, batch, tokens, width] in the model dtype: about 9 GB for CogVideoX-5b at 49 x 480 x 720
with guidance).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["PyramidAttentionBroadcast"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PyramidAttentionBroadcast:
    """Recompute attention every `block_skip_range` steps inside timestep_skip_range (open interval)."""

    block_skip_range: int = 2
    timestep_skip_range: tuple[int, int] = (100, 800)

    def __post_init__(self) -> None:
        n = self.block_skip_range
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"block_skip_range={n!r}; expected an int >= 1 (1: never reuse)")
        lo, hi = (tuple(self.timestep_skip_range) + (None, None))[:2]
        if len(tuple(self.timestep_skip_range)) != 2 or not all(isinstance(v, (int, float)) for v in (lo, hi)) \
                or lo >= hi:
            raise ValueError(f"timestep_skip_range={self.timestep_skip_range!r}; expected (low, high) with low < high")
        object.__setattr__(self, "timestep_skip_range", (lo, hi))

    def reuse_at(self, step: jax.Array | int, timestep: jax.Array | int) -> jax.Array:
        """bool scalar: whether step `step` (timestep `timestep`) reuses the kept attention outputs."""
        lo, hi = self.timestep_skip_range
        step = jnp.asarray(step)
        inside = (timestep > lo) & (timestep < hi)
        return (step > 0) & inside & (step % self.block_skip_range != 0)
