"""CogVideoX text-to-video and image-to-video: tokens -> T5 -> one jitted denoising loop -> VAE -> uint8 frames.

Faithful to diffusers' `CogVideoXPipeline` and `CogVideoXImageToVideoPipeline` (diffusers 0.42.1,
pipelines/cogvideo/): latent frames (F - 1) // 4 + 1, CogVideoX 1.5's padding of the latent frames
to a multiple of patch_size_t (dropped from the front before decoding), classifier-free guidance by
batch doubling [negative; positive], diffusers' dynamic CFG formula (it uses the timestep value t,
not the step index), DDIM or DPM-Solver++(2M) per the folder's scheduler config (DPM carries the
previous x_0 and draws fresh noise every step), division by the VAE scaling factor, decoding and
rounding to uint8 as diffusers' VideoProcessor (PIL output) does.

Every network runs as a pure jitted function of (graphdef, state, inputs): weights are arguments,
never constants. The whole denoising loop is ONE executable (a `lax.fori_loop` over a traced step
range, see loop.py: the host runs it one step per call while a progress bar shows, so no host
callback keeps it out of the persistent compilation cache); an attention plan's dense timesteps
switch with `lax.cond` inside it. Executables are cached by input shapes, so a second call with
the same shapes does not compile again, nor does a second process (jaxvid.compile_cache).

Random numbers (jax.random, so they differ from torch's): `generation_keys(seed)` splits the seed
into the initial-noise key, the DPM per-step noise key (folded with the step index) and the key of
the I2V image-latent sample.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvid.attention.plan import AttentionPlan
from jaxvid.models.dtypes import DTYPES, resolve_dtype
from jaxvid.models.loading import OnDemandModel, load_model, open_text_encoder, parse_config
from jaxvid.models.lora_cogvideox import CogVideoXLoraLoaderMixin
from jaxvid.models.offload import Offload
from jaxvid.parallel import mesh_context, on_mesh, place_module, place_replicated, shard_spatial
from jaxvid.pipelines.loop import (
    CompiledFunction,
    Component,
    StepProgress,
    StepRange,
    denoise_loop,
    guided_prediction,
    pad_step_tables,
    run_steps,
    with_plan_switch,
)
from jaxvid.pipelines.memory import peak_memory_gib
from jaxvid.pipelines.output import VideoOutput, check_output_type, finish_frames
from jaxvid.pipelines.settings import Sampling, VideoGeometry
from jaxvid.pipelines.step_cache import PyramidAttentionBroadcast
from jaxvid.schedulers import cogvideox_ddim, cogvideox_dpm
from jaxvid.schedulers.cogvideox_ddim import INIT_NOISE_SIGMA, CogVideoXSchedulerConfig
from jaxvid.schedulers.guidance import classifier_free_guidance, cogvideox_guidance_scales
from jaxvid.tokenizer import COGVIDEOX_MAX_LENGTH, TextTokenizer, cogvideox_tokenizer

__all__ = [
    "CogVideoXPipeline", "GenerationKeys", "generation_keys", "dpm_step_noise", "preprocess_image",
    "check_video_shape", "read_pipeline_configs", "DTYPES", "default_fps", "default_geometry",
    "default_geometry_sources", "preprocess_video", "truncate_schedule", "video_start_step", "StepEndCallback",
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
    step_cache: PyramidAttentionBroadcast | None = None  # reuse attention outputs across steps (carry holds them)


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


def _encode_video(graphdef: nnx.GraphDef, state: nnx.State, video: jax.Array, key: jax.Array,
                  scale: float) -> jax.Array:
    """video [B, 3, F, H, W] in [-1, 1] -> sampled, scaled latents [B, F', C, h, w]."""
    posterior = nnx.merge(graphdef, state).encode(video)
    return (posterior.sample(key) * scale).transpose(0, 2, 1, 3, 4)


def _decode(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array, tiling: Any,
            scaling_factor: float) -> jax.Array:
    """latents [B, F, C, h, w] -> float32 frames [B, F', H, W, 3] in [0, 1] (clamp(x / 2 + 0.5), as diffusers)."""
    vae = nnx.merge(graphdef, state)
    z = latents.transpose(0, 2, 1, 3, 4) / scaling_factor
    z = shard_spatial(z, axis=3)  # under a device mesh: latent rows split over the devices (XLA exchanges halos)
    video = vae.decode(z.astype(vae.cfg.dtype), tiling=tiling)
    return _to_frames01(video)


def _to_frames01(video: jax.Array) -> jax.Array:
    """VAE output [B, 3, F', H, W] -> float32 frames [B, F', H, W, 3] in [0, 1] (clamp(x / 2 + 0.5), as diffusers)."""
    return jnp.clip(video.astype(jnp.float32) / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 4, 1)


def _decode_tile(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array, origin: tuple[jax.Array, jax.Array],
                 size: tuple[int, int], scaling_factor: float) -> jax.Array:
    """latents [B, F, C, h, w] -> the decoded tile at latent `origin` (traced: one executable per tile
    `size`) [B, F', size * s, 3] channels-last, not yet blended."""
    vae = nnx.merge(graphdef, state)
    z = latents.transpose(0, 2, 1, 3, 4) / scaling_factor
    return vae.decode_tile(z.astype(vae.cfg.dtype), origin, size)


def _stitch_tiles(layout: Any, tiles: dict[tuple[int, int], jax.Array]) -> jax.Array:
    """Decoded tiles (origin -> [B, F', h, w, 3]) -> blended, stitched float32 frames [B, F', H, W, 3] in [0, 1]."""
    from jaxvid.models.vae_cogvideox import AutoencoderKLCogVideoX

    return _to_frames01(AutoencoderKLCogVideoX.stitch_decoded(tiles, layout))


def _denoise(
    graphdef: nnx.GraphDef,
    spec: LoopSpec,
    state: nnx.State,
    carry: Any,
    steps: StepRange,
    prompt_embeds: jax.Array,
    image_latents: jax.Array | None,
    schedule: Any,
    guidance_scales: jax.Array,
    dpm_key: jax.Array,
) -> Any:
    """The denoising loop over `steps` (traced [start, stop); the host drives it, see loop.run_steps).

    carry: latents [B, F, C, h, w] (DDIM), or (latents, previous x_0 float32) (DPM), with the kept
    attention outputs [layers, B or 2B, tokens, D] appended (a tuple) when `spec.step_cache` is set;
    returns the carry after the last step (same shapes and dtypes). prompt_embeds: [2B, L, D] = [negative;
    positive] with CFG, else [B, L, D]. image_latents: [B, F, C, h, w] (I2V) or None. schedule: the
    scheduler state (per-step tables, timesteps [N]). guidance_scales: float32 [N], the scale of
    each step. dpm_key: one key for the batch, or keys [B] (one per video, from a list of seeds).
    """
    plan = spec.attention
    dtype = (carry[0] if isinstance(carry, tuple) else carry).dtype
    if image_latents is not None and spec.do_cfg:
        image_latents = jnp.concatenate([image_latents, image_latents], axis=0)
    ofs = None if spec.ofs is None else jnp.full((1,), spec.ofs, dtype)

    def predict(i: jax.Array, latents: jax.Array, cache: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        kept = {}

        def model_call(model_input: jax.Array) -> jax.Array:
            # Merged inside the loop body so the module lives at the loop's trace level (NNX checks this
            # when a model runs its layers with nnx.scan).
            model = nnx.merge(graphdef, state)
            if image_latents is not None:
                model_input = jnp.concatenate([model_input, image_latents], axis=2)
            timestep = jnp.broadcast_to(schedule.timesteps[i], (model_input.shape[0],))
            if cache is None:
                return with_plan_switch(plan, i, lambda attention: model(
                    model_input, prompt_embeds, timestep, ofs, attention=attention).astype(jnp.float32))
            reuse = spec.step_cache.reuse_at(i, schedule.timesteps[i])
            out, kept["cache"] = with_plan_switch(plan, i, lambda attention: model(
                model_input, prompt_embeds, timestep, ofs, attention=attention, attention_cache=cache,
                reuse_attention=reuse))
            return out.astype(jnp.float32)

        pred = guided_prediction(model_call, latents, do_cfg=spec.do_cfg,
                                 combine=lambda uncond, cond: classifier_free_guidance(uncond, cond, guidance_scales[i]))
        return pred, kept.get("cache")

    cached = spec.step_cache is not None
    if spec.scheduler == "ddim":
        def step(i, carry):
            latents, cache = carry if cached else (carry, None)
            pred, cache = predict(i, latents, cache)
            out = cogvideox_ddim.step(spec.scheduler_config, schedule, pred, latents, i)
            return (out.prev_sample.astype(dtype), cache) if cached else out.prev_sample.astype(dtype)

        return denoise_loop(step, carry, steps)

    def dpm_step(i, carry):
        latents, old_x0, cache = carry if cached else (*carry, None)
        pred, cache = predict(i, latents, cache)
        if dpm_key.ndim == 0:
            noise = dpm_step_noise(dpm_key, i, latents.shape, dtype)
        else:  # one key per video (a list of seeds)
            noise = jax.vmap(lambda key: dpm_step_noise(key, i, latents.shape[1:], dtype))(dpm_key)
        out = cogvideox_dpm.step(spec.scheduler_config, schedule, pred, latents, i,
                                 old_pred_original_sample=old_x0, noise=noise)
        new = (out.prev_sample.astype(dtype), out.pred_original_sample.astype(old_x0.dtype))
        return new + (cache,) if cached else new

    return denoise_loop(dpm_step, carry, steps)


# ============================================================================================
# Pipeline
# ============================================================================================


def _read_json(path: Path) -> dict[str, Any]:
    from jaxvid.models.loading import read_json_file

    if not path.is_file():
        raise ValueError(f"{path}: missing")
    return read_json_file(path)


class CogVideoXPipeline(CogVideoXLoraLoaderMixin):
    """CogVideoX text-to-video, and image-to-video for the I2V checkpoints.

        pipe = CogVideoXPipeline.from_pretrained("THUDM/CogVideoX-2b folder", dtype="bf16")
        out = pipe("A panda playing guitar", num_frames=49, height=480, width=720)  # out.frames uint8 [1, 49, 480, 720, 3]
        jaxvid.video.save(out.frames[0], "out.mp4", fps=out.fps)

    `last_timings` holds the timings of the latest call (seconds): compile, steps, per_step,
    encode, decode, total, and peak_gib (the process's device memory peak so far, in GiB, where
    the backend reports it: pipelines.memory); `last_sources` where the latest call's num_frames / height / width came
    from ("given", "model default (...)", "the input video").

    LoRAs as in diffusers (CogVideoXLoraLoaderMixin): `load_lora_weights(path, adapter_name=...,
    scale=...)`, `set_adapters(names, weights)`, `fuse_lora()` / `unfuse_lora()`, ...; the
    transformer runs with the active adapters merged into a copy of its weights.
    """

    def __init__(
        self,
        *,
        transformer: nnx.Module,
        vae: nnx.Module,
        text_encoder: nnx.Module | OnDemandModel,
        tokenizer_dir: str | os.PathLike,
        scheduler_config: CogVideoXSchedulerConfig,
        scheduler: str = "ddim",
        image_to_video: bool | None = None,
        offload: str | Offload | None = None,
    ):
        if scheduler not in ("ddim", "dpm"):
            raise ValueError(f"scheduler={scheduler!r}; expected 'ddim' or 'dpm'")
        # where weights wait between uses (jaxvid.models.offload; default: the text encoder read on demand)
        self.offload = offload if isinstance(offload, Offload) else Offload(offload)
        self.transformer = Component(transformer, "transformer", self.offload)
        self.vae = Component(vae, "vae", self.offload)
        self.text_encoder = Component(text_encoder, "text_encoder", self.offload)
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
        # the carry (latents, DPM's x_0, a step cache's kept attention outputs) is donated: updated in place
        self._denoise = CompiledFunction(_denoise, static_argnums=(0, 1), donate_argnums=(3,), name="denoising loop")
        self._initial_noise = CompiledFunction(_initial_noise, static_argnums=(1, 2), name="initial noise")
        self._encode_text = CompiledFunction(_encode_text, static_argnums=(0, 3), name="text encoder")
        self._encode_image = CompiledFunction(_encode_image, static_argnums=(0, 4), name="image encoder", stage="vae")
        self._encode_video = CompiledFunction(_encode_video, static_argnums=(0, 4), name="video encoder", stage="vae")
        self.last_sources: dict[str, str] = {}
        self.step_cache: PyramidAttentionBroadcast | None = None  # see enable_pyramid_attention_broadcast
        self._decode = CompiledFunction(_decode, static_argnums=(0, 3, 4), name="VAE decode", stage="vae")
        self._decode_tile = CompiledFunction(_decode_tile, static_argnums=(0, 4, 5), name="VAE decode tile", stage="vae")
        self._stitch_tiles = CompiledFunction(_stitch_tiles, static_argnums=(0,), name="VAE tile stitching")

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: Any = None, scheduler: str | None = None,
                        weights: str | None = None, offload: str | None = None) -> CogVideoXPipeline:
        """Load a diffusers CogVideoX pipeline folder (model_index.json + transformer/, vae/,
        text_encoder/, tokenizer/, scheduler/) or its `jaxvid-convert`ed form.

        dtype: "bf16" / "fp32" / "fp16" or a jnp dtype for every network; None keeps each
        component's stored dtype. scheduler: "ddim" / "dpm" to override the folder's scheduler.
        offload: "none" / "text" (default) / "model" / "blocks" (jaxvid.models.offload); each
        component is parked as soon as it has loaded, so loading never holds two parked ones on the device.
        Except under "none", the T5 encoder's checkpoint is only checked here. Each `encode_prompt`
        reads its weights to the device and drops them after encoding (`Offload.on_demand`).
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
        parking = Offload(offload)
        # first: read on demand (every policy but "none"), T5 is only checked here, so a bad file
        # fails before gigabytes of transformer are read
        text_encoder = open_text_encoder(path / "text_encoder", dtype, ("T5EncoderModel",), parking)
        # weights="fp8": the transformer's attention/MLP linears in e4m3 (jaxvid.models.fp8)
        # parked weights load straight into pinned host memory (host_paths), never through the device
        transformer = load_model(path / "transformer", dtype=dtype, expect=_TRANSFORMERS, weights=weights,
                                 host=parking.host_paths("transformer"))
        parking.park_module("transformer", transformer)  # a no-op unless fp8 quantizing loaded it to the device
        vae = load_model(path / "vae", dtype=dtype, expect=("AutoencoderKLCogVideoX",), host=parking.host_paths("vae"))
        parking.park_module("vae", vae)
        pipe = cls(
            transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer_dir=path / "tokenizer",
            scheduler_config=parse_config(CogVideoXSchedulerConfig, sched_dict, sched_file), scheduler=scheduler,
            image_to_video=image_to_video, offload=parking,
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

    def enable_pyramid_attention_broadcast(self, block_skip_range: int = 2,
                                           timestep_skip_range: tuple[int, int] = (100, 800)) -> None:
        """Step caching (opt-in), as diffusers' apply_pyramid_attention_broadcast with
        spatial_attention_block_skip_range: inside timestep_skip_range, attention is computed every
        `block_skip_range` steps and its output reused in between (see jaxvid.pipelines.step_cache)."""
        self.step_cache = PyramidAttentionBroadcast(block_skip_range=block_skip_range,
                                                    timestep_skip_range=tuple(timestep_skip_range))

    def disable_pyramid_attention_broadcast(self) -> None:
        self.step_cache = None

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
        with enc.resident() as state:
            return jax.block_until_ready(
                self._encode_text(enc.graphdef, state, jnp.asarray(ids), jnp.dtype(self.transformer.module.cfg.dtype)))

    def encode_image(self, image: Any, height: int, width: int, key: jax.Array, batch: int) -> jax.Array:
        """Preprocess and VAE-encode the conditioning image -> scaled latents [B, 1, C, h, w]."""
        vcfg = self.vae.module.cfg
        pixels = jnp.asarray(preprocess_image(image, height, width), vcfg.dtype)
        pixels = jnp.broadcast_to(pixels, (batch,) + pixels.shape[1:])
        # diffusers: image latents * scaling_factor, or / it for VAEs trained that way (invert_scale_latents)
        scale = 1.0 / vcfg.scaling_factor if vcfg.invert_scale_latents else vcfg.scaling_factor
        with self.vae.resident() as state:
            latents = jax.block_until_ready(self._encode_image(self.vae.graphdef, state, pixels, key, float(scale)))
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
        if mesh is not None:  # one program, the latent rows split over the mesh's devices
            vae = self._on_mesh(self.vae, mesh)
            with mesh_context(mesh):
                frames = self._decode(vae.graphdef, vae.state, place_replicated(latents, mesh), self.vae_tiling,
                                      float(vcfg.scaling_factor))
            return finish_frames(frames, output_type, rounding="round")
        b, f, c, h, w = latents.shape
        layout = self.vae.module.decode_layout((b, c, f, h, w), self.vae_tiling)
        with self.vae.resident() as state:
            if layout is None:
                frames = self._decode(self.vae.graphdef, state, latents, self.vae_tiling, float(vcfg.scaling_factor))
            else:
                frames = self._decode_tiled(state, latents, layout)
            return finish_frames(frames, output_type, rounding="round")

    def _decode_tiled(self, state: nnx.State, latents: jax.Array, layout: Any) -> jax.Array:
        """Tiled decode as separate programs: one executable per tile shape (at most four, compiled
        side by side), reused for every tile of that shape, then one stitching program. The same
        numbers as one `vae.decode(tiling=...)` program, whose first compile holds the decoder once
        per tile. `self._decode.last_compile_seconds` gets the compile time of all of them."""
        vae = self.vae
        scale = float(vae.module.cfg.scaling_factor)

        def tile_args(origin: tuple[int, int], size: tuple[int, int]) -> tuple[Any, ...]:
            return (vae.graphdef, state, latents, (np.int32(origin[0]), np.int32(origin[1])), size, scale)

        compile_s = self._decode_tile.prepare_many([tile_args(o, s) for o, s in layout.shapes])
        tiles = {origin: self._decode_tile(*tile_args(origin, size)) for origin, size in layout.shapes}
        frames = self._stitch_tiles(layout, tiles)
        self._decode.last_compile_seconds = compile_s + self._stitch_tiles.last_compile_seconds
        return frames

    # ---- generation ---------------------------------------------------------------------
    def default_geometry(self) -> VideoGeometry:
        """The size this checkpoint generates at when none is asked for (see `default_geometry`)."""
        return default_geometry(self.transformer.module.cfg, self.vae.module.cfg)

    def resolve_geometry(self, num_frames: int | None = None, height: int | None = None, width: int | None = None
                         ) -> tuple[VideoGeometry, dict[str, str]]:
        """The video size with the checkpoint's defaults filled in, and where each value came from
        ({"num_frames": "given" | "transformer sample_frames" | ..., ...}), for summary lines."""
        geo = self.default_geometry()
        sources = default_geometry_sources(self.transformer.module.cfg, self.vae.module.cfg)
        given = {"num_frames": num_frames, "height": height, "width": width}
        values = {k: getattr(geo, k) if v is None else v for k, v in given.items()}
        return VideoGeometry(**values), {k: "given" if v is not None else sources[k] for k, v in given.items()}

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = 6.0,
        use_dynamic_cfg: bool = False,
        num_videos_per_prompt: int = 1,
        seed: int | list[int] = 0,
        image: Any = None,
        video: Any = None,
        strength: float = 0.8,
        attention: AttentionPlan | None = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        output_type: str = "uint8",
        max_sequence_length: int = COGVIDEOX_MAX_LENGTH,
        callback_on_step_end: StepEndCallback | None = None,
        progress: bool = True,
        mesh: Any = None,
    ) -> VideoOutput:
        """Generate a video; returns a VideoOutput: frames uint8 [B, F, H, W, 3] (`.frames[0]` is the
        first video), the final latents [B, F', C, h, w] float32 (padding frames included, as diffusers
        returns them) and the fps (8; 16 for CogVideoX 1.5). B = prompts x num_videos_per_prompt.

        num_frames / height / width: None takes the checkpoint's own (`resolve_geometry`; for
        CogVideoX 1.5, 81 x 768 x 1360). output_type: "uint8", "np" (float32 frames in [0, 1]) or
        "latent" (no decoding, frames None). `latents` replaces the initial noise ([B, F', C, h, w],
        F' padded to a multiple of patch_size_t for CogVideoX 1.5). `image` (I2V models only,
        required there): a PIL image or an array [H, W, 3]. `video` (T2V models: video-to-video, as
        diffusers' CogVideoXVideoToVideoPipeline): frames uint8 [F, H, W, 3] or a list of PIL images,
        re-noised to `strength` (in (0, 1]: the last int(steps * strength) steps run); num_frames is
        its length. `prompt_embeds` / `negative_prompt_embeds`: T5 embeddings [B, L, D] instead of
        prompts. `seed`: an int for the batch, or a list of ints, one per video (video b is then
        the one a single call with seed[b] makes). `attention`: None (dense) or an AttentionPlan
        (its dense_timesteps switch inside the jitted loop). `callback_on_step_end(pipe, step,
        timestep, {"latents": latents})` runs after every step as diffusers' does and may return
        {"latents": new_latents}; the loop then runs one jitted step at a time. `mesh`: a jax Mesh
        (jaxvid.parallel.make_mesh) to run the DiT on several devices (CFG halves over `cfg`, Ulysses
        over `seq`) and split the VAE decode; None = one device.
        """
        check_output_type(output_type)
        geometry, sources = self.resolve_geometry(_video_frames(video) if video is not None and num_frames is None
                                                  else num_frames, height, width)
        if video is not None and num_frames is None:
            sources["num_frames"] = "the input video"
        sampling = Sampling(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                            max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt)
        self.last_sources = sources
        return self.generate(prompt, negative_prompt, geometry, sampling, use_dynamic_cfg=use_dynamic_cfg,
                             image=image, video=video, strength=strength, attention=attention, latents=latents,
                             prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                             output_type=output_type, callback_on_step_end=callback_on_step_end, progress=progress,
                             mesh=mesh)

    def _text_embeddings(self, prompt: Any, negative_prompt: Any, prompt_embeds: Any, negative_prompt_embeds: Any,
                         sampling: Sampling) -> tuple[jax.Array, int]:
        """([negative; positive] or positive embeddings, each repeated num_videos_per_prompt times, as
        diffusers' encode_prompt; prompts in the batch). Checks the inputs and names the bad one."""
        dtype = jnp.dtype(self.transformer.module.cfg.dtype)
        n = sampling.num_videos_per_prompt
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("prompt and prompt_embeds were both given; pass one of them")
            positive = _check_embeds("prompt_embeds", prompt_embeds, self.transformer.module.cfg, dtype)
            batch = positive.shape[0]
        else:
            if prompt is None:
                raise ValueError("prompt=None; pass a prompt (a string or a list of strings) or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or not all(isinstance(q, str) for q in prompts):
                raise ValueError(f"prompt={prompt!r}; expected a string or a non-empty list of strings")
            batch, positive = len(prompts), None
        negative = None
        if sampling.do_cfg:
            if negative_prompt_embeds is not None:
                if negative_prompt not in (None, ""):
                    raise ValueError("negative_prompt and negative_prompt_embeds were both given; pass one of them")
                negative = _check_embeds("negative_prompt_embeds", negative_prompt_embeds, self.transformer.module.cfg,
                                         dtype)
                if positive is not None and negative.shape != positive.shape:
                    raise ValueError(f"negative_prompt_embeds shape {tuple(negative.shape)}; expected "
                                     f"{tuple(positive.shape)} like prompt_embeds")
            else:
                negatives = [negative_prompt or ""] * batch if isinstance(negative_prompt, str) or negative_prompt is None \
                    else list(negative_prompt)
                if len(negatives) != batch or not all(isinstance(q, str) for q in negatives):
                    raise ValueError(f"negative_prompt={negative_prompt!r}; expected a string or {batch} strings "
                                     "like prompt")
        if positive is None or (sampling.do_cfg and negative is None):
            texts = (negatives if sampling.do_cfg and negative is None else []) + (prompts if positive is None else [])
            encoded = self.encode_prompt(texts, sampling.max_sequence_length)
            if sampling.do_cfg and negative is None:
                negative, encoded = encoded[:batch], encoded[batch:]
            if positive is None:
                positive = encoded
        if sampling.do_cfg and negative.shape[1] != positive.shape[1]:
            raise ValueError(f"negative_prompt_embeds has {negative.shape[1]} tokens, prompt_embeds {positive.shape[1]}; "
                             "expected the same (max_sequence_length)")
        parts = [negative, positive] if sampling.do_cfg else [positive]
        return jnp.concatenate([jnp.repeat(x, n, axis=0) for x in parts], axis=0), batch

    def generate(self, prompt: str | list[str] | None, negative_prompt: str | list[str] | None,
                 geometry: VideoGeometry, sampling: Sampling, *, use_dynamic_cfg: bool = False, image: Any = None,
                 video: Any = None, strength: float = 0.8, attention: AttentionPlan | None = None,
                 latents: Any = None, prompt_embeds: Any = None, negative_prompt_embeds: Any = None,
                 output_type: str = "uint8", callback_on_step_end: StepEndCallback | None = None,
                 progress: bool = True, mesh: Any = None) -> VideoOutput:
        """`__call__` with the video size and the sampling settings passed whole."""
        t_start = time.perf_counter()
        check_output_type(output_type)
        if self.image_to_video and image is None:
            raise ValueError("image=None; this is an image-to-video model: pass the first frame (image=...)")
        if not self.image_to_video and image is not None:
            raise ValueError("image was given, but this is a text-to-video model (no image conditioning)")
        if video is not None and self.image_to_video:
            raise ValueError("video was given, but video-to-video needs a text-to-video model; this one is I2V")
        if attention is not None and not isinstance(attention, AttentionPlan):
            raise ValueError(f"attention={attention!r}; expected None (dense) or an AttentionPlan")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"callback_on_step_end={callback_on_step_end!r}; expected a callable "
                             "(pipe, step, timestep, {'latents': ...}) -> dict or None")
        num_inference_steps = sampling.num_inference_steps
        tcfg = self.transformer.module.cfg
        dtype = jnp.dtype(tcfg.dtype)
        timings: dict[str, float] = {"compile": 0.0}

        # 1. Text embeddings: [negative; positive] with CFG (diffusers: guidance_scale > 1)
        t0 = time.perf_counter()
        embeds, prompts_batch = self._text_embeddings(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                                      sampling)
        timings["compile"] += self._encode_text.last_compile_seconds
        batch = prompts_batch * sampling.num_videos_per_prompt
        shape, additional_frames = self.latent_shape(batch, geometry.num_frames, geometry.height, geometry.width)
        seeds = _seeds(sampling.seed, batch)

        # 2. Schedule (video-to-video: the last int(N * strength) steps) and guidance
        module = cogvideox_ddim if self.scheduler == "ddim" else cogvideox_dpm
        schedule = module.set_timesteps(self.scheduler_config, num_inference_steps)
        if video is not None:
            schedule = truncate_schedule(schedule, video_start_step(num_inference_steps, strength))
        num_steps = int(schedule.timesteps.shape[0])
        scales = cogvideox_guidance_scales(sampling.guidance_scale, np.asarray(schedule.timesteps),
                                           use_dynamic_cfg=use_dynamic_cfg)

        # 3. Image latents (I2V), initial latents (noise, or the re-noised input video)
        image_latents = None
        if self.image_to_video:
            first = jnp.concatenate([self.encode_image(image, geometry.height, geometry.width, generation_keys(s).image,
                                                       n) for s, n in seeds], axis=0)
            timings["compile"] += self._encode_image.last_compile_seconds
            image_latents = self.image_latents_for(first, shape)
        if latents is not None:
            noise = jnp.asarray(latents)
            if tuple(noise.shape) != shape:
                raise ValueError(f"latents shape {tuple(noise.shape)}; expected {shape} for this request")
            noise = noise.astype(dtype) * jnp.asarray(INIT_NOISE_SIGMA, dtype)
        else:
            noise = jnp.concatenate([self._initial_noise(generation_keys(s).latents, (n,) + shape[1:], dtype)
                                     for s, n in seeds], axis=0)
            timings["compile"] += self._initial_noise.last_compile_seconds
            if video is not None:
                if additional_frames:
                    raise ValueError(f"video has {geometry.num_frames} frames: {shape[1] - additional_frames} latent "
                                     f"frames, not a multiple of patch_size_t={tcfg.patch_size_t} (diffusers' "
                                     "video-to-video does not pad them)")
                clean = jnp.concatenate([self.encode_video(video, geometry.height, geometry.width,
                                                           generation_keys(s).image, n) for s, n in seeds], axis=0)
                start = jnp.broadcast_to(schedule.timesteps[0], (batch,))
                # noise was drawn times init_noise_sigma (1.0): the same draw diffusers adds to the clean latents
                noise = cogvideox_ddim.add_noise(schedule.alphas_cumprod, clean, noise, start).astype(dtype)
        jax.block_until_ready((embeds, image_latents, noise))
        timings["encode"] = time.perf_counter() - t0 - timings["compile"]

        # 4. The jitted denoising loop (one executable; one step per call when a callback edits latents)
        spec = LoopSpec(scheduler=self.scheduler, scheduler_config=self.scheduler_config, do_cfg=sampling.do_cfg,
                        attention=attention, ofs=I2V_OFS if tcfg.ofs_embed_dim else None,
                        step_cache=self.step_cache)
        dpm_keys = (generation_keys(seeds[0][0]).dpm if len(seeds) == 1 and seeds[0][1] == batch
                    else jnp.stack([generation_keys(s).dpm for s, n in seeds for _ in range(n)]))
        carry = noise if self.scheduler == "ddim" else (noise, jnp.zeros(noise.shape, jnp.float32))
        if self.step_cache is not None:  # every layer's attention output, [text; video] tokens
            pt, p = tcfg.patch_size_t or 1, tcfg.patch_size
            tokens = embeds.shape[1] + shape[1] // pt * (shape[3] // p) * (shape[4] // p)
            cache = jnp.zeros((tcfg.num_layers, embeds.shape[0], tokens, tcfg.inner_dim), dtype)
            carry = (carry, cache) if self.scheduler == "ddim" else carry + (cache,)
        self.progress.enabled = progress
        tr = self._on_mesh(self.transformer, mesh)  # with a mesh: weights replicated over it (offload aside)
        # one loop program for every step count in a bucket (the padding is never read)
        schedule, scales = pad_step_tables((schedule, jnp.asarray(scales, jnp.float32)), num_steps)
        carry, embeds, image_latents, schedule, scales, dpm_keys = place_replicated(
            (carry, embeds, image_latents, schedule, scales, dpm_keys), mesh)

        with tr.resident() as tr_state, mesh_context(mesh):
            # LoRA adapters run on a merged copy of the weights (a device copy, whatever the offload)
            run_state = tr_state if self._lora_adapters is None else place_replicated(self.lora_transformer_state(),
                                                                                        mesh)

            def run_range(steps: StepRange, carry: Any) -> Any:
                return self._denoise(tr.graphdef, spec, run_state, carry, steps, embeds, image_latents, schedule,
                                     scales, dpm_keys)

            # compile before the bar starts
            timings["compile"] += self._denoise.prepare(tr.graphdef, spec, run_state, carry, StepRange.of(0, 1),
                                                        embeds, image_latents, schedule, scales, dpm_keys)
            self.progress.start(num_steps)
            t0 = time.perf_counter()
            try:
                if callback_on_step_end is None:
                    carry = run_steps(run_range, carry, num_steps, self.progress)
                else:  # one step per call: the callback may replace the latents between steps
                    for i in range(num_steps):
                        carry = run_range(StepRange.of(i, i + 1), carry)
                        self.progress.tick(i)
                        carry = _owned(_apply_callback(callback_on_step_end, self, i, int(schedule.timesteps[i]),
                                                       carry))
                    carry = jax.block_until_ready(carry)
            finally:
                self.progress.close()
        out = carry[0] if isinstance(carry, tuple) else carry
        # what only the loop needed goes before the decode's activations arrive: a step cache's kept
        # attention outputs (GBs at full size), DPM's x_0, the prompt embeddings, the image latents
        # (dropping the pipeline's references: arrays a caller passed in and still holds stay valid)
        carry = embeds = image_latents = None
        timings["steps"] = time.perf_counter() - t0
        timings["per_step"] = timings["steps"] / max(num_steps, 1)

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
        peak = peak_memory_gib()
        if peak is not None:  # the process's device memory peak so far (XLA's statistics; none on a CPU)
            timings["peak_gib"] = peak
        self.last_timings = timings
        log.info(
            "generated %s %s in %.2f s: compile %.2f s, %d steps at %.3f s/step, encode %.2f s, decode %.2f s",
            "latents" if frames is None else "frames", tuple((result.latents if frames is None else frames).shape),
            timings["total"], timings["compile"], num_steps, timings["per_step"], timings["encode"],
            timings.get("decode", 0.0),
        )
        return result

    def encode_video(self, video: Any, height: int, width: int, key: jax.Array, batch: int) -> jax.Array:
        """Preprocess and VAE-encode an input video (video-to-video) -> scaled latents [B, F', C, h, w],
        one posterior sample per row, as diffusers' CogVideoXVideoToVideoPipeline.prepare_latents."""
        vcfg = self.vae.module.cfg
        pixels = jnp.asarray(preprocess_video(video, height, width), vcfg.dtype)  # [1, 3, F, H, W]
        pixels = jnp.broadcast_to(pixels, (batch,) + pixels.shape[1:])
        with self.vae.resident() as state:  # parked under "model" / "blocks": on the device while it encodes
            latents = jax.block_until_ready(self._encode_video(self.vae.graphdef, state, pixels, key,
                                                               float(vcfg.scaling_factor)))
        return latents.astype(self.transformer.module.cfg.dtype)


# ============================================================================================
# Helpers of a call: seeds, embeddings, video-to-video, callbacks, where defaults came from
# ============================================================================================

# callback_on_step_end(pipe, step, timestep, {"latents": latents}) -> {"latents": new} | {} | None
StepEndCallback = Callable[[Any, int, int, dict[str, Any]], "dict[str, Any] | None"]


def _seeds(seed: Any, batch: int) -> list[tuple[Any, int]]:
    """(seed, videos) groups: one int for the whole batch, or one seed per video."""
    if isinstance(seed, tuple):
        if len(seed) != batch:
            raise ValueError(f"seed: {len(seed)} seeds for {batch} videos (prompts x num_videos_per_prompt); "
                             "expected one per video or a single int")
        return [(s, 1) for s in seed]
    return [(seed, batch)]


def _check_embeds(name: str, value: Any, tcfg: Any, dtype: Any) -> jax.Array:
    x = jnp.asarray(value)
    if x.ndim != 3 or x.shape[0] < 1 or x.shape[2] != tcfg.text_embed_dim:
        raise ValueError(f"{name} shape {tuple(x.shape)}; expected [batch, tokens, {tcfg.text_embed_dim}] "
                         "(T5 embeddings, the transformer's text_embed_dim)")
    return x.astype(dtype)


def _apply_callback(callback: StepEndCallback, pipe: Any, step: int, timestep: int, carry: Any) -> Any:
    latents = carry if not isinstance(carry, tuple) else carry[0]
    out = callback(pipe, step, timestep, {"latents": latents})
    if out is None or "latents" not in out:
        return carry
    new = jnp.asarray(out["latents"])
    if new.shape != latents.shape:
        raise ValueError(f"callback_on_step_end returned latents of shape {tuple(new.shape)} at step {step}; "
                         f"expected {tuple(latents.shape)}")
    new = new.astype(latents.dtype)
    return new if not isinstance(carry, tuple) else (new,) + carry[1:]


def _owned(carry: Any) -> Any:
    """The carry with its latents copied: the next (donating) step consumes the copy, never the
    array a step-end callback was shown or returned (the caller may keep it)."""
    if isinstance(carry, tuple):
        return (jnp.copy(carry[0]),) + carry[1:]
    return jnp.copy(carry)


def _video_frames(video: Any) -> int:
    return len(video) if isinstance(video, (list, tuple)) else int(np.shape(video)[0])


def preprocess_video(video: Any, height: int, width: int) -> np.ndarray:
    """Frames (uint8 / float-in-[0, 1] array [F, H, W, 3], or a list of PIL images / arrays) ->
    float32 [1, 3, F, height, width] in [-1, 1], each frame as `preprocess_image` (diffusers'
    VideoProcessor.preprocess_video: per-frame resize with Lanczos, / 255, * 2 - 1)."""
    frames = list(video) if isinstance(video, (list, tuple)) else [np.asarray(video)[i] for i in range(len(video))] \
        if np.ndim(video) == 4 else None
    if not frames:
        raise ValueError(f"video: expected frames [F, H, W, 3] or a non-empty list of images, got "
                         f"{type(video).__name__} of shape {np.shape(video) if frames is None else '(0,)'}")
    try:
        pixels = [preprocess_image(f, height, width)[0] for f in frames]
    except ValueError as e:
        raise ValueError(f"video: {e}".replace("image: ", "")) from None
    return np.stack(pixels, axis=1)[None]


def video_start_step(num_inference_steps: int, strength: float) -> int:
    """The first step video-to-video runs (diffusers' get_timesteps): N - int(N * strength)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength!r}; expected a number in (0, 1]")
    run = min(int(num_inference_steps * strength), num_inference_steps)
    if run < 1:
        raise ValueError(f"strength={strength} with {num_inference_steps} steps runs no step "
                         f"(int({num_inference_steps} * {strength}) = 0); raise strength or the step count")
    return num_inference_steps - run


def truncate_schedule(schedule: Any, start: int) -> Any:
    """The scheduler state from step `start` on (every per-step table sliced; the training table
    kept). DPM's first remaining step is first order, as diffusers' loop has no previous x_0 there."""
    if start == 0:
        return schedule
    fields = {k: (v if k == "alphas_cumprod" else v[start:]) for k, v in schedule._asdict().items()}
    if "second_order" in fields:
        fields["second_order"] = fields["second_order"].at[0].set(False)
    return type(schedule)(**fields)


def default_geometry_sources(tcfg: Any, vcfg: Any) -> dict[str, str]:
    """Where `default_geometry` takes each value from, in words (for summary lines)."""
    s = vcfg.spatial_compression
    out = {"num_frames": f"model default (transformer sample_frames={tcfg.sample_frames})"}
    for name, sample, cap in (("height", tcfg.sample_height, MODEL_1_5_SIZE[0]),
                              ("width", tcfg.sample_width, MODEL_1_5_SIZE[1])):
        if tcfg.patch_size_t is not None and sample * s > cap:
            out[name] = f"model default (CogVideoX 1.5 model card; sample_{name} x {s} = {sample * s} is the RoPE maximum)"
        else:
            out[name] = f"model default (transformer sample_{name}={sample} x VAE {s})"
    return out


SCENE_RULES = ("causal", "isolated")


def scene_for_frames(boundaries: Any, num_frames: int, tcfg: Any, vcfg: Any, rule: str = "causal") -> Any:
    """A radial plan's `Scene` from scene edges in pixel frames (e.g. (0, 17, 49) for 49 frames).

    The attention layer's scene mask works on token frames: pixel frame f is latent frame
    ceil(f / temporal_compression) (frame 0 alone in latent 0), CogVideoX 1.5's padding latents go
    to the first scene and patch_size_t latents make one token frame. rule: "causal" (a scene sees
    itself and the scenes before it) or "isolated" (itself only). ValueError naming
    scene_boundaries when the edges are not 0 < ... < num_frames or two fall in one token frame.
    """
    from jaxvid.attention.plan import Scene

    bounds = [int(b) for b in boundaries]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != num_frames or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"scene_boundaries={tuple(bounds)}; expected strictly increasing pixel-frame edges from 0 to "
                         f"num_frames={num_frames}, e.g. (0, {num_frames // 2}, {num_frames})")
    if rule not in SCENE_RULES:
        raise ValueError(f"scene rule {rule!r}; expected one of {SCENE_RULES}")
    tc = vcfg.temporal_compression_ratio
    latent = (num_frames - 1) // tc + 1
    pt = tcfg.patch_size_t or 1
    pad = (-latent) % pt
    tokens = [0] + [-(-(pad + -(-b // tc)) // pt) for b in bounds[1:]]
    if any(b <= a for a, b in zip(tokens, tokens[1:])):
        raise ValueError(f"scene_boundaries={tuple(bounds)}: two edges fall in one token frame ({tokens}); scenes "
                         f"need at least {tc * pt} frames each")
    n = len(tokens) - 1
    adjacency = tuple(tuple(j == i or (rule == "causal" and j < i) for j in range(n)) for i in range(n))
    return Scene(boundaries=tuple(tokens), adjacency=adjacency)
