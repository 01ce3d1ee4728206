"""LongCat flow-matching schedule, Euler step and guidance against diffusers driven as upstream drives it.

The reference loop follows meituan-longcat/LongCat-Video longcat_video/pipeline_longcat_video.py
(`get_timesteps_sigmas`, `set_timesteps(N, sigmas=...)`, the enhance_hf / refine timestep
overrides, `optimized_scale`, the negated velocity). Upstream ships a copy of diffusers'
FlowMatchEulerDiscreteScheduler whose set_timesteps / step paths used here are the same as the
installed diffusers one, which is what runs below.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from jaxvid.schedulers import flow_match, guidance

# LongCat-Video's scheduler/scheduler_config.json could not be fetched from here; these are
# diffusers' FlowMatchEulerDiscreteScheduler defaults (shift 1.0), which the upstream pipeline's
# hand-made sigmas assume. A shifted and a dynamically shifted config exercise the remaining maths.
LONGCAT_ASSUMED = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
SHIFTED = {**LONGCAT_ASSUMED, "shift": 12.0}
SHAPE = (1, 4, 3, 2, 6)  # [B, C, T, H, W]
TOL = 1e-6
ULP_AT_ONE = float(np.spacing(np.float32(1.0)))


def _hf(config: dict) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})


def _upstream_sigmas(steps: int, use_distill: bool) -> torch.Tensor:
    """`LongCatVideoPipeline.get_timesteps_sigmas`, same torch operations."""
    num_timesteps, num_distill = 1000, 50
    if use_distill:
        idx = torch.arange(1, num_distill + 1, dtype=torch.float32)
        idx = (idx * (num_timesteps // num_distill)).round().long()
        picks = np.floor(np.linspace(0, num_distill, num=steps, endpoint=False)).astype(np.int64)
        sigmas = torch.flip(idx, [0])[picks].float() / num_timesteps
    else:
        sigmas = torch.linspace(1, 0.001, steps)
    return sigmas.to(torch.float32)


@pytest.mark.parametrize("use_distill,steps", [(False, 1), (False, 5), (False, 16), (False, 50), (False, 93),
                                               (True, 16), (True, 8), (True, 50)])
def test_longcat_sigmas_match_upstream(use_distill, steps):
    ref = _upstream_sigmas(steps, use_distill).numpy()
    ours = flow_match.longcat_sigmas(steps, use_distill=use_distill)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    # Bit-equal on this x86 FMA CPU; torch's CPU linspace kernel may round differently elsewhere.
    assert np.abs(ours - ref).max() <= ULP_AT_ONE


@pytest.mark.parametrize("config", [LONGCAT_ASSUMED, SHIFTED], ids=["shift1", "shift12"])
@pytest.mark.parametrize("use_distill,steps", [(False, 5), (False, 50), (True, 16)])
def test_set_timesteps_with_longcat_sigmas_matches_diffusers(config, use_distill, steps):
    sched = _hf(config)
    sched.set_timesteps(steps, sigmas=_upstream_sigmas(steps, use_distill))
    state = flow_match.set_timesteps(
        flow_match.FlowMatchConfig.from_hf_config(config), steps, sigmas=flow_match.longcat_sigmas(steps, use_distill=use_distill)
    )
    np.testing.assert_allclose(np.asarray(state.sigmas), sched.sigmas.numpy(), rtol=0, atol=ULP_AT_ONE)
    np.testing.assert_allclose(np.asarray(state.timesteps), sched.timesteps.numpy(), rtol=0, atol=1000 * ULP_AT_ONE)


@pytest.mark.parametrize(
    "config,kwargs",
    [(LONGCAT_ASSUMED, {}), (SHIFTED, {}), ({**SHIFTED, "shift_terminal": 0.1}, {}),
     ({**LONGCAT_ASSUMED, "use_dynamic_shifting": True}, {"mu": 0.8}),
     ({**LONGCAT_ASSUMED, "use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 1.7})],
    ids=["default", "shift12", "shift_terminal", "dynamic_exp", "dynamic_linear"],
)
def test_scheduler_own_schedule_matches_diffusers(config, kwargs):
    sched = _hf(config)
    sched.set_timesteps(20, **kwargs)
    state = flow_match.set_timesteps(flow_match.FlowMatchConfig.from_hf_config(config), 20, **kwargs)
    np.testing.assert_array_equal(np.asarray(state.sigmas), sched.sigmas.numpy())
    np.testing.assert_array_equal(np.asarray(state.timesteps), sched.timesteps.numpy())


def _reference_loop(sched, timesteps, velocities, x0, guidance_scale):
    """The upstream denoising loop with a stand-in DiT: CFG-Zero*, negation, scheduler.step."""
    latents = torch.tensor(x0)
    traj = []
    for i, t in enumerate(timesteps):
        noise_pred = torch.tensor(velocities[i]) + 0.1 * torch.cat([latents] * 2)
        if guidance_scale > 1:
            noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
            b = noise_pred_cond.shape[0]
            positive, negative = noise_pred_cond.reshape(b, -1), noise_pred_uncond.reshape(b, -1)
            dot = torch.sum(positive * negative, dim=1, keepdim=True)
            st_star = (dot / (torch.sum(negative**2, dim=1, keepdim=True) + 1e-8)).view(b, 1, 1, 1)
            noise_pred = noise_pred_uncond * st_star + guidance_scale * (noise_pred_cond - noise_pred_uncond * st_star)
        else:
            noise_pred = noise_pred[: latents.shape[0]]
        latents = sched.step(-noise_pred, t, latents, return_dict=False)[0]
        traj.append(latents.numpy())
    return np.stack(traj)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jax_loop(config, guidance_scale, state, velocities, x0):
    def body(i, carry):
        latents, traj = carry
        pred = velocities[i] + 0.1 * jnp.concatenate([latents] * 2)
        uncond, cond = guidance.split_cfg_batch(pred)
        pred = guidance.longcat_guidance(uncond, cond, guidance_scale) if guidance_scale > 1 else pred[: x0.shape[0]]
        latents = flow_match.step(config, state, -pred, latents, i)
        return latents, traj.at[i].set(latents)

    n = state.timesteps.shape[0]
    _, traj = jax.lax.fori_loop(0, n, body, (x0, jnp.zeros((n, *x0.shape), x0.dtype)))
    return traj


MODES = {
    "t2v_50": dict(steps=50, use_distill=False, guidance_scale=4.0),
    "t2v_5": dict(steps=5, use_distill=False, guidance_scale=4.0),
    "distill_16": dict(steps=16, use_distill=True, guidance_scale=1.0),
    "vc_enhance_hf": dict(steps=50, use_distill=False, guidance_scale=4.0, override="enhance_hf"),
    "refine": dict(steps=50, use_distill=False, guidance_scale=1.0, override="refine"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_trajectory_matches_upstream_loop(mode):
    spec = MODES[mode]
    steps, g = spec["steps"], spec["guidance_scale"]
    sched = _hf(LONGCAT_ASSUMED)
    sched.set_timesteps(steps, sigmas=_upstream_sigmas(steps, spec["use_distill"]))
    config = flow_match.FlowMatchConfig.from_hf_config(LONGCAT_ASSUMED)
    state = flow_match.set_timesteps(config, steps, sigmas=flow_match.longcat_sigmas(steps, use_distill=spec["use_distill"]))
    override = spec.get("override")
    if override == "enhance_hf":  # generate_vc(enhance_hf=True), same torch/numpy operations
        tail_end = 0
        tail = list(np.linspace(500, tail_end, 10, dtype=np.float32, endpoint=(tail_end != 0)))
        tail = [torch.tensor(t).unsqueeze(0) for t in tail]
        kept = [t.unsqueeze(0) for t in sched.timesteps if t > 500]
        sched.timesteps = torch.cat(kept + tail)
        sched.sigmas = torch.cat([sched.timesteps / 1000, torch.zeros(1)])
        state = flow_match.state_from_timesteps(flow_match.enhance_hf_timesteps(np.asarray(state.timesteps)))
    elif override == "refine":  # generate_refine(t_thresh=0.5)
        thresh = torch.tensor(0.5 * 1000, dtype=sched.timesteps.dtype)
        sched.timesteps = torch.cat([thresh.unsqueeze(0), sched.timesteps[sched.timesteps < thresh]])
        sched.sigmas = torch.cat([sched.timesteps / 1000, torch.zeros(1)])
        state = flow_match.state_from_timesteps(flow_match.refine_timesteps(np.asarray(state.timesteps), 0.5))
    np.testing.assert_allclose(np.asarray(state.sigmas), sched.sigmas.numpy(), rtol=0, atol=ULP_AT_ONE)
    n = len(sched.timesteps)
    rng = np.random.default_rng(steps)
    velocities = rng.standard_normal((n, 2 * SHAPE[0], *SHAPE[1:])).astype(np.float32)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    ref = _reference_loop(sched, sched.timesteps, velocities, x0, g)
    ours = np.asarray(_jax_loop(config, g, state, jnp.asarray(velocities), jnp.asarray(x0)))
    err = np.abs(ours - ref).max()
    # fp32 run: bound scaled by the magnitude (XLA fuses multiply-adds that torch rounds twice).
    assert err <= TOL * max(1.0, float(np.abs(ref).max())), f"max abs diff {err:.3g}"


@pytest.mark.parametrize("dtype", [np.float32])
def test_longcat_guidance_matches_upstream(dtype):
    rng = np.random.default_rng(0)
    cond, uncond = (rng.standard_normal((1, 16, 3, 4, 6)).astype(dtype) for _ in range(2))
    positive, negative = torch.tensor(cond).reshape(1, -1), torch.tensor(uncond).reshape(1, -1)
    st_star = torch.sum(positive * negative, dim=1, keepdim=True) / (torch.sum(negative**2, dim=1, keepdim=True) + 1e-8)
    st_star = st_star.view(1, 1, 1, 1)
    ref = (torch.tensor(uncond) * st_star + 4.0 * (torch.tensor(cond) - torch.tensor(uncond) * st_star)).numpy()
    ours = np.asarray(jax.jit(guidance.longcat_guidance)(jnp.asarray(uncond), jnp.asarray(cond), 4.0))
    assert np.abs(ours - ref).max() <= TOL * max(1.0, float(np.abs(ref).max()))
    s = np.asarray(guidance.optimized_scale(jnp.asarray(cond), jnp.asarray(uncond)))
    assert s.shape == (1, 1, 1, 1, 1) and abs(s.item() - st_star.item()) <= 1e-6


def test_optimized_scale_is_per_sample_for_batches():
    rng = np.random.default_rng(1)
    cond, uncond = (rng.standard_normal((3, 2, 5)).astype(np.float32) for _ in range(2))
    s = np.asarray(guidance.optimized_scale(jnp.asarray(cond), jnp.asarray(uncond)))
    expected = (cond * uncond).sum((1, 2)) / ((uncond**2).sum((1, 2)) + 1e-8)
    np.testing.assert_allclose(s.reshape(-1), expected, rtol=1e-5)


def test_scale_noise_matches_diffusers():
    sched = _hf(LONGCAT_ASSUMED)
    sched.set_timesteps(10, sigmas=_upstream_sigmas(10, False))
    sched.set_begin_index(3)
    rng = np.random.default_rng(2)
    x, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    ref = sched.scale_noise(torch.tensor(x), sched.timesteps[3:4], torch.tensor(noise)).numpy()
    state = flow_match.set_timesteps(flow_match.FlowMatchConfig(), 10, sigmas=flow_match.longcat_sigmas(10))
    ours = np.asarray(flow_match.scale_noise(jnp.asarray(x), jnp.asarray(noise), state.sigmas[3]))
    assert np.abs(ours - ref).max() <= TOL


def test_config_and_argument_errors(caplog):
    config = flow_match.FlowMatchConfig.from_hf_config({**LONGCAT_ASSUMED, "a_new_key": 3})
    assert config.shift == 1.0 and "a_new_key" in caplog.text
    for bad in ({"use_karras_sigmas": True}, {"stochastic_sampling": True}, {"time_shift_type": "cubic"},
                {"shift": 0.0}, {"invert_sigmas": True}):
        (field,) = bad
        with pytest.raises(ValueError, match=field):
            flow_match.FlowMatchConfig.from_hf_config({**LONGCAT_ASSUMED, **bad})
    with pytest.raises(ValueError, match="mu"):
        flow_match.set_timesteps(flow_match.FlowMatchConfig(use_dynamic_shifting=True), 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow_match.longcat_sigmas(51, use_distill=True)
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow_match.set_timesteps(config, 4, sigmas=flow_match.longcat_sigmas(5))
    with pytest.raises(ValueError, match="t_thresh"):
        flow_match.refine_timesteps(np.array([999.0, 500.0]), 1.5)
    with pytest.raises(ValueError, match="batch"):
        guidance.split_cfg_batch(jnp.zeros((3, 2)))
