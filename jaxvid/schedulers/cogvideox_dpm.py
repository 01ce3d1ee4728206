"""CogVideoX's DPM-Solver++(2M) SDE scheduler (diffusers `CogVideoXDPMScheduler`) as pure functions.

The noise schedule is the one `cogvideox_ddim.py` builds. Each step adds fresh Gaussian noise (even
with eta=0, as diffusers does); the caller passes it explicitly, e.g. drawn from
`jax.random.fold_in(key, step_index)`, so a whole denoising loop stays one pure jitted function.

diffusers' `step(model_output, old_pred_original_sample, timestep, timestep_back, sample)` maps to
`step(config, state, model_output, sample, step_index, old_pred_original_sample=..., noise=...)`: the
pipeline passes `timestep_back = timesteps[i - 1]` (None at i = 0), which the state precomputes, and
the second-order update runs where that exists and the previous timestep is >= 0.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxvid.schedulers.cogvideox_ddim import (
    CogVideoXSchedulerConfig,
    SchedulerStepOutput,
    alphas_cumprod,
    coefficient,
    predict_original_sample,
    step_alphas,
)

# The DPM scheduler's name for the shared config (same fields and defaults as DDIM's in diffusers).
CogVideoXDPMConfig = CogVideoXSchedulerConfig


class CogVideoXDPMState(NamedTuple):
    """Per-step tables of `CogVideoXDPMScheduler` for N steps (a jax pytree); all float [N] unless noted.

    timesteps: int32 [N], the model's timestep at each step (descending).
    alphas_cumprod: float [num_train_timesteps].
    sqrt_alpha_prod, sqrt_beta_prod: sqrt(a_t), sqrt(1 - a_t), for the x_0 estimate.
    sample_mult, denoised_mult, noise_mult: x_{t-1} = sample_mult * x_t - denoised_mult * D + noise_mult * z.
    current_mult, previous_mult: second-order D = current_mult * x_0 - previous_mult * x_0_prev.
    second_order: bool [N], whether step i uses the second-order D (else D = x_0).
    """

    timesteps: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alpha_prod: jax.Array
    sqrt_beta_prod: jax.Array
    sample_mult: jax.Array
    denoised_mult: jax.Array
    noise_mult: jax.Array
    current_mult: jax.Array
    previous_mult: jax.Array
    second_order: jax.Array


def _half_log_snr(alpha: np.ndarray) -> np.ndarray:
    return np.log((alpha / (1.0 - alpha)) ** 0.5)


def set_timesteps(config: CogVideoXDPMConfig, num_inference_steps: int) -> CogVideoXDPMState:
    """Builds the state for `num_inference_steps` steps (diffusers' `set_timesteps`).

    With zero terminal SNR and set_alpha_to_one the log-SNRs reach -inf / +inf at the ends; the
    multipliers then take their IEEE limits exactly as diffusers' float64 arithmetic does.
    """
    timesteps, alpha_t, alpha_prev, prev = step_alphas(config, num_inference_steps)
    # diffusers' timestep_back is timesteps[i - 1]; at i = 0 there is none (first-order step).
    alpha_back = np.concatenate([alpha_t[:1], alpha_t[:-1]])
    second_order = (np.arange(num_inference_steps) > 0) & (prev >= 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lamb = _half_log_snr(alpha_t)
        h = _half_log_snr(alpha_prev) - lamb
        r = (lamb - _half_log_snr(alpha_back)) / h
        sample_mult = ((1.0 - alpha_prev) / (1.0 - alpha_t)) ** 0.5 * np.exp(-h)
        denoised_mult = np.expm1(-2.0 * h) * alpha_prev**0.5
        noise_mult = (1.0 - alpha_prev) ** 0.5 * (1.0 - np.exp(-2.0 * h)) ** 0.5
        current_mult = np.where(second_order, 1.0 + 1.0 / (2.0 * r), 1.0)
        previous_mult = np.where(second_order, 1.0 / (2.0 * r), 0.0)
    return CogVideoXDPMState(
        timesteps=jnp.asarray(timesteps.astype(np.int32)),
        alphas_cumprod=jnp.asarray(alphas_cumprod(config)),
        sqrt_alpha_prod=jnp.asarray(alpha_t**0.5),
        sqrt_beta_prod=jnp.asarray((1.0 - alpha_t) ** 0.5),
        sample_mult=jnp.asarray(sample_mult),
        denoised_mult=jnp.asarray(denoised_mult),
        noise_mult=jnp.asarray(noise_mult),
        current_mult=jnp.asarray(current_mult),
        previous_mult=jnp.asarray(previous_mult),
        second_order=jnp.asarray(second_order),
    )


def step(
    config: CogVideoXDPMConfig,
    state: CogVideoXDPMState,
    model_output: jax.Array,
    sample: jax.Array,
    step_index: jax.Array | int,
    *,
    old_pred_original_sample: jax.Array,
    noise: jax.Array,
) -> SchedulerStepOutput:
    """One DPM-Solver++(2M) SDE step x_t -> x_{t-1} at `step_index` (may be traced).

    model_output, sample, noise, old_pred_original_sample: same shape. old_pred_original_sample is
    the previous step's `pred_original_sample` (anything finite, e.g. zeros, at step 0: unused there).
    noise ~ N(0, 1) is the draw diffusers makes for the branch taken (its second draw on
    second-order steps). Returns the new sample and this step's x_0, to carry to the next step.
    """
    dtype = jnp.result_type(model_output.dtype, sample.dtype)
    pred_original = predict_original_sample(
        config,
        coefficient(state.sqrt_alpha_prod, step_index, dtype),
        coefficient(state.sqrt_beta_prod, step_index, dtype),
        model_output,
        sample,
    )
    second_order_denoised = (
        coefficient(state.current_mult, step_index, dtype) * pred_original
        - coefficient(state.previous_mult, step_index, dtype) * old_pred_original_sample
    )
    denoised = jnp.where(state.second_order[step_index], second_order_denoised, pred_original)
    prev = (
        coefficient(state.sample_mult, step_index, dtype) * sample
        - coefficient(state.denoised_mult, step_index, dtype) * denoised
        + coefficient(state.noise_mult, step_index, dtype) * noise
    )
    return SchedulerStepOutput(prev_sample=prev.astype(dtype), pred_original_sample=pred_original)
