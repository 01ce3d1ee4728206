"""End to end: jaxvid's CogVideoXPipeline against diffusers' on the SAME tiny pipeline folder (fp32, CPU).

A tiny diffusers pipeline (transformer, AutoencoderKLCogVideoX, T5EncoderModel, T5Tokenizer from a
tiny sentencepiece model, DDIM or DPM scheduler) is built with torch and fixed seeds and saved with
`save_pretrained`; jaxvid loads that folder. Both start from the same initial noise; where diffusers
draws random numbers inside the loop (DPM step noise, the I2V image-latent sample) its `randn_tensor`
is replaced by the draws jaxvid makes, so both follow the same trajectory.
"""
from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvid.attention.plan import AttentionPlan
from jaxvid.pipelines.cogvideox import CogVideoXPipeline, dpm_step_noise, generation_keys
from jaxvid.synthetic.cogvideox import tiny_configs, tiny_spiece_model

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

STEPS = 3
PROMPT = "A panda, dressed in a small red jacket, sits on a wooden stool."
NEGATIVE = "blurry, low quality"


@dataclasses.dataclass(frozen=True)
class Case:
    variant: str  # jaxvid.synthetic.cogvideox variant: "t2v", "t2v-1.5", "i2v", "i2v-1.5"
    scheduler: str  # "ddim" | "dpm"
    dynamic_cfg: bool
    negative: str


CASES = {
    "t2v-rope-ddim-dynamic": Case("t2v", "ddim", True, NEGATIVE),
    "t2v1.5-dpm": Case("t2v-1.5", "dpm", False, ""),
    "i2v1.5-ddim": Case("i2v-1.5", "ddim", False, NEGATIVE),
    "i2v-learned-pos-dpm-dynamic": Case("i2v", "dpm", True, ""),
}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def build_diffusers_pipeline(variant: str, scheduler: str, folder):
    """A torch-initialised tiny diffusers pipeline, saved to `folder`; returns the pipeline."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )
    from diffusers import CogVideoXPipeline as TorchPipeline
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    tcfg, vcfg, t5cfg = tiny_configs(variant)
    torch.manual_seed(0)
    transformer_kwargs = {k: v for k, v in tcfg.to_hf_config().items() if not k.startswith("_")}
    transformer = CogVideoXTransformer3DModel(**transformer_kwargs).eval()
    if tcfg.use_learned_positional_embeddings:
        with torch.no_grad():  # diffusers initialises the learned table as sincos; make it distinct
            transformer.patch_embed.pos_embedding.normal_(0.0, 0.5)
    n = len(vcfg.block_out_channels)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=vcfg.latent_channels,
        down_block_types=("CogVideoXDownBlock3D",) * n, up_block_types=("CogVideoXUpBlock3D",) * n,
        block_out_channels=vcfg.block_out_channels, layers_per_block=vcfg.layers_per_block,
        norm_num_groups=vcfg.norm_num_groups, temporal_compression_ratio=vcfg.temporal_compression_ratio,
        sample_height=vcfg.sample_height, sample_width=vcfg.sample_width, scaling_factor=vcfg.scaling_factor,
        invert_scale_latents=vcfg.invert_scale_latents,
    ).eval()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=t5cfg.vocab_size, d_model=t5cfg.d_model, d_kv=t5cfg.d_kv, d_ff=t5cfg.d_ff,
        num_layers=t5cfg.num_layers, num_heads=t5cfg.num_heads,
        relative_attention_num_buckets=t5cfg.relative_attention_num_buckets,
        relative_attention_max_distance=t5cfg.relative_attention_max_distance,
        feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    spiece = folder.parent / f"{folder.name}-spiece"
    spiece.mkdir()
    (spiece / "spiece.model").write_bytes(tiny_spiece_model())
    tokenizer = T5Tokenizer.from_pretrained(spiece, legacy=True)
    sched_config = dict(
        beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, num_train_timesteps=1000,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=1.0,
        steps_offset=0, timestep_spacing="trailing")
    sched_cls = CogVideoXDDIMScheduler if scheduler == "ddim" else CogVideoXDPMScheduler
    pipe_cls = CogVideoXImageToVideoPipeline if variant.startswith("i2v") else TorchPipeline
    pipe = pipe_cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                    scheduler=sched_cls(**sched_config))
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    shutil.rmtree(spiece)
    return pipe


@pytest.fixture(scope="module", params=list(CASES))
def built(request, tmp_path_factory):
    case = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param) / "pipe"
    torch_pipe = build_diffusers_pipeline(case.variant, case.scheduler, folder)
    jax_pipe = CogVideoXPipeline.from_pretrained(folder)
    return case, torch_pipe, jax_pipe


def _request(jax_pipe):
    shape, additional = jax_pipe.latent_shape(1, 9, 32, 32)
    return dict(num_frames=9, height=32, width=32), shape, additional


def _image():
    rng = np.random.default_rng(3)
    from PIL import Image

    return Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))


def _run_diffusers(case, torch_pipe, noise, seed, monkeypatch):
    """diffusers' final latents, its randn_tensor replaced by jaxvid's draws where it draws in the loop."""
    keys = generation_keys(seed)
    step = {"i": 0}

    def dpm_randn(shape, generator=None, device=None, dtype=None, layout=None):
        noise_i = dpm_step_noise(keys.dpm, step["i"], tuple(shape), jnp.float32)
        return torch.from_numpy(np.asarray(noise_i)).to(dtype)

    def vae_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(np.asarray(jax.random.normal(keys.image, tuple(shape), jnp.float32))).to(dtype)

    def on_step_end(pipe, i, t, kwargs):
        step["i"] = i + 1
        return {}

    monkeypatch.setattr("diffusers.schedulers.scheduling_dpm_cogvideox.randn_tensor", dpm_randn)
    monkeypatch.setattr("diffusers.models.autoencoders.vae.randn_tensor", vae_randn)
    extra = {"image": _image()} if case.variant.startswith("i2v") else {}
    with torch.no_grad():
        out = torch_pipe(
            prompt=PROMPT, negative_prompt=case.negative, num_frames=9, height=32, width=32,
            num_inference_steps=STEPS, guidance_scale=6.0, use_dynamic_cfg=case.dynamic_cfg,
            latents=torch.from_numpy(np.asarray(noise)), output_type="latent", callback_on_step_end=on_step_end,
            **extra,
        ).frames
    return out.numpy()


def test_final_latents_match_diffusers(built, monkeypatch):
    case, torch_pipe, jax_pipe = built
    request, shape, _ = _request(jax_pipe)
    noise = np.asarray(jax.random.normal(jax.random.key(11), shape, jnp.float32))
    expected = _run_diffusers(case, torch_pipe, noise, seed=5, monkeypatch=monkeypatch)
    extra = {"image": _image()} if case.variant.startswith("i2v") else {}
    got = jax_pipe(PROMPT, case.negative, **request, num_inference_steps=STEPS, guidance_scale=6.0,
                   use_dynamic_cfg=case.dynamic_cfg, seed=5, latents=noise, output_type="latent", progress=False,
                   **extra).latents[0]
    err = rel_l2(got, expected[0])
    print(f"{case}: final latents rel L2 = {err:.2e}")
    assert got.shape == expected.shape[1:]
    assert err <= 1e-3


def test_decoded_frames_match_diffusers(built):
    """VAE decode + postprocessing of the same latents: uint8 frames within one level of diffusers'."""
    case, torch_pipe, jax_pipe = built
    _, shape, additional = _request(jax_pipe)
    latents = np.asarray(jax.random.normal(jax.random.key(2), shape, jnp.float32))[:, additional:]
    ours = jax_pipe.decode_latents(jnp.asarray(latents))
    with torch.no_grad():
        video = torch_pipe.decode_latents(torch.from_numpy(latents))
        frames = torch_pipe.video_processor.postprocess_video(video=video, output_type="np")
    reference = np.round(frames * 255.0).astype(np.int32)
    assert ours.shape == reference.shape and ours.dtype == np.uint8
    assert np.abs(ours.astype(np.int32) - reference).max() <= 1


def test_same_shapes_do_not_recompile(built):
    case, _, jax_pipe = built
    request, _, _ = _request(jax_pipe)
    extra = {"image": _image()} if case.variant.startswith("i2v") else {}
    jax_pipe("first prompt", **request, num_inference_steps=STEPS, seed=0, progress=False, **extra)
    compiled = jax_pipe._denoise.num_compiled
    frames = jax_pipe("another prompt", "a negative one", **request, num_inference_steps=STEPS, guidance_scale=4.5,
                      use_dynamic_cfg=True, seed=1, progress=False, **extra).frames[0]
    assert jax_pipe._denoise.num_compiled == compiled
    assert jax_pipe.last_timings["compile"] == 0.0
    assert frames.shape == (9, 32, 32, 3) and frames.dtype == np.uint8
    # another step count shares the loop program (per-step tables padded to loop.STEP_BUCKET steps)
    jax_pipe("first prompt", **request, num_inference_steps=STEPS + 1, seed=0, progress=False, output_type="latent",
             **extra)
    assert jax_pipe._denoise.num_compiled == compiled


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from jaxvid.synthetic.cogvideox import write_tiny_pipeline

    return CogVideoXPipeline.from_pretrained(write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe"))


@pytest.mark.slow  # one of the slowest on 2 cores (issue 16 item 17); -m 'not slow' skips
def test_radial_plan_switches_inside_the_loop(tiny_pipe):
    """dense_timesteps >= steps is exactly dense; fewer dense steps change the result; one executable per plan."""
    kw = dict(num_frames=17, height=64, width=64, num_inference_steps=2, seed=3, output_type="latent", progress=False)
    dense = tiny_pipe(PROMPT, **kw).latents
    radial = dict(block_size=64, dense_layers=1)
    all_dense_steps = tiny_pipe(PROMPT, attention=AttentionPlan.radial_cogvideox(dense_timesteps=2, **radial),
                                **kw).latents
    one_dense_step = tiny_pipe(PROMPT, attention=AttentionPlan.radial_cogvideox(dense_timesteps=1, **radial),
                               **kw).latents
    np.testing.assert_array_equal(all_dense_steps, dense)
    assert np.isfinite(one_dense_step).all()
    assert rel_l2(one_dense_step, dense) > 1e-4
    assert tiny_pipe._denoise.num_compiled == 3


def test_converted_folder_gives_the_same_video(tiny_pipe, tmp_path):
    """jaxvid-convert's output (jaxvid checkpoints + copied tokenizer/ and scheduler/) loads and matches."""
    from jaxvid.cli.convert import convert_path

    converted = convert_path(tiny_pipe.tokenizer_dir.parent, tmp_path / "converted", show_progress=False)
    other = CogVideoXPipeline.from_pretrained(converted)
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=2, seed=4, progress=False)
    np.testing.assert_array_equal(other(PROMPT, **kw).frames, tiny_pipe(PROMPT, **kw).frames)


@pytest.mark.slow  # one of the slowest on 2 cores (issue 16 item 17); -m 'not slow' skips
def test_bf16_runs_close_to_fp32(tiny_pipe):
    other = CogVideoXPipeline.from_pretrained(tiny_pipe.tokenizer_dir.parent, dtype="bf16")
    assert jnp.dtype(other.transformer.module.cfg.dtype) == jnp.bfloat16
    kw = dict(num_frames=9, height=32, width=32, num_inference_steps=2, seed=4, progress=False, output_type="latent")
    ref = tiny_pipe(PROMPT, **kw).latents
    got = other(PROMPT, **kw).latents
    assert got.dtype == np.float32 and rel_l2(got, ref) < 5e-2


def test_bad_requests_raise_clear_errors(tiny_pipe):
    with pytest.raises(ValueError, match="num_frames=10"):
        tiny_pipe(PROMPT, num_frames=10, height=32, width=32)
    with pytest.raises(ValueError, match="height=36"):
        tiny_pipe(PROMPT, num_frames=9, height=36, width=32)
    with pytest.raises(ValueError, match="image"):
        tiny_pipe(PROMPT, num_frames=9, height=32, width=32, image=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="latents shape"):
        tiny_pipe(PROMPT, num_frames=9, height=32, width=32, latents=np.zeros((1, 2, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="output_type"):
        tiny_pipe(PROMPT, num_frames=9, height=32, width=32, output_type="pil")
