"""Diffusion schedulers as pure functions over a state pytree of per-step tables.

Each scheduler module has a frozen config (`from_hf_config(dict)` reads diffusers'
`scheduler/scheduler_config.json`), `set_timesteps(config, num_inference_steps) -> state` (numpy,
outside jit) and `step(config, state, model_output, sample, step_index, ...)`, which works with a
traced step index inside one `lax.fori_loop`:

- `cogvideox_ddim`: CogVideoX's DDIM (v-prediction, SNR shift, zero terminal SNR, trailing spacing).
- `cogvideox_dpm`: CogVideoX's DPM-Solver++(2M) SDE; takes the previous x_0 and explicit noise.
- `flow_match`: LongCat's flow-matching Euler, with LongCat's own sigma schedules.
- `guidance`: classic / CogVideoX dynamic CFG and LongCat's CFG-Zero* optimized-scale guidance.
"""
from __future__ import annotations

from jaxvid.schedulers import cogvideox_ddim, cogvideox_dpm, flow_match, guidance
from jaxvid.schedulers.cogvideox_ddim import (
    INIT_NOISE_SIGMA,
    CogVideoXDDIMConfig,
    CogVideoXDDIMState,
    CogVideoXSchedulerConfig,
    SchedulerStepOutput,
)
from jaxvid.schedulers.cogvideox_dpm import CogVideoXDPMConfig, CogVideoXDPMState
from jaxvid.schedulers.flow_match import FlowMatchConfig, FlowMatchState, longcat_sigmas

__all__ = [
    "cogvideox_ddim", "cogvideox_dpm", "flow_match", "guidance",
    "INIT_NOISE_SIGMA", "SchedulerStepOutput",
    "CogVideoXSchedulerConfig", "CogVideoXDDIMConfig", "CogVideoXDDIMState",
    "CogVideoXDPMConfig", "CogVideoXDPMState",
    "FlowMatchConfig", "FlowMatchState", "longcat_sigmas",
]
