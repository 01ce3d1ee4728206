"""CogVideoX text-to-video and image-to-video: tokens -> T5 -> one jitted denoising loop -> VAE -> uint8 frames.

Faithful to diffusers' `CogVideoXPipeline` and `CogVideoXImageToVideoPipeline` (diffusers 0.42.1,
pipelines/cogvideo/): latent frames (F - 1) // 4 + 1, CogVideoX 1.5's padding of the latent frames
to a multiple of patch_size_t (dropped from the front before decoding), classifier-free guidance by
batch doubling [negative; positive], diffusers' dynamic CFG formula (it uses the timestep value t,
not the step index), DDIM or DPM-Solver++(2M) per the folder's scheduler config (DPM carries the
previous x_0 and draws fresh noise every step), division by the VAE scaling factor, decoding and
rounding to uint8 as diffusers' VideoProcessor (PIL output) does.

Every network runs as a pure jitted function of (graphdef, state, inputs): weights are arguments,
never constants. The whole denoising loop is ONE executable (a `lax.fori_loop` over steps, see
loop.py); an attention plan's dense timesteps switch with `lax.cond` inside it. Executables are
cached by input shapes, so a second call with the same shapes does not compile again.

Random numbers (jax.random, so they differ from torch's): `generation_keys(seed)` splits the seed
into the initial-noise key, the DPM per-step noise key (folded with the step index) and the key of
the I2V image-latent sample.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvid.attention.plan import AttentionPlan
from jaxvid.models.dtypes import DTYPES, resolve_dtype
from jaxvid.models.loading import load_model, parse_config
from jaxvid.parallel import mesh_context, on_mesh, place_module, place_replicated, shard_spatial
from jaxvid.pipelines.loop import (
    CompiledFunction,
    Component,
    StepProgress,
    denoise_loop,
    guided_prediction,
    with_plan_switch,
)
from jaxvid.pipelines.output import VideoOutput, check_output_type, finish_frames
from jaxvid.pipelines.settings import Sampling, VideoGeometry
from jaxvid.schedulers import cogvideox_ddim, cogvideox_dpm
from jaxvid.schedulers.cogvideox_ddim import INIT_NOISE_SIGMA, CogVideoXSchedulerConfig
from jaxvid.schedulers.guidance import classifier_free_guidance, cogvideox_guidance_scales
from jaxvid.tokenizer import COGVIDEOX_MAX_LENGTH, TextTokenizer, cogvideox_tokenizer

__all__ = [
    "CogVideoXPipeline", "GenerationKeys", "generation_keys", "dpm_step_noise", "preprocess_image",
    "check_video_shape", "read_pipeline_configs", "DTYPES", "default_fps", "default_geometry",
]

log = logging.getLogger(__name__)

SCHEDULERS = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}
# CogVideoX 1.5's model card size (height, width); its config's sample size is the RoPE grid's maximum.
MODEL_1_5_SIZE = (768, 1360)
# diffusers' CogVideoX 1.5 I2V pipeline passes ofs = 2.0 for every sample.
I2V_OFS = 2.0
_TRANSFORMERS = ("CogVideoXTransformer3DModel",)
# diffusers' export fps: 8 for CogVideoX, 16 for CogVideoX 1.5 (patch_size_t set)
FPS, FPS_1_5 = 8, 16


DEFAULT_STEPS = 50


def default_geometry(tcfg: Any, vcfg: Any) -> VideoGeometry:
    """Frames and size when none are asked for: the transformer's sample size, as diffusers' pipelines
    default. CogVideoX 1.5 configs give the RoPE grid's maximum (300 x 300 latents) instead of a size
    to generate at, so those are capped at the model card's 768 x 1360. Needs the configs only."""
    s = vcfg.spatial_compression
    height, width = tcfg.sample_height * s, tcfg.sample_width * s
    if tcfg.patch_size_t is not None:
        height, width = min(height, MODEL_1_5_SIZE[0]), min(width, MODEL_1_5_SIZE[1])
    return VideoGeometry(num_frames=tcfg.sample_frames, height=height, width=width)


def default_fps(tcfg: Any) -> int:
    """The frame rate a CogVideoX transformer's videos are made for (8; 16 for 1.5)."""
    return FPS_1_5 if tcfg.patch_size_t is not None else FPS


# ============================================================================================
# Random numbers
# ============================================================================================


class GenerationKeys(NamedTuple):
    """latents: initial noise; dpm: DPM step noise (fold_in step index); image: I2V image-latent sample."""

    latents: jax.Array
    dpm: jax.Array
    image: jax.Array


def generation_keys(seed: int) -> GenerationKeys:
    """The three keys one generation uses, from one integer seed."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r}; expected an int")
    return GenerationKeys(*jax.random.split(jax.random.key(int(seed)), 3))


def dpm_step_noise(key: jax.Array, step: jax.Array | int, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """The N(0, 1) noise DPM step `step` adds: drawn in float32, cast to the latents' dtype."""
    return jax.random.normal(jax.random.fold_in(key, step), shape, jnp.float32).astype(dtype)


# ============================================================================================
# Image preprocessing (I2V) and postprocessing
# ============================================================================================


def preprocess_image(image: Any, height: int, width: int) -> np.ndarray:
    """An image (PIL, or uint8 / float-in-[0, 1] array [H, W, 3]) -> float32 [1, 3, height, width] in [-1, 1].

    As diffusers' VaeImageProcessor.preprocess does for a PIL image: resize to (width, height)
    with Lanczos, RGB, / 255, * 2 - 1. Arrays are turned into PIL images first (uint8).
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise ValueError(f"image: expected a PIL image or an array [H, W, 3], got shape {array.shape}")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating) or array.min() < 0 or array.max() > 1:
                raise ValueError(f"image: expected uint8 or floats in [0, 1], got {array.dtype} "
                                 f"in [{array.min()}, {array.max()}]")
            array = np.round(array * 255).astype(np.uint8)
        image = Image.fromarray(array[..., :3])
    image = image.convert("RGB").resize((width, height), resample=Image.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return (pixels * 2.0 - 1.0).transpose(2, 0, 1)[None]


def check_video_shape(tcfg: Any, vcfg: Any, num_frames: int, height: int, width: int) -> None:
    """Raise ValueError naming the argument if a CogVideoX transformer config `tcfg` and VAE config
    `vcfg` cannot make a video of num_frames x height x width (needs configs only, no weights)."""
    tc, s, p = vcfg.temporal_compression_ratio, vcfg.spatial_compression, tcfg.patch_size
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive int")
    if (num_frames - 1) % tc:
        lo = (num_frames - 1) // tc * tc + 1
        raise ValueError(
            f"num_frames={num_frames}; expected 1 + {tc}k frames (the VAE compresses time by {tc}), "
            f"e.g. {lo} or {lo + tc}"
        )
    for name, value in (("height", height), ("width", width)):
        if value % (s * p):
            raise ValueError(f"{name}={value}; expected a multiple of {s * p} (VAE downsampling {s} x patch_size {p})")
    if tcfg.use_learned_positional_embeddings and (height // s, width // s) != (tcfg.sample_height, tcfg.sample_width):
        raise ValueError(
            f"height x width = {height}x{width}; this model's learned position table only covers "
            f"{tcfg.sample_height * s}x{tcfg.sample_width * s}"
        )
    if tcfg.patch_size_t is not None and tcfg.use_rotary_positional_embeddings:
        max_h, max_w = tcfg.sample_height * s, tcfg.sample_width * s
        if height > max_h or width > max_w:
            raise ValueError(f"height x width = {height}x{width}; CogVideoX 1.5's RoPE grid covers at most {max_h}x{max_w}")


def read_pipeline_configs(path: str | os.PathLike) -> tuple[Any, Any, bool]:
    """(transformer config, VAE config, is image-to-video) of a pipeline folder, without loading weights."""
    from jaxvid.models.cogvideox import CogVideoXConfig
    from jaxvid.models.loading import parse_config, read_config
    from jaxvid.models.vae_cogvideox import CogVideoXVAEConfig

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"model={str(path)!r}: no model_index.json; expected a CogVideoX pipeline folder")
    index = _read_json(path / "model_index.json")
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / name).is_dir():
            raise ValueError(f"model={str(path)!r}: missing the {name}/ folder a CogVideoX pipeline needs")
    tcfg = parse_config(CogVideoXConfig, read_config(path / "transformer"), path / "transformer" / "config.json")
    vcfg = parse_config(CogVideoXVAEConfig, read_config(path / "vae"), path / "vae" / "config.json")
    pipeline_class = index.get("_class_name", "")
    i2v = "ImageToVideo" in pipeline_class if pipeline_class else tcfg.in_channels == 2 * vcfg.latent_channels
    return tcfg, vcfg, i2v


# ============================================================================================
# Jitted stages (pure functions of graphdef, state, inputs)
# ============================================================================================


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class LoopSpec:
    """Everything static about one denoising loop (hashable: part of the executable cache key)."""

    scheduler: str  # "ddim" | "dpm"
    scheduler_config: CogVideoXSchedulerConfig
    do_cfg: bool
    attention: AttentionPlan | None
    ofs: float | None  # the ofs value for models with an ofs embedding


def _initial_noise(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """N(0, 1) [shape] drawn in float32, cast to `dtype`, times the scheduler's init_noise_sigma."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype) * jnp.asarray(INIT_NOISE_SIGMA, dtype)


def _encode_text(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, dtype: Any) -> jax.Array:
    """ids int32 [B, L] -> T5 last hidden state [B, L, D] in `dtype` (no attention mask, as diffusers)."""
    return nnx.merge(graphdef, state)(input_ids).astype(dtype)


def _encode_image(graphdef: nnx.GraphDef, state: nnx.State, image: jax.Array, key: jax.Array,
                  scale: float) -> jax.Array:
    """image [B, 3, H, W] in [-1, 1] -> sampled, scaled image latents [B, 1, C, h, w]."""
    vae = nnx.merge(graphdef, state)
    posterior = vae.encode(image[:, :, None])  # [B, C, 1, h, w]
    return (posterior.sample(key) * scale).transpose(0, 2, 1, 3, 4)


def _decode(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array, tiling: Any,
            scaling_factor: float) -> jax.Array:
    """latents [B, F, C, h, w] -> float32 frames [B, F', H, W, 3] in [0, 1] (clamp(x / 2 + 0.5), as diffusers)."""
    vae = nnx.merge(graphdef, state)
    z = latents.transpose(0, 2, 1, 3, 4) / scaling_factor
    z = shard_spatial(z, axis=3)  # under a device mesh: latent rows split over the devices (XLA exchanges halos)
    video = vae.decode(z.astype(vae.cfg.dtype), tiling=tiling)
    return jnp.clip(video.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 4, 1)


def _denoise(
    graphdef: nnx.GraphDef,
    spec: LoopSpec,
    progress: StepProgress | None,
    state: nnx.State,
    latents: jax.Array,
    prompt_embeds: jax.Array,
    image_latents: jax.Array | None,
    schedule: Any,
    guidance_scales: jax.Array,
    dpm_key: jax.Array,
) -> jax.Array:
    """The whole denoising loop: latents [B, F, C, h, w] -> denoised latents (same shape and dtype).

    prompt_embeds: [2B, L, D] = [negative; positive] with CFG, else [B, L, D]. image_latents:
    [B, F, C, h, w] (I2V) or None. schedule: the scheduler state (per-step tables, timesteps [N]).
    guidance_scales: float32 [N], the scale of each step.
    """
    plan = spec.attention
    num_steps = schedule.timesteps.shape[0]
    dtype = latents.dtype
    if image_latents is not None and spec.do_cfg:
        image_latents = jnp.concatenate([image_latents, image_latents], axis=0)
    ofs = None if spec.ofs is None else jnp.full((1,), spec.ofs, dtype)

    def predict(i: jax.Array, latents: jax.Array) -> jax.Array:
        def model_call(model_input: jax.Array) -> jax.Array:
            # Merged inside the loop body so the module lives at the loop's trace level (NNX checks this
            # when a model runs its layers with nnx.scan).
            model = nnx.merge(graphdef, state)
            if image_latents is not None:
                model_input = jnp.concatenate([model_input, image_latents], axis=2)
            timestep = jnp.broadcast_to(schedule.timesteps[i], (model_input.shape[0],))
            return with_plan_switch(plan, i, lambda attention: model(
                model_input, prompt_embeds, timestep, ofs, attention=attention).astype(jnp.float32))

        return guided_prediction(model_call, latents, do_cfg=spec.do_cfg,
                                 combine=lambda uncond, cond: classifier_free_guidance(uncond, cond, guidance_scales[i]))

    if spec.scheduler == "ddim":
        def step(i, carry):
            pred = predict(i, carry)
            out = cogvideox_ddim.step(spec.scheduler_config, schedule, pred, carry, i)
            return out.prev_sample.astype(dtype)

        return denoise_loop(step, latents, num_steps, progress)

    def dpm_step(i, carry):
        latents, old_x0 = carry
        pred = predict(i, latents)
        noise = dpm_step_noise(dpm_key, i, latents.shape, dtype)
        out = cogvideox_dpm.step(spec.scheduler_config, schedule, pred, latents, i,
                                 old_pred_original_sample=old_x0, noise=noise)
        return out.prev_sample.astype(dtype), out.pred_original_sample.astype(old_x0.dtype)

    old_x0 = jnp.zeros(latents.shape, jnp.float32)
    return denoise_loop(dpm_step, (latents, old_x0), num_steps, progress)[0]


# ============================================================================================
# Pipeline
# ============================================================================================


def _read_json(path: Path) -> dict[str, Any]:
    from jaxvid.models.loading import read_json_file

    if not path.is_file():
        raise ValueError(f"{path}: missing")
    return read_json_file(path)


class CogVideoXPipeline:
    """CogVideoX text-to-video, and image-to-video for the I2V checkpoints.

        pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-2b folder", dtype="bf16")
        out = pipe("A panda playing guitar", num_frames=49, height=480, width=720)  # out.frames uint8 [1, 49, 480, 720, 3]
        jaxvid.video.save(out.frames[0], "out.mp4", fps=out.fps)

    `last_timings` holds the timings of the latest call (seconds): compile, steps, per_step,
    encode, decode, total.
    """

    def __init__(
        self,
        *,
        transformer: nnx.Module,
        vae: nnx.Module,
        text_encoder: nnx.Module,
        tokenizer_dir: str | os.PathLike,
        scheduler_config: CogVideoXSchedulerConfig,
        scheduler: str = "ddim",
        image_to_video: bool | None = None,
    ):
        if scheduler not in ("ddim", "dpm"):
            raise ValueError(f"scheduler={scheduler!r}; expected 'ddim' or 'dpm'")
        self.transformer = Component(transformer)
        self.vae = Component(vae)
        self.text_encoder = Component(text_encoder)
        self.tokenizer_dir = Path(tokenizer_dir)
        self._tokenizers: dict[int, TextTokenizer] = {}
        self.scheduler = scheduler
        self.scheduler_config = scheduler_config
        tcfg, vcfg = transformer.cfg, vae.cfg
        if image_to_video is None:
            image_to_video = tcfg.in_channels == 2 * vcfg.latent_channels
        expected = (2 if image_to_video else 1) * vcfg.latent_channels
        if tcfg.in_channels != expected:
            raise ValueError(
                f"transformer in_channels={tcfg.in_channels} does not fit a {'I2V' if image_to_video else 'T2V'} "
                f"pipeline with VAE latent_channels={vcfg.latent_channels} (expected {expected})"
            )
        self.image_to_video = image_to_video
        self.vae_tiling: Any = None  # a CogVideoXVAETiling, or None for untiled decoding
        self.progress = StepProgress(desc="denoising")
        self.last_timings: dict[str, float] = {}
        self._denoise = CompiledFunction(
            lambda graphdef, spec, *args: _denoise(graphdef, spec, self.progress, *args), static_argnums=(0, 1))
        self._initial_noise = CompiledFunction(_initial_noise, static_argnums=(1, 2))
        self._encode_text = CompiledFunction(_encode_text, static_argnums=(0, 3))
        self._encode_image = CompiledFunction(_encode_image, static_argnums=(0, 4))
        self._decode = CompiledFunction(_decode, static_argnums=(0, 3, 4))

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: Any = None, scheduler: str | None = None
                        ) -> CogVideoXPipeline:
        """Load a diffusers CogVideoX pipeline folder (model_index.json + transformer/, vae/,
        text_encoder/, tokenizer/, scheduler/) or its `jaxvid-convert`ed form.

        dtype: "bf16" / "fp32" / "fp16" or a jnp dtype for every network; None keeps each
        component's stored dtype. scheduler: "ddim" / "dpm" to override the folder's scheduler.
        """
        path = Path(path)
        _, _, image_to_video = read_pipeline_configs(path)  # checks the layout before any weight is read
        sched_file = path / "scheduler" / "scheduler_config.json"
        sched_dict = _read_json(sched_file)
        class_name = sched_dict.get("_class_name", "CogVideoXDDIMScheduler")
        if scheduler is None:
            if class_name not in SCHEDULERS:
                raise ValueError(f"{sched_file}: _class_name={class_name!r}; expected one of {sorted(SCHEDULERS)}")
            scheduler = SCHEDULERS[class_name]
        dtype = resolve_dtype(dtype)
        t0 = time.perf_counter()
        transformer = load_model(path / "transformer", dtype=dtype, expect=_TRANSFORMERS)
        vae = load_model(path / "vae", dtype=dtype, expect=("AutoencoderKLCogVideoX",))
        text_encoder = load_model(path / "text_encoder", dtype=dtype, expect=("T5EncoderModel",))
        pipe = cls(
            transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer_dir=path / "tokenizer",
            scheduler_config=parse_config(CogVideoXSchedulerConfig, sched_dict, sched_file), scheduler=scheduler,
            image_to_video=image_to_video,
        )
        log.info("loaded CogVideoX %s pipeline from %s in %.1f s (%s, %s scheduler)", "I2V" if image_to_video else "T2V", path,
                 time.perf_counter() - t0, jnp.dtype(transformer.cfg.dtype).name, scheduler)
        return pipe

    def enable_vae_tiling(self, tiling: Any = None) -> None:
        """Decode (and encode) in overlapping spatial tiles, as diffusers' `vae.enable_tiling()`."""
        from jaxvid.models.vae_cogvideox import CogVideoXVAETiling

        self.vae_tiling = tiling or CogVideoXVAETiling.default(self.vae.module.cfg)

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = None

    # ---- shapes -------------------------------------------------------------------------
    @property
    def vae_scale_factor_spatial(self) -> int:
        return self.vae.module.cfg.spatial_compression

    @property
    def vae_scale_factor_temporal(self) -> int:
        return self.vae.module.cfg.temporal_compression_ratio

    def latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[tuple[int, ...], int]:
        """([B, F', C, h, w] of the initial noise, additional_frames), F' padded for patch_size_t.

        Checks the request first and raises ValueError naming the bad argument.
        """
        self.check_shape(num_frames, height, width)
        tcfg = self.transformer.module.cfg
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        additional = 0
        pt = tcfg.patch_size_t
        if pt is not None and latent_frames % pt:
            additional = pt - latent_frames % pt
        channels = tcfg.in_channels // 2 if self.image_to_video else tcfg.in_channels
        s = self.vae_scale_factor_spatial
        return (batch, latent_frames + additional, channels, height // s, width // s), additional

    def check_shape(self, num_frames: int, height: int, width: int) -> None:
        """Raise ValueError if the transformer and VAE cannot make this video."""
        check_video_shape(self.transformer.module.cfg, self.vae.module.cfg, num_frames, height, width)

    # ---- stages -------------------------------------------------------------------------
    def tokenizer(self, max_length: int = COGVIDEOX_MAX_LENGTH) -> TextTokenizer:
        if max_length not in self._tokenizers:
            self._tokenizers[max_length] = cogvideox_tokenizer(self.tokenizer_dir, max_length=max_length)
        return self._tokenizers[max_length]

    def encode_prompt(self, prompts: list[str], max_sequence_length: int = COGVIDEOX_MAX_LENGTH) -> jax.Array:
        """B prompts -> T5 embeddings [B, L, D] in the transformer's dtype."""
        ids = self.tokenizer(max_sequence_length)(prompts).input_ids
        enc = self.text_encoder
        return self._encode_text(enc.graphdef, enc.state, jnp.asarray(ids), jnp.dtype(self.transformer.module.cfg.dtype))

    def encode_image(self, image: Any, height: int, width: int, key: jax.Array, batch: int) -> jax.Array:
        """Preprocess and VAE-encode the conditioning image -> scaled latents [B, 1, C, h, w]."""
        vcfg = self.vae.module.cfg
        pixels = jnp.asarray(preprocess_image(image, height, width), vcfg.dtype)
        pixels = jnp.broadcast_to(pixels, (batch,) + pixels.shape[1:])
        # diffusers: image latents * scaling_factor, or / it for VAEs trained that way (invert_scale_latents)
        scale = 1.0 / vcfg.scaling_factor if vcfg.invert_scale_latents else vcfg.scaling_factor
        latents = self._encode_image(self.vae.graphdef, self.vae.state, pixels, key, float(scale))
        return latents.astype(self.transformer.module.cfg.dtype)

    def image_latents_for(self, first: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
        """[B, 1, C, h, w] image latents -> [B, F', C, h, w]: zeros over the remaining latent frames.

        diffusers' 1.5 I2V code also prepends `F' % patch_size_t` copies of the first frame, which is
        none, since F' is already padded to a multiple of patch_size_t; kept for fidelity.
        """
        b, f, c, h, w = latent_shape
        padded = jnp.concatenate([first, jnp.zeros((b, f - 1, c, h, w), first.dtype)], axis=1)
        pt = self.transformer.module.cfg.patch_size_t
        if pt is not None and f % pt:
            padded = jnp.concatenate([padded[:, : f % pt], padded], axis=1)
        return padded

    def _on_mesh(self, component: Component, mesh: Any) -> Component:
        """The component with its weights replicated on `mesh` (moved once, in place; no-op for None)."""
        if mesh is not None and not on_mesh(component.state, mesh):
            place_module(component.module, mesh)
            component.refresh()
        return component

    def decode_latents(self, latents: jax.Array, output_type: str = "uint8", mesh: Any = None) -> np.ndarray:
        """Latents [B, F, C, h, w] (scaled) -> frames [B, 1 + 4(F - 1), H, W, 3]: uint8 (rounded as
        diffusers' PIL output), or float32 in [0, 1] with output_type="np"."""
        vcfg = self.vae.module.cfg
        vae = self._on_mesh(self.vae, mesh)
        with mesh_context(mesh):
            frames = self._decode(vae.graphdef, vae.state, place_replicated(latents, mesh), self.vae_tiling,
                                  float(vcfg.scaling_factor))
        return finish_frames(frames, output_type, rounding="round")

    # ---- generation ---------------------------------------------------------------------
    def default_geometry(self) -> VideoGeometry:
        """The size this checkpoint generates at when none is asked for (see `default_geometry`)."""
        return default_geometry(self.transformer.module.cfg, self.vae.module.cfg)

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        *,
        num_frames: int = 49,
        height: int = 480,
        width: int = 720,
        num_inference_steps: int = 50,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        seed: int = 0,
        image: Any = None,
        attention: AttentionPlan | None = None,
        latents: Any = None,
        output_type: str = "uint8",
        max_sequence_length: int = COGVIDEOX_MAX_LENGTH,
        progress: bool = True,
        mesh: Any = None,
    ) -> VideoOutput:
        """Generate a video; returns a VideoOutput: frames uint8 [B, F, H, W, 3] (`.frames[0]` is the
        first video), the final latents [B, F', C, h, w] float32 (padding frames included, as diffusers
        returns them) and the fps (8; 16 for CogVideoX 1.5).

        output_type: "uint8", "np" (float32 frames in [0, 1]) or "latent" (no decoding, frames None).
        `latents` replaces the initial noise ([B, F', C, h, w], F' padded to a multiple of
        patch_size_t for CogVideoX 1.5). `image` (I2V models only, required there): a PIL image or an
        array [H, W, 3]. `attention`: None (dense) or an AttentionPlan (its dense_timesteps switch
        inside the jitted loop). `mesh`: a jax Mesh (jaxvid.parallel.make_mesh) to run the DiT on
        several devices (CFG halves over `cfg`, Ulysses over `seq`) and split the VAE decode; None = one device.
        """
        check_output_type(output_type)
        geometry = VideoGeometry(num_frames=num_frames, height=height, width=width)
        sampling = Sampling(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                            max_sequence_length=max_sequence_length)
        return self.generate(prompt, negative_prompt, geometry, sampling, use_dynamic_cfg=use_dynamic_cfg,
                             image=image, attention=attention, latents=latents, output_type=output_type,
                             progress=progress, mesh=mesh)

    def generate(self, prompt: str | list[str], negative_prompt: str | list[str], geometry: VideoGeometry,
                 sampling: Sampling, *, use_dynamic_cfg: bool = False, image: Any = None,
                 attention: AttentionPlan | None = None, latents: Any = None, output_type: str = "uint8",
                 progress: bool = True, mesh: Any = None) -> VideoOutput:
        """`__call__` with the video size and the sampling settings passed whole."""
        t_start = time.perf_counter()
        check_output_type(output_type)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt={prompt!r}; expected a string or a non-empty list of strings")
        negatives = [negative_prompt or ""] * len(prompts) if isinstance(negative_prompt, str) or negative_prompt is None \
            else list(negative_prompt)
        if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
            raise ValueError(f"negative_prompt={negative_prompt!r}; expected a string or {len(prompts)} strings "
                             "like prompt")
        if self.image_to_video and image is None:
            raise ValueError("image=None; this is an image-to-video model: pass the first frame (image=...)")
        if not self.image_to_video and image is not None:
            raise ValueError("image was given, but this is a text-to-video model (no image conditioning)")
        if attention is not None and not isinstance(attention, AttentionPlan):
            raise ValueError(f"attention={attention!r}; expected None (dense) or an AttentionPlan")
        num_inference_steps = sampling.num_inference_steps
        batch = len(prompts)
        shape, additional_frames = self.latent_shape(batch, geometry.num_frames, geometry.height, geometry.width)
        tcfg = self.transformer.module.cfg
        dtype = jnp.dtype(tcfg.dtype)
        keys = generation_keys(sampling.seed)
        timings: dict[str, float] = {"compile": 0.0}

        # 1. Text embeddings: [negative; positive] with CFG (diffusers: guidance_scale > 1)
        t0 = time.perf_counter()
        do_cfg = sampling.do_cfg
        embeds = self.encode_prompt(negatives + prompts if do_cfg else prompts, sampling.max_sequence_length)
        timings["compile"] += self._encode_text.last_compile_seconds

        # 2. Image latents (I2V)
        image_latents = None
        if self.image_to_video:
            first = self.encode_image(image, geometry.height, geometry.width, keys.image, batch)
            timings["compile"] += self._encode_image.last_compile_seconds
            image_latents = self.image_latents_for(first, shape)
        jax.block_until_ready((embeds, image_latents))
        timings["encode"] = time.perf_counter() - t0 - timings["compile"]

        # 3. Schedule, guidance and initial noise
        module = cogvideox_ddim if self.scheduler == "ddim" else cogvideox_dpm
        schedule = module.set_timesteps(self.scheduler_config, num_inference_steps)
        scales = cogvideox_guidance_scales(sampling.guidance_scale, np.asarray(schedule.timesteps),
                                           use_dynamic_cfg=use_dynamic_cfg)
        if latents is None:
            noise = self._initial_noise(keys.latents, shape, dtype)
            timings["compile"] += self._initial_noise.last_compile_seconds
        else:
            noise = jnp.asarray(latents)
            if tuple(noise.shape) != shape:
                raise ValueError(f"latents shape {tuple(noise.shape)}; expected {shape} for this request")
            noise = noise.astype(dtype) * jnp.asarray(INIT_NOISE_SIGMA, dtype)

        # 4. The jitted denoising loop
        spec = LoopSpec(scheduler=self.scheduler, scheduler_config=self.scheduler_config, do_cfg=do_cfg,
                        attention=attention, ofs=I2V_OFS if tcfg.ofs_embed_dim else None)
        self.progress.enabled = progress
        tr = self._on_mesh(self.transformer, mesh)
        args = (tr.graphdef, spec, tr.state, *place_replicated(
            (noise, embeds, image_latents, schedule, jnp.asarray(scales, jnp.float32), keys.dpm), mesh))
        with mesh_context(mesh):
            timings["compile"] += self._denoise.prepare(*args)  # compile before the bar starts
        self.progress.start(num_inference_steps)
        t0 = time.perf_counter()
        try:
            with mesh_context(mesh):
                out = jax.block_until_ready(self._denoise(*args))
        finally:
            self.progress.close()
        timings["steps"] = time.perf_counter() - t0
        timings["per_step"] = timings["steps"] / num_inference_steps

        # 5. Decode
        frames = None
        if output_type != "latent":
            t0 = time.perf_counter()
            frames = self.decode_latents(out[:, additional_frames:], output_type, mesh=mesh)
            timings["compile"] += self._decode.last_compile_seconds
            timings["decode"] = time.perf_counter() - t0 - self._decode.last_compile_seconds
        result = VideoOutput(frames=frames, latents=np.asarray(out.astype(jnp.float32)), fps=default_fps(tcfg),
                             output_type=output_type)
        timings["total"] = time.perf_counter() - t_start
        self.last_timings = timings
        log.info(
            "generated %s %s in %.2f s: compile %.2f s, %d steps at %.3f s/step, encode %.2f s, decode %.2f s",
            "latents" if frames is None else "frames", tuple((result.latents if frames is None else frames).shape),
            timings["total"], timings["compile"], num_inference_steps, timings["per_step"], timings["encode"],
            timings.get("decode", 0.0),
        )
        return result
