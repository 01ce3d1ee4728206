"""Classifier-free guidance as the two pipelines do it.

Both pipelines run the model on the doubled batch [uncond; cond] (negative prompt first) and split
it with `split_cfg_batch`. CogVideoX combines with `classifier_free_guidance`, its guidance scale
per step from `cogvideox_guidance_scales` (the cosine-ramped `use_dynamic_cfg` schedule). LongCat
uses the CFG-Zero* optimized scale (`longcat_guidance`), then negates the result for its scheduler.

Guidance scales may be traced arrays (so a new scale does not recompile); they are cast to the
prediction dtype first, as torch rounds a Python scalar to the tensor dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# diffusers' CogVideoXPipeline dynamic CFG: scale = 1 + g * (1 - cos(pi * ((N - t) / N) ** 5)) / 2.
DYNAMIC_CFG_EXPONENT = 5
# LongCat's optimized_scale adds this to ||uncond||^2 before dividing.
OPTIMIZED_SCALE_EPS = 1e-8


def split_cfg_batch(prediction: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[2B, ...] -> (uncond [B, ...], cond [B, ...]): torch's `chunk(2)` on the batch axis."""
    if prediction.shape[0] % 2:
        raise ValueError(f"prediction has batch {prediction.shape[0]}: expected an even [uncond; cond] batch")
    half = prediction.shape[0] // 2
    return prediction[:half], prediction[half:]


def classifier_free_guidance(uncond: jax.Array, cond: jax.Array, guidance_scale: jax.Array | float) -> jax.Array:
    """uncond + g * (cond - uncond); uncond, cond: same shape; g scalar (may be traced)."""
    g = jnp.asarray(guidance_scale).astype(cond.dtype)
    return uncond + g * (cond - uncond)


def cogvideox_guidance_scales(
    guidance_scale: float, timesteps: np.ndarray, *, use_dynamic_cfg: bool, num_inference_steps: int | None = None
) -> np.ndarray:
    """Per-step guidance scale of diffusers' CogVideoXPipeline, float64 [N] (index with the step index).

    With use_dynamic_cfg: 1 + g * (1 - cos(pi * ((N - t) / N) ** 5)) / 2 with the integer timestep t
    (so (N - t) / N is mostly negative and huge: diffusers' formula, kept as is). It is evaluated
    here in float64 because its cosine argument reaches ~1e7, where float32 would be meaningless.
    num_inference_steps defaults to len(timesteps), which is what the pipeline uses.
    """
    ts = np.asarray(timesteps, dtype=np.float64)
    if ts.ndim != 1:
        raise ValueError(f"timesteps has shape {ts.shape}: expected [N]")
    n = len(ts) if num_inference_steps is None else num_inference_steps
    if not use_dynamic_cfg:
        return np.full(ts.shape, float(guidance_scale))
    ramp = ((n - ts) / n) ** DYNAMIC_CFG_EXPONENT
    return 1.0 + guidance_scale * (1.0 - np.cos(math.pi * ramp)) / 2.0


def optimized_scale(cond: jax.Array, uncond: jax.Array) -> jax.Array:
    """CFG-Zero*'s s* = <cond, uncond> / (||uncond||^2 + 1e-8) per sample: [B, ...] -> [B, 1, ..., 1].

    Products are rounded to the input dtype before summing and the sums accumulate in float32, as
    torch does for bf16.
    """
    axes = tuple(range(1, cond.ndim))
    dot = jnp.sum(cond * uncond, axis=axes, keepdims=True, dtype=jnp.float32).astype(cond.dtype)
    norm = jnp.sum(uncond**2, axis=axes, keepdims=True, dtype=jnp.float32).astype(cond.dtype)
    return dot / (norm + jnp.asarray(OPTIMIZED_SCALE_EPS, cond.dtype))


def longcat_guidance(uncond: jax.Array, cond: jax.Array, guidance_scale: jax.Array | float) -> jax.Array:
    """LongCat's CFG: uncond * s* + g * (cond - uncond * s*), s* = `optimized_scale` per sample.

    uncond, cond: [B, C, T, H, W] (any shape with batch first). Upstream reshapes s* to
    (B, 1, 1, 1) against 5-D latents, which only broadcasts as meant for B = 1; here s* is per
    sample for every B (identical at B = 1). The pipeline negates the result before `step`.
    """
    s = optimized_scale(cond, uncond)
    g = jnp.asarray(guidance_scale).astype(cond.dtype)
    return uncond * s + g * (cond - uncond * s)
