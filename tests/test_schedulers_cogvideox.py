"""CogVideoX DDIM / DPM schedulers and CogVideoX guidance against diffusers (fp64 and fp32, CPU)."""
from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from jaxvid.schedulers import cogvideox_ddim, cogvideox_dpm, guidance

# scheduler/scheduler_config.json of THUDM/CogVideoX-2b and -5b (found in several public copies; the
# hub's own files were not reachable from here). Both checkpoints ship CogVideoXDDIMScheduler; THUDM's
# CogVideo demo swaps in CogVideoXDPMScheduler.from_config(...) for the 5b model, so both schedulers
# are tested with both configs.
COGVIDEOX_2B = {
    "_class_name": "CogVideoXDDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}
COGVIDEOX_5B = {**COGVIDEOX_2B, "snr_shift_scale": 1.0}
CONFIGS = {"2b": COGVIDEOX_2B, "5b": COGVIDEOX_5B}
SHAPE = (1, 3, 4, 2, 5)  # [B, F, C, H, W]; the update is elementwise
TOL = 1e-6


def _bound(precision: str, reference: np.ndarray) -> float:
    """1e-6 max abs; in fp32 scaled by the magnitude: XLA fuses multiply-adds (FMA) where torch rounds
    each product, so fp32 runs differ by a few ulp of |x| ~ 3 (fp64 runs hold 1e-6 flat with room)."""
    return TOL if precision == "fp64" else TOL * max(1.0, float(np.abs(reference).max()))


def _hf_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@contextlib.contextmanager
def _ieee_sqrt():
    """Builds diffusers' tables with a correctly rounded sqrt (IEEE 754), as numpy and XLA compute it.

    diffusers' zero-SNR rescale calls `Tensor.sqrt()` on the float32 (cosine, linear betas) or
    float64 table. torch's CPU sqrt is accurate to one ulp but not correctly rounded, and which
    inputs land one ulp off depends on the CPU: on an AMD EPYC (torch 2.13 wheel, AVX2) 20% of
    float32 and 1.4% of float64 inputs do, while the suite passed on Intel machines. One ulp of
    a_0 = 0.99992 is 1.5e-3 of 1 - a_0, which DDIM's last step scales the sample by, so the
    platform's sqrt alone moves that step by 1.7e-5. Every other operation on the table (products,
    SNR shift, rescale) is IEEE arithmetic in torch as here, so with the sqrt fixed the reference
    is the same on every machine and the 1e-6 bound holds as written.
    `test_table_is_diffusers_formula_in_ieee_arithmetic` checks the tables themselves.
    """
    torch_sqrt = torch.Tensor.sqrt
    torch.Tensor.sqrt = lambda self: torch.from_numpy(np.sqrt(self.detach().numpy()))
    try:
        yield
    finally:
        torch.Tensor.sqrt = torch_sqrt


def _model_outputs(num_steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_steps, *SHAPE))


def _model(outputs, sample, i):
    # A stand-in model whose output depends on the sample, so errors would propagate.
    return outputs[i] + 0.1 * sample


def _ddim_reference(config: dict, num_steps: int, outputs: np.ndarray, x0: np.ndarray, dtype):
    with _ieee_sqrt():
        sched = CogVideoXDDIMScheduler(**_hf_kwargs(config))
    sched.set_timesteps(num_steps)
    sample = torch.tensor(x0, dtype=dtype)
    traj, preds = [], []
    for i, t in enumerate(sched.timesteps):
        out = _model(torch.tensor(outputs, dtype=dtype), sample, i)
        sample, pred = sched.step(out, t, sample, return_dict=False)
        traj.append(sample.numpy())
        preds.append(pred.numpy())
    return sched.timesteps.numpy(), np.stack(traj), np.stack(preds)


def _dpm_reference(config: dict, num_steps: int, outputs: np.ndarray, x0: np.ndarray, dtype, seed: int):
    """Runs diffusers' DPM loop as CogVideoXPipeline does; returns the noise each step used."""
    with _ieee_sqrt():
        sched = CogVideoXDPMScheduler(**_hf_kwargs(config))
    sched.set_timesteps(num_steps)
    timesteps = sched.timesteps
    generator = torch.Generator().manual_seed(seed)
    sample = torch.tensor(x0, dtype=dtype)
    old_pred = None
    traj, noises = [], []
    for i, t in enumerate(timesteps):
        # Replay the generator to learn the draws step() will make: the first-order branch uses the
        # first draw, the second-order branch draws again and uses that one.
        probe = torch.Generator().set_state(generator.get_state())
        first = torch.randn(SHAPE, generator=probe, dtype=dtype)
        second = torch.randn(SHAPE, generator=probe, dtype=dtype)
        prev_t = t - sched.config.num_train_timesteps // num_steps
        noises.append((first if old_pred is None or prev_t < 0 else second).numpy())
        out = _model(torch.tensor(outputs, dtype=dtype), sample, i)
        sample, old_pred = sched.step(
            out, old_pred, t, timesteps[i - 1] if i > 0 else None, sample, generator=generator, return_dict=False
        )
        traj.append(sample.numpy())
    return timesteps.numpy(), np.stack(traj), np.stack(noises)


@functools.partial(jax.jit, static_argnums=0)
def _ddim_loop(config, state, outputs, x0):
    def body(i, carry):
        sample, traj, preds = carry
        out = cogvideox_ddim.step(config, state, _model(outputs, sample, i), sample, i)
        return out.prev_sample, traj.at[i].set(out.prev_sample), preds.at[i].set(out.pred_original_sample)

    zeros = jnp.zeros_like(outputs)
    _, traj, preds = jax.lax.fori_loop(0, outputs.shape[0], body, (x0, zeros, zeros))
    return traj, preds


@functools.partial(jax.jit, static_argnums=0)
def _dpm_loop(config, state, outputs, noises, x0):
    def body(i, carry):
        sample, old_pred, traj = carry
        out = cogvideox_dpm.step(
            config, state, _model(outputs, sample, i), sample, i, old_pred_original_sample=old_pred, noise=noises[i]
        )
        return out.prev_sample, out.pred_original_sample, traj.at[i].set(out.prev_sample)

    _, _, traj = jax.lax.fori_loop(0, outputs.shape[0], body, (x0, jnp.zeros_like(x0), jnp.zeros_like(outputs)))
    return traj


PRECISIONS = {"fp64": (torch.float64, np.float64, True), "fp32": (torch.float32, np.float32, False)}


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("num_steps", [5, 7, 50])
@pytest.mark.parametrize("name", ["2b", "5b"])
def test_ddim_trajectory_matches_diffusers(name, num_steps, precision):
    torch_dtype, np_dtype, x64 = PRECISIONS[precision]
    outputs = _model_outputs(num_steps, seed=num_steps).astype(np_dtype)
    x0 = np.random.default_rng(1).standard_normal(SHAPE).astype(np_dtype)
    ts_ref, traj_ref, preds_ref = _ddim_reference(CONFIGS[name], num_steps, outputs, x0, torch_dtype)
    with jax.enable_x64(x64):
        config = cogvideox_ddim.CogVideoXDDIMConfig.from_hf_config(CONFIGS[name])
        state = cogvideox_ddim.set_timesteps(config, num_steps)
        traj, preds = _ddim_loop(config, state, jnp.asarray(outputs), jnp.asarray(x0))
        traj, preds, ts = np.asarray(traj), np.asarray(preds), np.asarray(state.timesteps)
    np.testing.assert_array_equal(ts, ts_ref)
    assert traj.dtype == np_dtype
    err = max(np.abs(traj - traj_ref).max(), np.abs(preds - preds_ref).max())
    assert err <= _bound(precision, np.concatenate([traj_ref, preds_ref])), f"max abs diff {err:.3g}"


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("num_steps", [5, 7, 50])
@pytest.mark.parametrize("name", ["2b", "5b"])
def test_dpm_trajectory_matches_diffusers(name, num_steps, precision):
    torch_dtype, np_dtype, x64 = PRECISIONS[precision]
    outputs = _model_outputs(num_steps, seed=100 + num_steps).astype(np_dtype)
    x0 = np.random.default_rng(2).standard_normal(SHAPE).astype(np_dtype)
    ts_ref, traj_ref, noises = _dpm_reference(CONFIGS[name], num_steps, outputs, x0, torch_dtype, seed=num_steps)
    with jax.enable_x64(x64):
        config = cogvideox_dpm.CogVideoXDPMConfig.from_hf_config(CONFIGS[name])
        state = cogvideox_dpm.set_timesteps(config, num_steps)
        traj = np.asarray(_dpm_loop(config, state, jnp.asarray(outputs), jnp.asarray(noises), jnp.asarray(x0)))
    np.testing.assert_array_equal(np.asarray(state.timesteps), ts_ref)
    err = np.abs(traj - traj_ref).max()
    assert err <= _bound(precision, traj_ref), f"max abs diff {err:.3g}"


# Non-default corners: other beta schedules, prediction types and spacings (diffusers' defaults otherwise).
VARIANTS = [
    {},
    {"timestep_spacing": "linspace", "prediction_type": "sample"},
    {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False},
    {"beta_schedule": "linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"beta_schedule": "squaredcos_cap_v2", "snr_shift_scale": 2.0, "rescale_betas_zero_snr": True,
     "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) or "defaults")
def test_variants_match_diffusers_fp64(variant):
    num_steps = 6
    outputs = _model_outputs(num_steps, seed=7)
    x0 = np.random.default_rng(3).standard_normal(SHAPE)
    ts_ref, traj_ref, _ = _ddim_reference(variant, num_steps, outputs, x0, torch.float64)
    _, dpm_ref, noises = _dpm_reference(variant, num_steps, outputs, x0, torch.float64, seed=5)
    with jax.enable_x64(True):
        ddim_config = cogvideox_ddim.CogVideoXDDIMConfig.from_hf_config(variant)
        traj, _ = _ddim_loop(ddim_config, cogvideox_ddim.set_timesteps(ddim_config, num_steps), outputs, x0)
        dpm_config = cogvideox_dpm.CogVideoXDPMConfig.from_hf_config(variant)
        dpm = _dpm_loop(dpm_config, cogvideox_dpm.set_timesteps(dpm_config, num_steps), outputs, noises, x0)
        ts = np.asarray(cogvideox_ddim.set_timesteps(ddim_config, num_steps).timesteps)
    np.testing.assert_array_equal(ts, ts_ref)
    assert np.abs(np.asarray(traj) - traj_ref).max() <= TOL
    assert np.abs(np.asarray(dpm) - dpm_ref).max() <= TOL


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.get("beta_schedule") == "squaredcos_cap_v2"],
                         ids=lambda v: v["beta_schedule"])
def test_table_is_diffusers_formula_in_ieee_arithmetic(variant):
    """The float32 cosine / zero-SNR table is bit-identical to diffusers' computed with an IEEE sqrt;
    diffusers' table on this machine differs from it only through torch's sqrt, at most one ulp."""
    config = cogvideox_ddim.CogVideoXDDIMConfig.from_hf_config(variant)
    ours = cogvideox_ddim.alphas_cumprod(config).astype(np.float32)
    with _ieee_sqrt():
        ieee = CogVideoXDDIMScheduler(**variant).alphas_cumprod.numpy()
    assert ieee.dtype == np.float32
    np.testing.assert_array_equal(ours, ieee)
    # torch's sqrt on the shifted table (the only inexact step): at most one ulp from IEEE's.
    shifted = CogVideoXDDIMScheduler(**{**variant, "rescale_betas_zero_snr": False}).alphas_cumprod
    ulps = np.abs(shifted.sqrt().numpy().view(np.int32) - np.sqrt(shifted.numpy()).view(np.int32))
    assert ulps.max() <= 1


def test_alphas_cumprod_and_add_noise_match_diffusers():
    sched = CogVideoXDDIMScheduler(**_hf_kwargs(COGVIDEOX_2B))
    config = cogvideox_ddim.CogVideoXDDIMConfig.from_hf_config(COGVIDEOX_2B)
    np.testing.assert_allclose(cogvideox_ddim.alphas_cumprod(config), sched.alphas_cumprod.numpy(), rtol=0, atol=1e-15)
    x = np.random.default_rng(4).standard_normal((3, 4, 2, 2)).astype(np.float32)
    noise = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    t = np.array([0, 500, 999])
    ref = sched.add_noise(torch.tensor(x), torch.tensor(noise), torch.tensor(t)).numpy()
    state = cogvideox_ddim.set_timesteps(config, 10)
    out = np.asarray(cogvideox_ddim.add_noise(state.alphas_cumprod, jnp.asarray(x), jnp.asarray(noise), jnp.asarray(t)))
    assert np.abs(out - ref).max() <= TOL


def test_config_reads_hf_dict_and_rejects_bad_values(caplog):
    config = cogvideox_dpm.CogVideoXDPMConfig.from_hf_config({**COGVIDEOX_5B, "some_future_key": 1})
    assert config.snr_shift_scale == 1.0 and config.prediction_type == "v_prediction"
    assert "some_future_key" in caplog.text
    defaults = cogvideox_ddim.CogVideoXDDIMConfig()
    for key, value in CogVideoXDPMScheduler().config.items():  # diffusers' (shared) defaults
        if hasattr(defaults, key):
            assert getattr(defaults, key) == value, key
    for bad in ({"timestep_spacing": "uniform"}, {"prediction_type": "flow"}, {"beta_schedule": "cosine"},
                {"snr_shift_scale": 0.0}, {"num_train_timesteps": 0}):
        (field,) = bad
        with pytest.raises(ValueError, match=field):
            cogvideox_ddim.CogVideoXDDIMConfig.from_hf_config({**COGVIDEOX_2B, **bad})
    with pytest.raises(ValueError, match="num_inference_steps"):
        cogvideox_ddim.set_timesteps(cogvideox_ddim.CogVideoXDDIMConfig(), 1001)


@pytest.mark.parametrize("use_dynamic_cfg", [False, True])
@pytest.mark.parametrize("num_steps", [5, 50])
def test_cogvideox_guidance_matches_pipeline(use_dynamic_cfg, num_steps):
    """The CFG update exactly as diffusers' CogVideoXPipeline writes it, step by step (fp32)."""
    guidance_scale = 6.0
    sched = CogVideoXDDIMScheduler(**_hf_kwargs(COGVIDEOX_2B))
    sched.set_timesteps(num_steps)
    preds = np.random.default_rng(6).standard_normal((num_steps, 2, *SHAPE[1:])).astype(np.float32)
    scales = guidance.cogvideox_guidance_scales(guidance_scale, sched.timesteps.numpy(), use_dynamic_cfg=use_dynamic_cfg)
    combine = jax.jit(lambda p, g: guidance.classifier_free_guidance(*guidance.split_cfg_batch(p), g))
    err, scale_of_refs = 0.0, 0.0
    for i, t in enumerate(sched.timesteps):
        scale = guidance_scale
        if use_dynamic_cfg:  # diffusers/pipelines/cogvideo/pipeline_cogvideox.py, verbatim arithmetic
            scale = 1 + guidance_scale * (
                (1 - math.cos(math.pi * ((num_steps - t.item()) / num_steps) ** 5.0)) / 2
            )
        assert scales[i] == pytest.approx(scale, rel=1e-12)
        uncond, text = torch.tensor(preds[i]).chunk(2)
        ref = (uncond + scale * (text - uncond)).numpy()
        err = max(err, np.abs(np.asarray(combine(jnp.asarray(preds[i]), scales[i])) - ref).max())
        scale_of_refs = max(scale_of_refs, np.abs(ref).max())
    assert err <= _bound("fp32", np.array(scale_of_refs)), f"max abs diff {err:.3g}"
