"""LongCat-Video pipeline: every mode against a step-by-step reference of upstream's loop, plus argument errors.

diffusers has no LongCat pipeline, so the reference below is upstream's `LongCatVideoPipeline` code
(meituan-longcat/LongCat-Video, longcat_video/pipeline_longcat_video.py) followed line by line in a
Python loop over the same jaxvid components (umT5, DiT with its LoRA factors, Wan VAE, tokenizer,
flow-match schedule). The guidance (CFG-Zero* optimized scale), the Euler step, the timestep
arrays, the conditioning bookkeeping, the refinement resizing (torch's own F.interpolate) and the
preprocessing (diffusers' VideoProcessor on PIL frames) are written out here, not taken from the
pipeline. Each component call is jitted on its own (op-by-op dispatch costs ~2.5 s per DiT call on
a shared 2-core machine); the pipeline instead runs the whole loop in one jit. The umT5 and VAE
encoder calls reuse the pipeline's one-line jitted wrappers (`nnx.merge` + the module call) to share
their compilations; the DiT and VAE decoder calls are the reference's own. fp32, rel L2 <= 1e-4.
Random draws follow the pipeline's documented key streams (`_Keys.from_seed`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvid.pipelines.longcat import (
    LongCatPipeline,
    _Keys,
    bucket_size,
    frames_to_uint8,
    is_longcat_folder,
    refine_layout,
)
from jaxvid.schedulers import flow_match
from jaxvid.synthetic.longcat import write_tiny_longcat
from jaxvid.tokenizer import longcat_tokenizer

TOL = 1e-4
L = 16  # text length (upstream 512): short keeps the tiny runs fast
PROMPT = "A cat walks along a sunny street."
NEGATIVE = "ugly, blurred"


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_longcat(tmp_path_factory.mktemp("longcat") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def pipe(folder):
    return LongCatPipeline.from_pretrained(folder, progress=False)


@pytest.fixture(autouse=True)
def _reset(pipe):
    yield
    pipe.disable_all_loras()
    pipe.disable_bsa()


def _frames(n, h, w, seed):
    return (np.random.default_rng(seed).random((n, h, w, 3)) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The reference: upstream's code, step by step
# ---------------------------------------------------------------------------------------------

_dit = nnx.jit(lambda m, x, t, y, mask, lora, kv: m(x, t, y, mask, kv_cache_dict=kv, lora=lora))
_dit_nc = nnx.jit(lambda m, x, t, y, mask, lora, kv, nc: m(x, t, y, mask, num_cond_latents=nc, kv_cache_dict=kv,
                                                              lora=lora), static_argnames=("nc",))
_dit_kv = nnx.jit(lambda m, x, t, lora: m(x, t, None, None, return_kv=True, skip_crs_attn=True, lora=lora)[1])


def _component(fn, module):
    """module.<method> through the pipeline's thin jitted wrapper (nnx.merge + one call): sharing its
    compilations saves ~1 min of CPU compile time; the pipeline logic under test is all outside it."""
    graphdef, state = nnx.split(module)
    # on the device even where the pipeline's offload policy parks it in host memory
    state = jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device"))
    return lambda *args: fn(graphdef, state, *args)


class Reference:
    """LongCatVideoPipeline's methods on the pipeline's components (upstream names, upstream order)."""

    def __init__(self, pipe: LongCatPipeline, folder):
        self.p, self.folder = pipe, folder
        self.dtype = pipe.dit.cfg.dtype
        # the pipeline reads umT5 on demand (offload="text"): the reference holds its own device copy
        self.t5 = _component(pipe._encode_text, pipe.components["text_encoder"].load_module())
        self.vae_encode = _component(pipe._vae_encode, pipe.vae)
        # the pipeline's decode wrapper also denormalises and post-processes (pipeline logic): not shared
        self.vae_decode = nnx.jit(lambda vae, z: vae.decode(z))

    def _get_t5_prompt_embeds(self, prompt):
        tok = longcat_tokenizer(self.folder / "tokenizer", max_length=L)([prompt])
        embeds = self.t5(jnp.asarray(tok.input_ids), jnp.asarray(tok.attention_mask))
        return embeds.astype(self.dtype)[:, None], jnp.asarray(tok.attention_mask)

    def encode_prompt(self, prompt, negative_prompt, do_cfg):
        embeds, mask = self._get_t5_prompt_embeds(prompt)
        if do_cfg:
            neg, neg_mask = self._get_t5_prompt_embeds(negative_prompt or "")
            embeds, mask = jnp.concatenate([neg, embeds]), jnp.concatenate([neg_mask, mask])
        return embeds, mask

    def normalize_latents(self, z):
        cfg = self.p.vae.cfg
        mean = np.asarray(cfg.latents_mean, np.float32).reshape(1, -1, 1, 1, 1)
        return (z - mean) * (1.0 / np.asarray(cfg.latents_std, np.float32).reshape(1, -1, 1, 1, 1))

    def denormalize_latents(self, z):
        cfg = self.p.vae.cfg
        mean = np.asarray(cfg.latents_mean, np.float32).reshape(1, -1, 1, 1, 1)
        return z / (1.0 / np.asarray(cfg.latents_std, np.float32).reshape(1, -1, 1, 1, 1)) + mean

    def decode(self, latents):
        video = np.asarray(self.vae_decode(self.p.vae, jnp.asarray(self.denormalize_latents(np.asarray(latents)))))
        return np.clip(video / 2 + 0.5, 0, 1).transpose(0, 2, 3, 4, 1)  # postprocess_video(output_type="np")

    @staticmethod
    def preprocess(frames, height, width):
        """diffusers' VideoProcessor on PIL frames, as upstream calls it: -> [1, 3, F, H, W]."""
        import PIL.Image
        from diffusers.video_processor import VideoProcessor

        video = [PIL.Image.fromarray(f) for f in frames]
        return VideoProcessor(vae_scale_factor=8).preprocess_video(video, height=height, width=width).numpy()

    def encode_cond(self, pixels, key):
        return self.normalize_latents(np.asarray(self.vae_encode(jnp.asarray(pixels), key)))

    @staticmethod
    def guidance(noise_pred, g):
        uncond, cond = np.split(np.asarray(noise_pred, np.float32), 2)
        b = cond.shape[0]
        positive, negative = cond.reshape(b, -1), uncond.reshape(b, -1)
        dot = np.sum(positive * negative, axis=1, keepdims=True)
        squared_norm = np.sum(negative ** 2, axis=1, keepdims=True) + 1e-8
        st_star = (dot / squared_norm).reshape(b, 1, 1, 1, 1)
        return uncond * st_star + g * (cond - uncond * st_star)

    def loop(self, latents, embeds, mask, timesteps, sigmas, g, nc=0, use_kv_cache=False):
        """The `for i, t in enumerate(timesteps)` loop of generate_t2v / i2v / vc / refine."""
        lora = self.p.loras.runtime(dtype=self.dtype)
        do_cfg = g > 1
        latents = np.asarray(latents, np.float32).copy()
        kv = None
        if use_kv_cache:
            cond_latents = latents[:, :, :nc]
            kv = _dit_kv(self.p.dit, jnp.asarray(cond_latents), jnp.zeros((1, nc)), lora)
            latents = latents[:, :, nc:]
        for i, t in enumerate(timesteps):
            model_in = np.concatenate([latents] * 2) if do_cfg else latents
            timestep = np.full((model_in.shape[0], model_in.shape[2]), t, np.float32)
            if not use_kv_cache:
                timestep[:, :nc] = 0
            args = (self.p.dit, jnp.asarray(model_in), jnp.asarray(timestep), embeds, mask, lora, kv)
            noise_pred = np.asarray(_dit_nc(*args, nc=nc) if nc else _dit(*args))
            if do_cfg:
                noise_pred = self.guidance(noise_pred, g)
            noise_pred = -noise_pred
            dt = sigmas[i + 1] - sigmas[i]  # FlowMatchEulerDiscreteScheduler.step
            if use_kv_cache:
                latents = latents + dt * noise_pred
            else:
                latents[:, :, nc:] = latents[:, :, nc:] + dt * noise_pred[:, :, nc:]
        if use_kv_cache:
            latents = np.concatenate([cond_latents, latents], axis=2)
        return latents

    def schedule(self, n, use_distill=False):
        state = flow_match.set_timesteps(self.p.scheduler, n,
                                         sigmas=flow_match.longcat_sigmas(n, use_distill=use_distill))
        return np.asarray(state.timesteps), np.asarray(state.sigmas)

    def generate_t2v(self, height, width, num_frames, n, g, seed, use_distill=False, prompt=PROMPT):
        embeds, mask = self.encode_prompt(prompt, NEGATIVE, g > 1)
        timesteps, sigmas = self.schedule(n, use_distill)
        shape = (1, 4, (num_frames - 1) // 4 + 1, height // 8, width // 8)
        latents = jax.random.normal(_Keys.from_seed(seed).noise, shape, jnp.float32)
        return self.loop(latents, embeds, mask, timesteps, sigmas, g)

    def generate_i2v(self, image, height, width, num_frames, n, g, seed, prompt=PROMPT):
        embeds, mask = self.encode_prompt(prompt, NEGATIVE, g > 1)
        timesteps, sigmas = self.schedule(n)
        keys = _Keys.from_seed(seed)
        shape = (1, 4, (num_frames - 1) // 4 + 1, height // 8, width // 8)
        latents = np.array(jax.random.normal(keys.noise, shape, jnp.float32))
        latents[:, :, :1] = self.encode_cond(self.preprocess([image], height, width), keys.cond)
        return self.loop(latents, embeds, mask, timesteps, sigmas, g, nc=1)

    def generate_vc(self, video, height, width, num_frames, num_cond_frames, n, g, seed, enhance_hf,
                    use_kv_cache=True, prompt=PROMPT):
        embeds, mask = self.encode_prompt(prompt, NEGATIVE, g > 1)
        timesteps, sigmas = self.schedule(n)
        if enhance_hf:
            tail = list(np.linspace(500, 0, 10, dtype=np.float32, endpoint=False))
            timesteps = np.asarray([t for t in timesteps if t > 500] + tail, np.float32)
            sigmas = np.concatenate([timesteps / 1000, [0.0]]).astype(np.float32)
        keys = _Keys.from_seed(seed)
        shape = (1, 4, (num_frames - 1) // 4 + 1, height // 8, width // 8)
        latents = np.array(jax.random.normal(keys.noise, shape, jnp.float32))
        pixels = self.preprocess(video, height, width)[:, :, -num_cond_frames:]
        nc = 1 + (num_cond_frames - 1) // 4
        latents[:, :, :nc] = self.encode_cond(pixels, keys.cond)
        return self.loop(latents, embeds, mask, timesteps, sigmas, g, nc=nc, use_kv_cache=use_kv_cache)

    def generate_refine(self, stage1_video, cond_video, num_cond_frames, height, width, n, seed, t_thresh=0.5):
        import torch
        import torch.nn.functional as F

        embeds, mask = self.encode_prompt(PROMPT, None, False)
        timesteps, _ = self.schedule(n)
        timesteps = np.concatenate([[np.float32(t_thresh * 1000)], timesteps[timesteps < t_thresh * 1000]])
        timesteps = timesteps.astype(np.float32)
        sigmas = np.concatenate([timesteps / 1000, [0.0]]).astype(np.float32)
        keys = _Keys.from_seed(seed)

        num_frame = len(stage1_video)
        new_frame_size = 2 * num_frame
        stage1 = torch.from_numpy(np.array(stage1_video)).permute(0, 3, 1, 2).float()
        video_down = F.interpolate(stage1, size=(height, width), mode="bilinear", align_corners=True)
        video_down = video_down.permute(1, 0, 2, 3).unsqueeze(0) / 255.0
        video_up = F.interpolate(video_down, size=(new_frame_size, height, width), mode="trilinear",
                                 align_corners=True) * 2 - 1
        num_noise_frames = video_up.shape[2] - num_cond_frames
        num_cond_latents = 1 + math.ceil((num_cond_frames - 1) / 4)
        num_cond_latents = math.ceil(num_cond_latents / 4) * 4
        num_cond_frames_added = 1 + (num_cond_latents - 1) * 4 - num_cond_frames
        num_noise_latents = math.ceil(math.ceil(num_noise_frames / 4) / 4) * 4
        num_noise_frames_added = num_noise_latents * 4 - num_noise_frames
        video_up = torch.cat([video_up[:, :, 0:1].repeat(1, 1, num_cond_frames_added, 1, 1), video_up,
                              video_up[:, :, -1:].repeat(1, 1, num_noise_frames_added, 1, 1)], dim=2).numpy()
        video_up = video_up[:, :, :1 + (video_up.shape[2] - 1) // 4 * 4]  # diffusers' Wan _encode drops the rest
        latent_up = self.encode_cond(video_up, keys.upsampled)
        noise = np.asarray(jax.random.normal(keys.refine_noise, latent_up.shape, jnp.float32))
        latents = (1 - t_thresh) * latent_up + t_thresh * noise
        # prepare_latents(video=...): the last frames, the first of them repeated in front
        pixels = self.preprocess(cond_video, height, width)[:, :, -num_cond_frames:]
        pixels = np.concatenate([np.repeat(pixels[:, :, :1], num_cond_frames_added, axis=2), pixels], axis=2)
        latents[:, :, :num_cond_latents] = self.encode_cond(pixels, keys.cond)
        latents = self.loop(latents, embeds, mask, timesteps, sigmas, 1.0, nc=num_cond_latents)
        frames = self.decode(latents)[:, num_cond_frames_added:new_frame_size + num_cond_frames_added]
        return latents, frames


@pytest.fixture(scope="module")
def ref(pipe, folder):
    return Reference(pipe, folder)


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def test_t2v_matches_reference_latents_and_frames(pipe, ref):
    out = pipe.generate_t2v(PROMPT, NEGATIVE, height=32, width=32, num_frames=5, num_inference_steps=3,
                            guidance_scale=4.0, seed=1, max_sequence_length=L, output_type="np")
    want = ref.generate_t2v(32, 32, 5, 3, 4.0, seed=1)
    assert out.latents.shape == (1, 4, 2, 4, 4)
    assert len(pipe.progress.step_times) == 3  # the progress callback ticked once per step
    err = rel_l2(out.latents, want)
    assert err <= TOL, f"t2v latents rel L2 {err:.2e}"
    print(f"t2v latents: rel L2 {err:.2e}")  # shown with pytest -s
    assert out.frames.shape == (1, 5, 32, 32, 3) and out.frames.min() >= 0 and out.frames.max() <= 1
    err = rel_l2(out.frames, ref.decode(want))
    assert err <= TOL, f"t2v frames rel L2 {err:.2e}"
    print(f"t2v frames: rel L2 {err:.2e}")  # shown with pytest -s


def test_t2v_distilled_with_cfg_step_lora(pipe, ref):
    pipe.enable_loras(["cfg_step_lora"])
    out = pipe.generate_t2v(PROMPT, height=32, width=32, num_frames=5, num_inference_steps=4, use_distill=True,
                            guidance_scale=1.0, seed=2, output_type="latent", max_sequence_length=L)
    want = ref.generate_t2v(32, 32, 5, 4, 1.0, seed=2, use_distill=True)
    err = rel_l2(out.latents, want)
    assert err <= TOL, f"distilled t2v rel L2 {err:.2e}"
    print(f"distilled t2v: rel L2 {err:.2e}")  # shown with pytest -s
    assert out.frames is None
    # the LoRA changes the result: it is really applied
    pipe.disable_all_loras()
    base = pipe.generate_t2v(PROMPT, height=32, width=32, num_frames=5, num_inference_steps=4, use_distill=True,
                             guidance_scale=1.0, seed=2, output_type="latent", max_sequence_length=L)
    assert rel_l2(base.latents, want) > 1e-2


def test_i2v_matches_reference(pipe, ref):
    image = _frames(1, 40, 48, seed=3)[0]
    out = pipe.generate_i2v(image, PROMPT, NEGATIVE, height=32, width=32, num_frames=9, num_inference_steps=3,
                            seed=3, output_type="latent", max_sequence_length=L)
    want = ref.generate_i2v(image, 32, 32, 9, 3, 4.0, seed=3)
    err = rel_l2(out.latents, want)
    assert err <= TOL, f"i2v rel L2 {err:.2e}"
    print(f"i2v: rel L2 {err:.2e}")  # shown with pytest -s
    # the first latent frame is the image's clean latent, untouched by the loop
    np.testing.assert_allclose(np.asarray(out.latents[:, :, 0]), want[:, :, 0], rtol=1e-5, atol=1e-6)


def test_continuation_kv_cache_enhance_hf_matches_reference(pipe, ref):
    video = _frames(9, 32, 32, seed=4)
    kw = dict(height=32, width=32, num_frames=9, num_cond_frames=5, num_inference_steps=4, seed=4,
              output_type="latent", max_sequence_length=L)
    out = pipe.generate_vc(video, PROMPT, NEGATIVE, use_kv_cache=True, enhance_hf=True, **kw)
    want = ref.generate_vc(video, 32, 32, 9, 5, 4, 4.0, seed=4, enhance_hf=True)
    assert out.latents.shape == (1, 4, 3, 4, 4)  # 2 clean + 1 new latent frame
    err = rel_l2(out.latents, want)
    assert err <= TOL, f"continuation (KV cache) rel L2 {err:.2e}"
    print(f"continuation (KV cache): rel L2 {err:.2e}")  # shown with pytest -s
    # without the cache the clean frames run through every layer each step, and (upstream) the CFG-Zero*
    # scale is then taken over all frames, clean ones included: close to, not equal to, the cached run
    no_cache = pipe.generate_vc(video, PROMPT, NEGATIVE, use_kv_cache=False, enhance_hf=True, **kw)
    want_no_cache = ref.generate_vc(video, 32, 32, 9, 5, 4, 4.0, seed=4, enhance_hf=True, use_kv_cache=False)
    err = rel_l2(no_cache.latents, want_no_cache)
    assert err <= TOL, f"continuation (no KV cache) rel L2 {err:.2e}"
    print(f"continuation (no KV cache): rel L2 {err:.2e}")  # shown with pytest -s
    assert rel_l2(no_cache.latents, want) < 0.1


@pytest.mark.slow  # one of the slowest on 2 cores (issue 16 item 17); -m 'not slow' skips
def test_refine_with_lora_bsa_and_conditioning_matches_reference(pipe, ref):
    pipe.enable_loras(["refinement_lora"])
    pipe.enable_bsa()
    assert pipe.dit.cfg.enable_bsa
    stage1 = _frames(5, 32, 64, seed=6)
    cond_video = _frames(6, 64, 128, seed=7)
    out = pipe.generate_refine(PROMPT, stage1, video=cond_video, num_cond_frames=2, height=64, width=128,
                               num_inference_steps=4, seed=6, max_sequence_length=L, output_type="np")
    want_latents, want_frames = ref.generate_refine(stage1, cond_video, 2, 64, 128, 4, seed=6)
    assert out.latents.shape == (1, 4, 8, 8, 16)  # 4 clean + 4 noisy latent frames (BSA granularity)
    err = rel_l2(out.latents, want_latents)
    assert err <= TOL, f"refine latents rel L2 {err:.2e}"
    print(f"refine latents: rel L2 {err:.2e}")  # shown with pytest -s
    assert out.frames.shape == (1, 10, 64, 128, 3)  # 2x the frames
    err = rel_l2(out.frames, want_frames)
    assert err <= TOL, f"refine frames rel L2 {err:.2e}"
    print(f"refine frames: rel L2 {err:.2e}")  # shown with pytest -s


# ---------------------------------------------------------------------------------------------
# BSA in every mode, multi-prompt long video (issue 17)
# ---------------------------------------------------------------------------------------------

# The tiny frames (32 x 32 px: a 2 x 2 token grid per latent frame) are far below 480p, where the
# resolution table says dense; explicit chunks of 1 x 2 x 2 tokens then complete the config's
# bsa_params (sparsity 0.5): one chunk per latent frame, int(0.5 * n) of the n key chunks kept
# (1 of 3 in t2v; 1 of 2 clean / 1 of 3 in the continuation), so the selection really drops keys.
BSA_VALUES = dict(chunk_3d_shape_q=(1, 2, 2), chunk_3d_shape_k=(1, 2, 2))


def test_config_json_bsa_table_is_read_and_used_by_resolution(pipe, folder, monkeypatch):
    """config.json's bsa_params as a table per resolution: parsed (each row checked), its largest row is
    enable_bsa()'s default, and runs pick their row by size (the row names the summary line uses)."""
    import json

    from jaxvid.attention.plan import BSA
    from jaxvid.models.longcat import LongCatConfig

    d = json.loads((folder / "dit" / "config.json").read_text())
    row720 = {"sparsity": 0.9375, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
    row480 = {"sparsity": 0.75, "cdf_threshold": 0.9, "chunk_3d_shape_q": [4, 2, 2], "chunk_3d_shape_k": [4, 2, 2]}
    d["bsa_params"] = {"480p": row480, "720p": row720, "360p": None}
    cfg = LongCatConfig.from_hf_config(d)
    assert cfg.bsa_params == BSA.from_dict(row720)
    assert [(r.name, r.params) for r in cfg.bsa_table] == [("720p", row720), ("480p", row480), ("360p", None)]
    monkeypatch.setattr(pipe.dit, "cfg", cfg)
    pipe.enable_bsa_by_resolution()
    for (h, w), want, which in [((704, 1280), row720, "720p"), ((480, 832), row480, "480p"),
                                ((360, 640), None, "360p"), ((128, 128), None, "dense")]:
        choice = pipe.bsa_choice(h, w)
        assert choice.params == want and choice.which.startswith(which), (h, w, choice)
    plan, text = pipe._attention_for((1, 4, 24, 60, 104))  # 480 x 832 px
    assert plan.sparse == BSA.from_dict(row480) and text.startswith("BSA sparsity 0.75 cdf_threshold 0.9")
    assert "by resolution: 480p (480x832" in text
    pipe.enable_bsa_by_resolution(sparsity=0.5)  # explicit values replace fields of the row
    assert pipe.bsa_choice(480, 832).params == {**row480, "sparsity": 0.5}
    d["bsa_params"] = {"720p": {**row720, "sparsity": "high"}}
    with pytest.raises(ValueError, match=r"bsa_params\['720p'\]: sparsity='high'"):
        LongCatConfig.from_hf_config(d)


@pytest.mark.parametrize("mode", ["t2v", "i2v", "continue"])
def test_bsa_by_resolution_in_every_mode_matches_reference(pipe, ref, mode):
    """The pipeline's per-run BSA (enable_bsa_by_resolution + explicit chunks) against the step-by-step
    reference running the DiT with the same BSA spec as its default (the model's BSA path is checked
    against upstream's in test_longcat_model / the dit_bsa fixture); the continuation uses the KV cache."""
    pipe.enable_bsa_by_resolution(**BSA_VALUES)
    choice = pipe.bsa_choice(32, 32)
    assert choice.params == {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [1, 2, 2],
                             "chunk_3d_shape_k": [1, 2, 2]}
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=1.0, seed=11, output_type="latent",
              max_sequence_length=L)
    if mode == "t2v":
        out = pipe.generate_t2v(PROMPT, NEGATIVE, num_frames=9, **kw)
    elif mode == "i2v":
        image = _frames(1, 32, 32, seed=12)[0]
        out = pipe.generate_i2v(image, PROMPT, NEGATIVE, num_frames=9, **kw)
    else:
        video = _frames(9, 32, 32, seed=13)
        out = pipe.generate_vc(video, PROMPT, NEGATIVE, num_frames=9, num_cond_frames=5, enhance_hf=False, **kw)
    assert pipe.last_attention.startswith("BSA sparsity 0.5, chunks q 1x2x2 / k 1x2x2 by resolution: config "
                                          "bsa_params (dense (32x32"), pipe.last_attention
    pipe.dit.enable_bsa(choice.params)  # the reference's DiT calls run this spec by default
    if mode == "t2v":
        want = ref.generate_t2v(32, 32, 9, 2, 1.0, seed=11)
    elif mode == "i2v":
        want = ref.generate_i2v(image, 32, 32, 9, 2, 1.0, seed=11)
    else:
        want = ref.generate_vc(video, 32, 32, 9, 5, 2, 1.0, seed=11, enhance_hf=False)
    err = rel_l2(out.latents, want)
    assert err <= TOL, f"{mode} with BSA: rel L2 {err:.2e}"
    print(f"{mode} with BSA: rel L2 {err:.2e}")  # shown with pytest -s


def test_bsa_chunks_that_do_not_tile_the_grid_fail_before_compiling(pipe):
    """Upstream's flash_attn_bsa_3d asserts chunks that divide the token grid; so does the pipeline,
    before compiling, naming the sizes that fit (denoise on zeros: nothing runs)."""
    embeds, mask = jnp.zeros((1, 1, L, 32)), jnp.ones((1, L), jnp.int32)
    schedule = pipe.schedule(1)
    pipe.enable_bsa_by_resolution(**BSA_VALUES)
    with pytest.raises(ValueError, match=r"not divisible by the chunk shape \(1, 2, 2\).*width a multiple of 32"):
        pipe.denoise(jnp.zeros((1, 4, 2, 4, 6)), embeds, mask, schedule, guidance_scale=1.0)  # 2 x 3 tokens
    # i2v: one clean latent frame; time chunks of 2 do not divide it (upstream asserts the same)
    pipe.enable_bsa_by_resolution(chunk_3d_shape_q=(2, 2, 2), chunk_3d_shape_k=(2, 2, 2))
    with pytest.raises(ValueError, match=r"conditioning queries/keys"):
        pipe.denoise(jnp.zeros((1, 4, 3, 4, 4)), embeds, mask, schedule, guidance_scale=1.0, num_cond_latents=1)
    # KV cache: 3 clean latent frames cached with BSA, time chunks of 2 do not divide them
    with pytest.raises(ValueError, match=r"\(3, 2, 2\) \(T, H/patch, W/patch\) of the queries"):
        pipe.denoise(jnp.zeros((1, 4, 5, 4, 4)), embeds, mask, schedule, guidance_scale=1.0, num_cond_latents=3,
                     use_kv_cache=True)
    with pytest.raises(ValueError, match="sparsity"):
        pipe.enable_bsa_by_resolution(sparsity=1.5)


def test_multi_prompt_long_video_follows_upstream_interactive_loop(pipe, ref, monkeypatch):
    """run_demo_interactive_video: segment k continues the last num_cond_frames frames of segment k-1
    with prompt k; the reference is that loop over the step-by-step generate_vc."""
    prompts = [PROMPT, "Two dogs play in the snow near a frozen lake."]
    video = _frames(9, 32, 32, seed=5)
    calls = []
    generate_vc = pipe.generate_vc

    def spy(current, prompt, *args, **kwargs):
        out = generate_vc(current, prompt, *args, **kwargs)
        calls.append((np.array(current), prompt, out.frames[0]))
        return out

    monkeypatch.setattr(pipe, "generate_vc", spy)
    got = pipe.generate_long(prompts, video=video, num_frames=9, num_cond_frames=5, height=32, width=32,
                             num_inference_steps=3, guidance_scale=1.0, enhance_hf=False, seed=5,
                             max_sequence_length=L).frames[0]
    assert [c[1] for c in calls] == prompts  # with `video`: prompt k for continuation k + 1
    np.testing.assert_array_equal(calls[0][0], video)
    # segment k's conditioning frames are segment k-1's output tail (uint8, as upstream passes them)
    np.testing.assert_array_equal(calls[1][0][-5:], calls[0][2][-5:])
    current, pieces = video, [video]
    for segment, prompt in enumerate(prompts):
        latents = ref.generate_vc(current, 32, 32, 9, 5, 3, 1.0, seed=5 + segment + 1, enhance_hf=False,
                                  prompt=prompt)
        new = (ref.decode(latents)[0] * 255).astype(np.uint8)
        pieces.append(new[5:])
        current = new
    want = np.concatenate(pieces)
    assert got.shape == want.shape == (9 + 2 * 4, 32, 32, 3)
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    print(f"multi-prompt long video: uint8 max diff {diff.max()}, mean {diff.mean():.2e}")  # shown with pytest -s
    assert diff.max() <= 2 and diff.mean() < 0.01, f"multi-prompt: max diff {diff.max()}, mean {diff.mean():.4f}"


def test_long_video_segments_and_prompts_follow_upstream_demos(pipe, monkeypatch):
    """The segment loop alone (generate_t2v / generate_vc stubbed, no compilation): which prompt and
    which frames each segment gets, as run_demo_long_video (one prompt) and run_demo_interactive_video
    (a prompt per segment) pass them; the stubs' frames are random, so any mix-up shows."""
    rng = np.random.default_rng(0)
    calls = []

    def t2v(prompt, negative, **kw):
        frames = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
        calls.append(("t2v", prompt, None, frames, kw["seed"]))
        return type("Out", (), {"frames": frames[None]})

    def vc(current, prompt, negative, **kw):
        frames = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
        calls.append(("vc", prompt, np.array(current), frames, kw["seed"]))
        return type("Out", (), {"frames": frames[None]})

    monkeypatch.setattr(pipe, "generate_t2v", t2v)
    monkeypatch.setattr(pipe, "generate_vc", vc)
    kw = dict(num_frames=9, num_cond_frames=5, height=32, width=32, seed=7)
    for prompt, video, want_prompts in [
        ("one", None, ["one"] * 3),  # run_demo_long_video, num_segments=2
        (["a", "b", "c"], None, ["a", "b", "c"]),  # run_demo_interactive_video: t2v with prompt 0
        (["b", "c"], _frames(9, 32, 32, seed=1), ["b", "c"]),  # continuing a given video
    ]:
        calls.clear()
        got = pipe.generate_long(prompt, video=video, **({"num_segments": 2} if isinstance(prompt, str) else {}),
                                 **kw).frames[0]
        segments = [c for c in calls]
        assert [c[1] for c in segments if c[0] == "vc"] == want_prompts[-2:]
        if video is None:
            assert segments[0][:2] == ("t2v", want_prompts[0])
            first = segments[0][3]
        else:
            first = video
        vcs = [c for c in segments if c[0] == "vc"]
        # every continuation conditions on the whole previous segment (generate_vc takes its last
        # num_cond_frames) and keeps only its new frames; seeds seed + 1, seed + 2, ...
        np.testing.assert_array_equal(vcs[0][2], first)
        np.testing.assert_array_equal(vcs[1][2], vcs[0][3])
        assert [c[4] for c in vcs] == [8, 9]
        np.testing.assert_array_equal(got, np.concatenate([first, vcs[0][3][5:], vcs[1][3][5:]]))


def test_multi_prompt_argument_errors(pipe):
    with pytest.raises(ValueError, match="num_segments=3 but prompt has 2 prompts"):
        pipe.generate_long([PROMPT, PROMPT], num_segments=3, height=32, width=32, num_frames=9)
    with pytest.raises(ValueError, match="at least 2"):
        pipe.generate_long([PROMPT], height=32, width=32, num_frames=9)


# ---------------------------------------------------------------------------------------------
# Arguments and errors (no compilation)
# ---------------------------------------------------------------------------------------------


def test_folder_detection_and_missing_components(folder, tmp_path):
    assert is_longcat_folder(folder)
    assert not is_longcat_folder(tmp_path)
    (tmp_path / "dit").mkdir()
    with pytest.raises(ValueError, match="missing component folders"):
        LongCatPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=40, width=32), "height=40"),
    (dict(height=32, width=830), "width=830"),
    (dict(num_frames=10), "num_frames=10"),
    (dict(num_inference_steps=0), "num_inference_steps=0"),
    (dict(output_type="pil"), "output_type='pil'"),
])
def test_t2v_rejects_bad_arguments(pipe, kwargs, match):
    base = dict(height=32, width=32, num_frames=5, num_inference_steps=2, max_sequence_length=L)
    with pytest.raises(ValueError, match=match):
        pipe.generate_t2v(PROMPT, **{**base, **kwargs})


def test_mode_argument_errors(pipe):
    video = _frames(9, 32, 32, seed=0)
    with pytest.raises(ValueError, match="prompt"):
        pipe.generate_t2v(None, height=32, width=32, num_frames=5)
    with pytest.raises(ValueError, match="use_distill=True with enhance_hf=True"):
        pipe.generate_vc(video, PROMPT, height=32, width=32, num_frames=13, num_cond_frames=5, use_distill=True)
    with pytest.raises(ValueError, match="num_cond_frames=6"):
        pipe.generate_vc(video, PROMPT, height=32, width=32, num_frames=13, num_cond_frames=6)
    with pytest.raises(ValueError, match="num_cond_frames=13"):  # more than the video has
        pipe.generate_vc(video, PROMPT, height=32, width=32, num_frames=17, num_cond_frames=13)
    with pytest.raises(ValueError, match="resolution='1080p'"):
        pipe.generate_i2v(video[0], PROMPT, resolution="1080p")
    with pytest.raises(ValueError, match="give both or neither"):
        pipe.generate_i2v(video[0], PROMPT, height=32)
    with pytest.raises(ValueError, match="expected uint8"):
        pipe.generate_i2v(video[0].astype(np.float32), PROMPT, height=32, width=32)
    with pytest.raises(ValueError, match="image and video"):
        pipe.generate_refine(PROMPT, video, image=video[0], video=video, num_cond_frames=1)
    with pytest.raises(ValueError, match="height=32"):  # refinement needs multiples of 64
        pipe.generate_refine(PROMPT, video, height=32, width=64)
    with pytest.raises(ValueError, match="neither image nor video"):
        pipe.generate_refine(PROMPT, video, num_cond_frames=2, height=64, width=64)
    with pytest.raises(ValueError, match="t_thresh"):
        pipe.generate_refine(PROMPT, video, t_thresh=1.5, height=64, width=64)


def test_missing_lora_is_a_clear_error(pipe, folder, tmp_path):
    with pytest.raises(ValueError, match=r"LoRA 'no_such_lora': .*no_such_lora.safetensors does not exist"):
        pipe.enable_loras(["no_such_lora"])
    with pytest.raises(ValueError, match="does not exist"):
        pipe.load_lora("x", tmp_path / "x.safetensors")
    assert pipe.loras.enabled == []


def test_buckets_and_refine_layout_follow_upstream():
    assert bucket_size(720, 1280, "480p") == (480, 832)  # ratio 0.5625 -> '0.58'
    assert bucket_size(480, 832, "720p", 64) == (704, 1280)  # the refinement bucket of a 480p result
    assert bucket_size(1000, 1000, "480p") == (608, 640)  # ratio 1.0: '0.95' and '1.05' tie, first wins
    with pytest.raises(ValueError, match="resolution='480p' with spatial scale 64"):
        bucket_size(480, 832, "480p", 64)
    # 93 frames -> 186 refined: 47 latents rounded to 48 (BSA granularity 4), 6 frames appended
    assert refine_layout(186, 0) == (0, 0, 0, 6)
    # continuation refine: 26 conditioning frames -> 8 clean latents (29 frames, 3 added in front)
    assert refine_layout(186, 26) == (8, 29, 3, 0)
    # image refine: 1 frame -> 4 clean latents, 12 copies in front
    assert refine_layout(186, 1) == (4, 13, 12, 7)
    with pytest.raises(ValueError, match="num_cond_frames=186"):
        refine_layout(186, 186)


def test_frames_to_uint8_truncates_like_upstream():
    x = np.array([0.0, 0.5, 0.999, 1.0, 1.2, -0.1], np.float32).reshape(1, 1, 6, 1)
    np.testing.assert_array_equal(frames_to_uint8(x).ravel(), [0, 127, 254, 255, 255, 0])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_multi_prompt_long_video_with_bsa_writes_a_video(folder, tmp_path, caplog):
    """--prompt-file (t2v with line 1, a continuation with line 2) and the BSA flags, end to end; the
    summary line names the attention (explicit chunks over the config's bsa_params: 32 px is below
    every resolution row)."""
    from jaxvid import video
    from jaxvid.cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\nTwo dogs play in the snow near a frozen lake.\n")
    out = tmp_path / "clip.mp4"
    with caplog.at_level("INFO"):
        rc = main(["generate", "--model", str(folder), "--prompt-file", str(prompts), "--height", "32", "--width",
                   "32", "--num-frames", "5", "--num-cond-frames", "1", "--steps", "2", "--guidance", "1",
                   "--no-enhance-hf", "--max-sequence-length", str(L), "--dtype", "fp32", "--no-progress", "--bsa",
                   "--bsa-chunk-q", "1,2,2", "--bsa-chunk-k", "1,2,2", "--output", str(out)])
    assert rc == 0
    written = out if out.exists() else out.with_suffix(".gif")
    frames = video.load(written)
    assert frames.shape[0] == 5 + 4 and frames.shape[1:3] == (32, 32)  # t2v + one continuation's new frames
    assert "long video: segment 1/1" in caplog.text
    assert "attention: BSA sparsity 0.5, chunks q 1x2x2 / k 1x2x2 by resolution: config bsa_params" in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["--mode", "i2v", "--prompt", "p"], "--mode i2v needs --image"),
    (["--mode", "t2v"], "--prompt is required"),
    (["--mode", "continue", "--prompt", "p", "--video", "missing.mp4"], "no such file"),
    (["--mode", "t2v", "--prompt", "p", "--bsa-sparsity", "0.5"], "--bsa-sparsity: BSA is off in this run"),
    (["--mode", "refine", "--video", "{one_line}", "--no-bsa", "--bsa-chunk-q", "4,4,4"], "--bsa-chunk-q: BSA is off"),
    (["--mode", "t2v", "--prompt", "p", "--bsa", "--bsa-cdf-threshold", "0"], "--bsa-cdf-threshold=0.0"),
    (["--mode", "t2v", "--prompt-file", "p.txt"], "--prompt-file is for --mode long"),
    (["--mode", "long", "--prompt", "p", "--prompt-file", "p.txt"], "--prompt and --prompt-file"),
    (["--mode", "long", "--prompt-file", "missing.txt"], "--prompt-file='missing.txt': no such file"),
    (["--prompt-file", "{one_line}"], "has 1 prompt(s); expected at least 2"),
])
def test_cli_rejects_bad_requests(folder, argv, message, caplog):
    from jaxvid.cli.main import main

    one_line = folder.parent / "one_line.txt"
    one_line.write_text("# a comment\na cat walks\n\n")
    argv = [a.replace("{one_line}", str(one_line)) for a in argv]

    with caplog.at_level("ERROR"):
        assert main(["generate", "--model", str(folder), *argv]) == 2
    assert message in caplog.text


def test_generate_parser_takes_the_longcat_options():
    import argparse

    from jaxvid.cli.generate import add_generate_parser

    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", "--model", "m", "--mode", "refine", "--video", "v.mp4",
                              "--spatial-refine-only"])
    assert (args.mode, args.video, args.spatial_refine_only, args.guidance) == ("refine", "v.mp4", True, None)
    args = parser.parse_args(["generate", "--model", "m", "--bsa", "--bsa-chunk-q", "4,4,8", "--bsa-chunk-k",
                              "2,4,4", "--bsa-cdf-threshold", "0.9", "--prompt-file", "p.txt"])
    assert (args.bsa, args.bsa_chunk_q, args.bsa_chunk_k, args.bsa_cdf_threshold, args.prompt_file) == (
        True, (4, 4, 8), (2, 4, 4), 0.9, "p.txt")
    assert parser.parse_args(["generate", "--no-bsa"]).bsa is False
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--bsa-chunk-q", "4,4"])


def test_converted_folder_loads_the_same_pipeline(pipe, folder, tmp_path):
    from jaxvid.cli.convert import convert_path

    converted = convert_path(folder, tmp_path / "converted", dtype="fp32", show_progress=False)
    assert is_longcat_folder(converted)
    other = LongCatPipeline.from_pretrained(converted, progress=False)
    for name in ("dit", "text_encoder", "vae"):  # umT5 read on demand, from the converted checkpoint too
        a = jax.tree.leaves(nnx.state(pipe.components[name].load_module(), nnx.Param))
        b = jax.tree.leaves(nnx.state(other.components[name].load_module(), nnx.Param))
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)), name
    assert other.scheduler == pipe.scheduler
    other.enable_loras(["cfg_step_lora", "refinement_lora"])  # lora/ copied along
    assert other.loras.enabled == ["cfg_step_lora", "refinement_lora"]
