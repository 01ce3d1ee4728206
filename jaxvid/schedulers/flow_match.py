"""Flow-matching Euler scheduler (diffusers / LongCat `FlowMatchEulerDiscreteScheduler`) as pure functions.

LongCat-Video's pipeline (`longcat_video/pipeline_longcat_video.py` upstream) never lets the
scheduler choose its sigmas: it builds them itself (`longcat_sigmas`: `linspace(1, 0.001, N)`, or
the distilled schedule for the cfg-step LoRA) and passes them to `set_timesteps`, which still
applies the config's `shift`. Video continuation with `enhance_hf` and the 720p refinement then
replace the timesteps (`enhance_hf_timesteps`, `refine_timesteps`, then `state_from_timesteps`).

All tables are float32 like diffusers' (its `step` upcasts the sample to float32 too). The model's
velocity enters negated in LongCat (`noise_pred = -noise_pred` upstream): that sign belongs to the
pipeline, not to `step`.
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

TIME_SHIFT_TYPES = ("exponential", "linear")

# LongCat pipeline constants (`_num_timesteps`, `_num_distill_sample_steps` upstream).
LONGCAT_NUM_TIMESTEPS = 1000
LONGCAT_NUM_DISTILL_SAMPLE_STEPS = 50
# generate_vc(enhance_hf=True): timesteps above 500 are kept, then 10 uniform steps from 500 down.
ENHANCE_HF_TAIL_START = 500.0
ENHANCE_HF_TAIL_STEPS = 10


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class FlowMatchConfig:
    """Fields of `FlowMatchEulerDiscreteScheduler` (`scheduler/scheduler_config.json`), diffusers' defaults.

    The sigma re-mappings LongCat never uses (Karras, exponential, beta sigmas, inverted sigmas) and
    stochastic sampling are rejected rather than silently ignored.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int | None = 256
    max_image_seq_len: int | None = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r}: expected a positive int")
        if not self.shift > 0:
            raise ValueError(f"shift={self.shift!r}: expected a positive number")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type={self.time_shift_type!r}: expected one of {TIME_SHIFT_TYPES}")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"shift_terminal={self.shift_terminal!r}: expected None or a value in [0, 1)")
        for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                     "stochastic_sampling"):
            if getattr(self, name):
                raise ValueError(f"{name}=True: not supported (LongCat-Video's scheduler config leaves it False)")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], **overrides: Any) -> "FlowMatchConfig":
        """Reads a diffusers `scheduler_config.json` dict; `_`-keys and unknown keys are ignored (logged)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        ignored = []
        for key, value in {**config, **overrides}.items():
            if key.startswith("_"):
                continue
            if key not in known:
                ignored.append(key)
                continue
            values[key] = value
        if ignored:
            logger.warning("FlowMatchConfig ignores unexpected config keys %s", sorted(ignored))
        return cls(**values)


class FlowMatchState(NamedTuple):
    """timesteps: float32 [N], the model's timestep per step; sigmas: float32 [N + 1], ending in 0."""

    timesteps: jax.Array
    sigmas: jax.Array


def torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps)` in float32, bit for bit on x86 CPUs with FMA.

    torch fills the first half as start + i * step and the second as end - (steps - 1 - i) * step,
    step rounded to float32, each point one fused multiply-add (checked equal for steps <= 1000).
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps)
    values = np.where(i < steps // 2, np.float64(start32) + step * i, np.float64(end32) - step * (steps - 1 - i))
    return values.astype(np.float32)


def longcat_sigmas(
    num_inference_steps: int,
    *,
    use_distill: bool = False,
    num_timesteps: int = LONGCAT_NUM_TIMESTEPS,
    num_distill_sample_steps: int = LONGCAT_NUM_DISTILL_SAMPLE_STEPS,
) -> np.ndarray:
    """LongCat's `get_timesteps_sigmas`: float32 [N] sigmas handed to `set_timesteps`.

    Default: linspace(1, 0.001, N). Distilled (cfg-step LoRA): the N-step subset, floor-spaced,
    of the 50 distillation sigmas 1.0, 0.98, ..., 0.02.
    """
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r}: expected a positive int")
    if not use_distill:
        return torch_linspace_float32(1.0, 0.001, num_inference_steps)
    if num_inference_steps > num_distill_sample_steps:
        # Upstream would repeat the first timestep, start diffusers' step index at 1 and step past the end.
        raise ValueError(
            f"num_inference_steps={num_inference_steps}: the distilled schedule has at most "
            f"num_distill_sample_steps={num_distill_sample_steps} steps"
        )
    distill = np.round(
        np.arange(1, num_distill_sample_steps + 1, dtype=np.float32) * (num_timesteps // num_distill_sample_steps)
    ).astype(np.int64)
    picks = np.floor(np.linspace(0, num_distill_sample_steps, num=num_inference_steps, endpoint=False)).astype(np.int64)
    return (distill[::-1][picks].astype(np.float32) / np.float32(num_timesteps)).astype(np.float32)


def _time_shift(config: FlowMatchConfig, mu: float, t: np.ndarray) -> np.ndarray:
    if config.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    return mu / (mu + (1 / t - 1) ** 1.0)


def _default_sigma_range(config: FlowMatchConfig) -> tuple[float, float]:
    # diffusers' __init__ builds a 1000-point table (shifted unless dynamic) and keeps its ends;
    # set_timesteps then shifts again, which is diffusers' behaviour and kept here.
    n = config.num_train_timesteps
    sigmas = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    if not config.use_dynamic_shifting:
        sigmas = config.shift * sigmas / (1 + (config.shift - 1) * sigmas)
    return float(sigmas[0]), float(sigmas[-1])


def set_timesteps(
    config: FlowMatchConfig,
    num_inference_steps: int | None = None,
    *,
    sigmas: np.ndarray | None = None,
    mu: float | None = None,
) -> FlowMatchState:
    """diffusers' `set_timesteps(num_inference_steps, sigmas=..., mu=...)` -> the state.

    sigmas: float [N] descending noise levels (LongCat passes `longcat_sigmas(N)`); None gives the
    scheduler's own linear schedule. mu: required with use_dynamic_shifting.
    """
    if config.use_dynamic_shifting and mu is None:
        raise ValueError("mu=None: expected a float when use_dynamic_shifting is True")
    if sigmas is None:
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: expected a positive int")
        sigma_max, sigma_min = _default_sigma_range(config)
        n_train = config.num_train_timesteps
        values = np.linspace(sigma_max * n_train, sigma_min * n_train, num_inference_steps) / n_train
    else:
        values = np.asarray(sigmas).astype(np.float32)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"sigmas has shape {values.shape}: expected a non-empty 1-D array")
        if num_inference_steps is not None and num_inference_steps != values.size:
            raise ValueError(f"num_inference_steps={num_inference_steps}: expected len(sigmas)={values.size}")
    if config.use_dynamic_shifting:
        values = _time_shift(config, mu, values)
    else:
        values = config.shift * values / (1 + (config.shift - 1) * values)
    if config.shift_terminal:
        one_minus = 1 - values
        values = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    values = np.asarray(values).astype(np.float32)
    timesteps = values * np.float32(config.num_train_timesteps)
    return FlowMatchState(
        timesteps=jnp.asarray(timesteps, dtype=jnp.float32),
        sigmas=jnp.asarray(np.append(values, np.float32(0.0)), dtype=jnp.float32),
    )


def state_from_timesteps(timesteps: np.ndarray, num_train_timesteps: int = LONGCAT_NUM_TIMESTEPS) -> FlowMatchState:
    """The state after LongCat overwrites `scheduler.timesteps` and sets sigmas = [timesteps / 1000, 0]."""
    ts = np.asarray(timesteps, dtype=np.float32)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(f"timesteps has shape {ts.shape}: expected a non-empty 1-D array")
    if np.any(np.diff(ts) >= 0):
        raise ValueError(f"timesteps={ts.tolist()}: expected strictly decreasing values")
    sigmas = ts / np.float32(num_train_timesteps)
    return FlowMatchState(
        timesteps=jnp.asarray(ts, dtype=jnp.float32),
        sigmas=jnp.asarray(np.append(sigmas, np.float32(0.0)), dtype=jnp.float32),
    )


def enhance_hf_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """generate_vc(enhance_hf=True): keep timesteps > 500, then 500, 450, ..., 50 (float32)."""
    ts = np.asarray(timesteps, dtype=np.float32)
    tail = np.linspace(ENHANCE_HF_TAIL_START, 0.0, ENHANCE_HF_TAIL_STEPS, dtype=np.float32, endpoint=False)
    return np.concatenate([ts[ts > ENHANCE_HF_TAIL_START], tail]).astype(np.float32)


def refine_timesteps(timesteps: np.ndarray, t_thresh: float) -> np.ndarray:
    """generate_refine: start at t_thresh * 1000, then the timesteps below it (float32).

    The refinement latents start as (1 - t_thresh) * x + t_thresh * noise (`scale_noise`).
    """
    if not 0 < t_thresh < 1:
        raise ValueError(f"t_thresh={t_thresh!r}: expected a value in (0, 1)")
    ts = np.asarray(timesteps, dtype=np.float32)
    start = np.float32(t_thresh * 1000)
    return np.concatenate([[start], ts[ts < start]]).astype(np.float32)


def step(
    config: FlowMatchConfig,
    state: FlowMatchState,
    model_output: jax.Array,
    sample: jax.Array,
    step_index: jax.Array | int,
) -> jax.Array:
    """One Euler step x_{sigma_i} -> x_{sigma_{i+1}} = x + (sigma_{i+1} - sigma_i) * v (step_index may be traced).

    model_output (the velocity, already negated by LongCat's pipeline), sample: same shape. As in
    diffusers, the update runs in float32 and returns model_output's dtype.
    """
    del config  # no config field changes the deterministic Euler step
    dt = state.sigmas[step_index + 1] - state.sigmas[step_index]
    prev = sample.astype(jnp.float32) + dt.astype(model_output.dtype) * model_output
    return prev.astype(model_output.dtype)


def scale_noise(sample: jax.Array, noise: jax.Array, sigma: jax.Array | float) -> jax.Array:
    """Forward flow-matching process: sigma * noise + (1 - sigma) * sample (sigma scalar or per-batch [B])."""
    sigma = jnp.asarray(sigma, dtype=sample.dtype)
    sigma = sigma.reshape(sigma.shape + (1,) * (sample.ndim - sigma.ndim))
    return sigma * noise + (1.0 - sigma) * sample
