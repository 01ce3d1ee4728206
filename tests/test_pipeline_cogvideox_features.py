"""CogVideoXPipeline features diffusers users reach for, against diffusers on one tiny T2V pipeline (fp32, CPU).

LoRA adapters loaded into the pipeline (several at once, fused), callback_on_step_end editing the
latents, prompt_embeds with num_videos_per_prompt, video-to-video (CogVideoXVideoToVideoPipeline,
DDIM and DPM), the checkpoint's default size. Both sides start from the same noise; diffusers'
randn_tensor is replaced by jaxvid's draws where it draws inside the call (as in
test_pipeline_cogvideox.py). One diffusers pipeline and one jaxvid pipeline serve the module.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvid.pipelines.cogvideox import CogVideoXPipeline, dpm_step_noise, generation_keys
from tests.test_pipeline_cogvideox import PROMPT, build_diffusers_pipeline, rel_l2

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

STEPS = 3
SIZE = dict(num_frames=9, height=32, width=32)
RTOL = 1e-3  # whole-pipeline final latents, as test_pipeline_cogvideox.py


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features") / "pipe"
    torch_pipe = build_diffusers_pipeline("t2v", "ddim", folder)
    return torch_pipe, CogVideoXPipeline.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def dpm_pipe(pipes):
    return CogVideoXPipeline.from_pretrained(pipes[2], scheduler="dpm")


def _noise(jax_pipe, batch=1, key=11):
    shape, _ = jax_pipe.latent_shape(batch, SIZE["num_frames"], SIZE["height"], SIZE["width"])
    return np.asarray(jax.random.normal(jax.random.key(key), shape, jnp.float32))


def _torch_latents(torch_pipe, noise, **kw):
    with torch.no_grad():
        return torch_pipe(**SIZE, num_inference_steps=STEPS, guidance_scale=6.0, output_type="latent",
                          latents=torch.from_numpy(np.array(noise)), **kw).frames.numpy()


def _jax_latents(jax_pipe, noise, **kw):
    return jax_pipe(**SIZE, num_inference_steps=STEPS, guidance_scale=6.0, output_type="latent", latents=noise,
                    progress=False, **kw).latents


def _lora_files(torch_pipe, root):
    """Two random PEFT adapters on the tiny transformer, saved as diffusers saves them."""
    from peft import LoraConfig

    from tests.test_lora_cogvideox import CONFIG_A, CONFIG_B, _save_adapter

    trainer = copy.deepcopy(torch_pipe.transformer)
    torch.manual_seed(1)
    trainer.add_adapter(LoraConfig(init_lora_weights=False, **CONFIG_A), adapter_name="a")
    trainer.add_adapter(LoraConfig(init_lora_weights=False, **CONFIG_B), adapter_name="b")
    with torch.no_grad():
        for n, p in trainer.named_parameters():
            if "lora_" in n:
                p.mul_(0.3)
    return {name: _save_adapter(trainer, name, root / name, with_metadata=True) for name in ("a", "b")}


def test_lora_adapters_in_the_pipeline_match_diffusers(pipes, tmp_path):
    torch_pipe, jax_pipe, _ = pipes
    files = _lora_files(torch_pipe, tmp_path)
    noise = _noise(jax_pipe)
    base = _jax_latents(jax_pipe, noise, prompt=PROMPT)
    try:
        for name, f in files.items():
            torch_pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=name)
            jax_pipe.load_lora_weights(f, adapter_name=name)
        torch_pipe.set_adapters(["a", "b"], [0.8, 0.5])
        jax_pipe.set_adapters(["a", "b"], [0.8, 0.5])
        expected = _torch_latents(torch_pipe, noise, prompt=PROMPT)
        got = _jax_latents(jax_pipe, noise, prompt=PROMPT)
        err = rel_l2(got, expected)
        print(f"two adapters: rel L2 {err:.2e}, LoRA effect {rel_l2(base, expected):.2e}")
        assert err <= RTOL and rel_l2(base, expected) > 10 * RTOL
        torch_pipe.fuse_lora(lora_scale=0.7)
        jax_pipe.fuse_lora(lora_scale=0.7)
        expected = _torch_latents(torch_pipe, noise, prompt=PROMPT)
        err = rel_l2(_jax_latents(jax_pipe, noise, prompt=PROMPT), expected)
        print(f"fused x0.7: rel L2 {err:.2e}")
        assert err <= RTOL
        jax_pipe.unfuse_lora()
        jax_pipe.disable_lora()
        np.testing.assert_array_equal(_jax_latents(jax_pipe, noise, prompt=PROMPT), base)
    finally:
        torch_pipe.unfuse_lora()
        torch_pipe.unload_lora_weights()
        jax_pipe.unfuse_lora()
        jax_pipe.unload_lora_weights()


def test_callback_on_step_end_edits_latents_like_diffusers(pipes):
    torch_pipe, jax_pipe, _ = pipes
    noise = _noise(jax_pipe)
    seen = {"torch": [], "jax": []}

    def make(side):
        def cb(pipe, i, t, kwargs):
            seen[side].append((i, int(t)))
            return {"latents": kwargs["latents"] * 0.9} if i == 1 else {}
        return cb

    expected = _torch_latents(torch_pipe, noise, prompt=PROMPT, callback_on_step_end=make("torch"))
    got = _jax_latents(jax_pipe, noise, prompt=PROMPT, callback_on_step_end=make("jax"))
    assert seen["jax"] == seen["torch"] and len(seen["jax"]) == STEPS
    err = rel_l2(got, expected)
    print(f"callback: rel L2 {err:.2e}")
    assert err <= RTOL
    with pytest.raises(ValueError, match="callback_on_step_end returned latents of shape"):
        _jax_latents(jax_pipe, noise, prompt=PROMPT, callback_on_step_end=lambda p, i, t, k: {"latents": noise[:, :1]})


def test_prompt_embeds_and_videos_per_prompt_match_diffusers(pipes):
    """prompt_embeds / negative_prompt_embeds from diffusers' encode_prompt. num_videos_per_prompt:
    diffusers' CogVideoXPipeline resets it to 1, so the reference is the prompt listed twice."""
    torch_pipe, jax_pipe, _ = pipes
    with torch.no_grad():
        pos, neg = torch_pipe.encode_prompt(PROMPT, "blurry", do_classifier_free_guidance=True,
                                            max_sequence_length=226)
    noise = _noise(jax_pipe)
    expected = _torch_latents(torch_pipe, noise, prompt_embeds=pos, negative_prompt_embeds=neg)
    got = _jax_latents(jax_pipe, noise, prompt_embeds=pos.numpy(), negative_prompt_embeds=neg.numpy())
    err = rel_l2(got, expected)
    print(f"prompt_embeds: rel L2 {err:.2e}")
    assert err <= RTOL
    noise2 = _noise(jax_pipe, batch=2)
    expected = _torch_latents(torch_pipe, noise2, prompt=[PROMPT] * 2, negative_prompt=["blurry"] * 2)
    got = _jax_latents(jax_pipe, noise2, prompt=PROMPT, negative_prompt="blurry", num_videos_per_prompt=2)
    err = rel_l2(got, expected)
    print(f"2 videos per prompt: rel L2 {err:.2e}")
    assert got.shape == expected.shape and err <= RTOL
    repeated = _jax_latents(jax_pipe, noise2, prompt_embeds=pos.numpy(), negative_prompt_embeds=neg.numpy(),
                            num_videos_per_prompt=2)
    assert rel_l2(repeated, expected) <= RTOL
    with pytest.raises(ValueError, match="prompt and prompt_embeds"):
        jax_pipe(PROMPT, prompt_embeds=pos.numpy(), **SIZE)
    with pytest.raises(ValueError, match="prompt_embeds shape"):
        jax_pipe(prompt_embeds=np.zeros((1, 4, 7), np.float32), **SIZE)


@pytest.mark.slow  # three compiles of the DPM loop (batch 2 with per-video keys, batch 1)
def test_a_list_of_seeds_gives_each_video_its_own_seed(dpm_pipe):
    """Video b of a seed list is the video a single call with seed[b] makes (what diffusers' list of
    generators means); with the DPM solver too, whose steps draw noise."""
    dpm = dpm_pipe
    kw = dict(**SIZE, num_inference_steps=2, output_type="latent", progress=False)
    both = dpm([PROMPT, "a cat"], seed=[3, 5], **kw).latents
    np.testing.assert_allclose(both[0], dpm(PROMPT, seed=3, **kw).latents[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[1], dpm("a cat", seed=5, **kw).latents[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 seeds for 4 videos"):
        dpm([PROMPT, "a cat"], seed=[3, 5], num_videos_per_prompt=2, **kw)


def _video():
    from PIL import Image

    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(9)]


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_video_to_video_matches_diffusers(pipes, dpm_pipe, scheduler, monkeypatch):
    from diffusers import CogVideoXDPMScheduler, CogVideoXVideoToVideoPipeline

    torch_pipe, jax_pipe, _ = pipes
    components = dict(torch_pipe.components)
    if scheduler == "dpm":
        components["scheduler"] = CogVideoXDPMScheduler.from_config(torch_pipe.scheduler.config)
        jax_pipe = dpm_pipe
    v2v = CogVideoXVideoToVideoPipeline(**components)
    v2v.set_progress_bar_config(disable=True)
    seed, steps, strength = 4, 4, 0.6  # int(4 * 0.6) = 2 steps from step 2
    keys = generation_keys(seed)
    step = {"i": 0}

    def as_torch(x, dtype):
        return torch.from_numpy(np.asarray(x)).to(dtype)

    monkeypatch.setattr("diffusers.pipelines.cogvideo.pipeline_cogvideox_video2video.randn_tensor",
                        lambda shape, generator=None, device=None, dtype=None, layout=None:
                        as_torch(jax.random.normal(keys.latents, tuple(shape), jnp.float32), dtype))
    monkeypatch.setattr("diffusers.models.autoencoders.vae.randn_tensor",
                        lambda shape, generator=None, device=None, dtype=None, layout=None:
                        as_torch(jax.random.normal(keys.image, tuple(shape), jnp.float32), dtype))
    monkeypatch.setattr("diffusers.schedulers.scheduling_dpm_cogvideox.randn_tensor",
                        lambda shape, generator=None, device=None, dtype=None, layout=None:
                        as_torch(dpm_step_noise(keys.dpm, step["i"], tuple(shape), jnp.float32), dtype))

    def on_step_end(pipe, i, t, kwargs):
        step["i"] = i + 1
        return {}

    with torch.no_grad():
        expected = v2v(video=_video(), prompt=PROMPT, negative_prompt="blurry", height=32, width=32,
                       num_inference_steps=steps, strength=strength, guidance_scale=6.0, use_dynamic_cfg=True,
                       output_type="latent", callback_on_step_end=on_step_end).frames.numpy()
    assert step["i"] == 2
    got = jax_pipe(PROMPT, "blurry", video=_video(), height=32, width=32, num_inference_steps=steps,
                   strength=strength, guidance_scale=6.0, use_dynamic_cfg=True, seed=seed, output_type="latent",
                   progress=False).latents
    err = rel_l2(got, expected)
    print(f"video-to-video {scheduler}: rel L2 {err:.2e}")
    assert got.shape == expected.shape and err <= RTOL
    with pytest.raises(ValueError, match="strength=0"):
        jax_pipe(PROMPT, video=_video(), height=32, width=32, strength=0.0)
    with pytest.raises(ValueError, match="runs no step"):
        jax_pipe(PROMPT, video=_video(), height=32, width=32, num_inference_steps=4, strength=0.2)


def test_sizes_default_to_the_checkpoint(pipes):
    """pipe(prompt) with no sizes makes the model's own (diffusers: the transformer's sample size),
    and says where each value came from; CogVideoX 1.5's real config gives its 81 x 768 x 1360."""
    from jaxvid.models.cogvideox import CogVideoXConfig
    from jaxvid.models.vae_cogvideox import CogVideoXVAEConfig
    from jaxvid.pipelines.cogvideox import default_geometry, default_geometry_sources

    torch_pipe, jax_pipe, _ = pipes
    out = jax_pipe(PROMPT, num_inference_steps=1, output_type="latent", progress=False)
    tc = torch_pipe.transformer.config
    s = torch_pipe.vae_scale_factor_spatial
    assert out.latents.shape[1] == (tc.sample_frames - 1) // 4 + 1
    assert out.latents.shape[3:] == (tc.sample_height * s // s, tc.sample_width * s // s)
    assert jax_pipe.last_sources["num_frames"].startswith("model default")
    geo, sources = jax_pipe.resolve_geometry(height=64)
    assert geo.height == 64 and sources["height"] == "given" and "sample_width" in sources["width"]

    t15 = CogVideoXConfig.cogvideox1_5_5b()  # THUDM/CogVideoX1.5-5B: sample 81 frames, 300 x 300 latents
    vcfg = CogVideoXVAEConfig()
    assert (t15.sample_frames, t15.sample_height, t15.sample_width) == (81, 300, 300)
    assert default_geometry(t15, vcfg) == type(geo)(num_frames=81, height=768, width=1360)
    assert "model card" in default_geometry_sources(t15, vcfg)["width"]


def test_pyramid_attention_broadcast_matches_diffusers(pipes, skip=3):
    """Step caching: diffusers' PAB hooks (spatial_attention_block_skip_range) on a copy of the same
    transformer; 5 steps have timesteps 999, 799, 599, 399, 199, so steps 1..4 are inside (100, 800)
    and steps 1, 2 and 4 reuse attention outputs."""
    from diffusers import CogVideoXPipeline as TorchPipeline
    from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    torch_pipe, jax_pipe, _ = pipes
    pab = TorchPipeline(**{**torch_pipe.components, "transformer": copy.deepcopy(torch_pipe.transformer)})
    pab.set_progress_bar_config(disable=True)
    apply_pyramid_attention_broadcast(pab.transformer, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: pab.current_timestep))
    noise = _noise(jax_pipe)
    kw = dict(prompt=PROMPT, num_inference_steps=5)
    with torch.no_grad():
        expected = pab(**SIZE, guidance_scale=6.0, output_type="latent", latents=torch.from_numpy(noise.copy()),
                       **kw).frames.numpy()
        plain = torch_pipe(**SIZE, guidance_scale=6.0, output_type="latent", latents=torch.from_numpy(noise.copy()),
                           **kw).frames.numpy()
    jax_pipe.enable_pyramid_attention_broadcast(block_skip_range=skip, timestep_skip_range=(100, 800))
    try:
        got = jax_pipe(**SIZE, guidance_scale=6.0, output_type="latent", latents=noise, progress=False, **kw).latents
    finally:
        jax_pipe.disable_pyramid_attention_broadcast()
    err = rel_l2(got, expected)
    print(f"PAB skip {skip}: rel L2 {err:.2e} (PAB vs no PAB in diffusers: {rel_l2(plain, expected):.2e})")
    assert err <= RTOL and rel_l2(plain, expected) > 100 * err
