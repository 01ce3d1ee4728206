"""CogVideoX's DDIM scheduler (diffusers `CogVideoXDDIMScheduler`) as pure functions.

Also home of the noise schedule both CogVideoX schedulers share (betas, SNR shift, zero-terminal-SNR
rescale, timestep spacing): `cogvideox_dpm.py` imports it from here.

Everything that depends only on the config and the step count is computed once in float64 numpy
by `set_timesteps` and stored as per-step tables in the state, so `step` indexes them with a traced
step index inside a `lax.fori_loop`. Tables are float64 when jax x64 is on, float32 otherwise;
diffusers also computes these coefficients in float64 (scaled_linear betas) and rounds them to the
sample dtype when it multiplies, so float32 runs agree to rounding.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

# The CogVideoX pipeline scales the initial noise by this and its `scale_model_input` is the identity.
INIT_NOISE_SIGMA = 1.0

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

# Keys diffusers' CogVideoX schedulers accept but never read in `step` (no clipping happens there).
_ACCEPTED_WITHOUT_EFFECT = frozenset({"clip_sample", "clip_sample_range", "sample_max_value"})


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CogVideoXSchedulerConfig:
    """Fields of diffusers' CogVideoX schedulers (`scheduler/scheduler_config.json`), diffusers' defaults.

    DDIM and DPM share this config and its defaults (diffusers' DPM docstring lists linear
    0.0001..0.02 betas, but its signature defaults are DDIM's, and the signature is what runs).
    `clip_sample`, `clip_sample_range` and `sample_max_value` are accepted by `from_hf_config` and
    dropped: diffusers' CogVideoX `step` ignores them too.
    """

    beta_start: float = 0.00085
    beta_end: float = 0.0120
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    trained_betas: tuple[float, ...] | None = None
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    snr_shift_scale: float = 3.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r}: expected a positive int")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={self.beta_schedule!r}: expected one of {BETA_SCHEDULES}")
        if not 0.0 <= self.beta_start <= 1.0 or not 0.0 <= self.beta_end <= 1.0:
            raise ValueError(f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r}: expected values in [0, 1]")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(
                f"trained_betas has {len(self.trained_betas)} entries: expected num_train_timesteps="
                f"{self.num_train_timesteps}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r}: expected one of {PREDICTION_TYPES}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing={self.timestep_spacing!r}: expected one of {TIMESTEP_SPACINGS}")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset={self.steps_offset!r}: expected an int >= 0")
        if not self.snr_shift_scale > 0:
            raise ValueError(f"snr_shift_scale={self.snr_shift_scale!r}: expected a positive number")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], **overrides: Any) -> "CogVideoXSchedulerConfig":
        """Reads a diffusers `scheduler_config.json` dict; missing keys take this class's defaults.

        Keys starting with `_` (`_class_name`, `_diffusers_version`) and keys diffusers would not
        expect are ignored with a log line, as diffusers' `from_config` does.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        ignored = []
        for key, value in {**config, **overrides}.items():
            if key.startswith("_") or key in _ACCEPTED_WITHOUT_EFFECT:
                continue
            if key not in known:
                ignored.append(key)
                continue
            values[key] = value
        if ignored:
            logger.warning("%s ignores unexpected config keys %s", cls.__name__, sorted(ignored))
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        return cls(**values)


# The DDIM scheduler's name for the shared config.
CogVideoXDDIMConfig = CogVideoXSchedulerConfig


class SchedulerStepOutput(NamedTuple):
    """prev_sample: x_{t-1}; pred_original_sample: the x_0 estimate (carried by the DPM solver)."""

    prev_sample: jax.Array
    pred_original_sample: jax.Array


class CogVideoXDDIMState(NamedTuple):
    """Per-step tables of `CogVideoXDDIMScheduler` for N inference steps (a jax pytree).

    timesteps: int32 [N], the model's timestep at each step (descending).
    alphas_cumprod: float [num_train_timesteps], the shifted / rescaled cumulative alphas.
    sqrt_alpha_prod, sqrt_beta_prod: float [N], sqrt(a_t) and sqrt(1 - a_t) at each step.
    sample_coef, pred_original_coef: float [N], prev_sample = sample_coef * x_t + pred_original_coef * x_0.
    """

    timesteps: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alpha_prod: jax.Array
    sqrt_beta_prod: jax.Array
    sample_coef: jax.Array
    pred_original_coef: jax.Array


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    # diffusers' "squaredcos_cap_v2" (cosine alpha-bar); built in float64, stored as float32 like torch.
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.asarray(betas, dtype=np.float32)


def alphas_cumprod(config: CogVideoXSchedulerConfig) -> np.ndarray:
    """The cumulative alpha products a_t, float64 [num_train_timesteps], as diffusers builds them.

    Precision follows diffusers: scaled_linear betas are float64; linear, cosine and trained betas
    are float32 and their products are rounded to float32 (torch's cumprod accumulates in double).
    """
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    else:
        betas = _betas_for_alpha_bar(n)
    alphas = (betas.dtype.type(1.0) - betas).astype(betas.dtype)
    cumprod = np.cumprod(alphas.astype(np.float64)).astype(betas.dtype)
    dt = cumprod.dtype.type
    cumprod = (cumprod / (dt(config.snr_shift_scale) + (dt(1) - dt(config.snr_shift_scale)) * cumprod)).astype(
        cumprod.dtype
    )
    if config.rescale_betas_zero_snr:
        # Zero terminal SNR (arXiv 2305.08891, Algorithm 1): shift sqrt(a) so the last is 0, rescale so the first is kept.
        root = np.sqrt(cumprod)
        first, last = root[0], root[-1]
        root = (root - last) * (first / (first - last))
        cumprod = (root**2).astype(cumprod.dtype)
    return cumprod.astype(np.float64)


def inference_timesteps(config: CogVideoXSchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """The int64 [N] descending timesteps of diffusers' `set_timesteps` for the configured spacing."""
    n_train = config.num_train_timesteps
    if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= n_train:
        raise ValueError(
            f"num_inference_steps={num_inference_steps!r}: expected an int in [1, num_train_timesteps={n_train}]"
        )
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, num_inference_steps).round()[::-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = n_train // num_inference_steps
        return (np.arange(num_inference_steps) * ratio).round()[::-1].astype(np.int64) + config.steps_offset
    ratio = n_train / num_inference_steps
    return np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1


def step_alphas(config: CogVideoXSchedulerConfig, num_inference_steps: int):
    """(timesteps, a_t, a_prev, prev_timesteps) per step, float64, as diffusers' `step` looks them up.

    diffusers takes the previous timestep as t - num_train_timesteps // N whatever the spacing, and
    uses the final alpha (1, or a_0 without set_alpha_to_one) once that goes below 0.
    """
    cumprod = alphas_cumprod(config)
    timesteps = inference_timesteps(config, num_inference_steps)
    if timesteps.max() >= config.num_train_timesteps:
        raise ValueError(
            f"steps_offset={config.steps_offset} puts timestep {timesteps.max()} past num_train_timesteps="
            f"{config.num_train_timesteps}"
        )
    prev = timesteps - config.num_train_timesteps // num_inference_steps
    final = 1.0 if config.set_alpha_to_one else cumprod[0]
    alpha_t = cumprod[timesteps]
    alpha_prev = np.where(prev >= 0, cumprod[np.maximum(prev, 0)], final)
    return timesteps, alpha_t, alpha_prev, prev


def set_timesteps(config: CogVideoXDDIMConfig, num_inference_steps: int) -> CogVideoXDDIMState:
    """Builds the state for `num_inference_steps` steps (diffusers' `set_timesteps`)."""
    timesteps, alpha_t, alpha_prev, _ = step_alphas(config, num_inference_steps)
    beta_t = 1.0 - alpha_t
    with np.errstate(divide="ignore", invalid="ignore"):
        sample_coef = ((1.0 - alpha_prev) / beta_t) ** 0.5
    pred_original_coef = alpha_prev**0.5 - alpha_t**0.5 * sample_coef
    return CogVideoXDDIMState(
        timesteps=jnp.asarray(timesteps.astype(np.int32)),
        alphas_cumprod=jnp.asarray(alphas_cumprod(config)),
        sqrt_alpha_prod=jnp.asarray(alpha_t**0.5),
        sqrt_beta_prod=jnp.asarray(beta_t**0.5),
        sample_coef=jnp.asarray(sample_coef),
        pred_original_coef=jnp.asarray(pred_original_coef),
    )


def coefficient(table: jax.Array, step_index: jax.Array | int, dtype) -> jax.Array:
    """table[step_index] in `dtype`: torch rounds a 0-d coefficient to the tensor's dtype, never promotes."""
    return table[step_index].astype(dtype)


def predict_original_sample(
    config: CogVideoXSchedulerConfig,
    sqrt_alpha_prod: jax.Array,
    sqrt_beta_prod: jax.Array,
    model_output: jax.Array,
    sample: jax.Array,
) -> jax.Array:
    """x_0 from the model output for the configured prediction type (same shape as sample)."""
    if config.prediction_type == "epsilon":
        return (sample - sqrt_beta_prod * model_output) / sqrt_alpha_prod
    if config.prediction_type == "sample":
        return model_output
    return sqrt_alpha_prod * sample - sqrt_beta_prod * model_output


def step(
    config: CogVideoXDDIMConfig,
    state: CogVideoXDDIMState,
    model_output: jax.Array,
    sample: jax.Array,
    step_index: jax.Array | int,
) -> SchedulerStepOutput:
    """One deterministic DDIM step x_t -> x_{t-1} at `step_index` (may be traced).

    model_output, sample: same shape, any layout (the update is elementwise). diffusers' `eta` and
    generator are accepted there but unused, so there is no noise here.
    """
    dtype = jnp.result_type(model_output.dtype, sample.dtype)
    sqrt_alpha = coefficient(state.sqrt_alpha_prod, step_index, dtype)
    sqrt_beta = coefficient(state.sqrt_beta_prod, step_index, dtype)
    pred_original = predict_original_sample(config, sqrt_alpha, sqrt_beta, model_output, sample)
    prev = (
        coefficient(state.sample_coef, step_index, dtype) * sample
        + coefficient(state.pred_original_coef, step_index, dtype) * pred_original
    )
    return SchedulerStepOutput(prev_sample=prev, pred_original_sample=pred_original)


def scale_model_input(sample: jax.Array, timestep: Any = None) -> jax.Array:
    """Identity, as in diffusers' CogVideoX schedulers."""
    del timestep
    return sample


def add_noise(
    alphas_cumprod_table: jax.Array, original_samples: jax.Array, noise: jax.Array, timesteps: jax.Array
) -> jax.Array:
    """sqrt(a_t) * x_0 + sqrt(1 - a_t) * noise; timesteps: int [B], samples: [B, ...]."""
    alpha = alphas_cumprod_table.astype(original_samples.dtype)[timesteps]
    alpha = alpha.reshape(alpha.shape + (1,) * (original_samples.ndim - alpha.ndim))
    return alpha**0.5 * original_samples + (1 - alpha) ** 0.5 * noise
