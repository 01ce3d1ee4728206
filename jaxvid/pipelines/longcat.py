"""LongCat-Video generation: text-to-video, image-to-video, video continuation, long video, 720p refinement.

Follows upstream's `LongCatVideoPipeline` (meituan-longcat/LongCat-Video,
`longcat_video/pipeline_longcat_video.py`) and its `run_demo_*.py` scripts:

    prompt --umT5--> embeds [B, 1, 512, 4096] (negative first under CFG: batch [uncond; cond])
    noise [B, 16, 1 + (F-1)/4, H/8, W/8] (+ clean conditioning latents in the first frames)
      --[ DiT, CFG-Zero* guidance, -v, Euler step ] x N  (one jax.jit: lax.fori_loop over a traced
         step range, driven from the host by loop.run_steps so the persistent compile cache keeps it)-->
    latents --denormalize, Wan VAE decode--> frames [B, F, H, W, 3] in [0, 1]

Modes (upstream method -> here):
- `generate_t2v`: 480x832, 93 frames, 50 steps, guidance 4.0. Distilled: `enable_loras(["cfg_step_lora"])`,
  16 steps, `use_distill=True` (the distilled sigma schedule), guidance 1.0 (no CFG pass).
- `generate_i2v`: the image's latent is the first (clean, timestep 0) latent frame; size from the
  aspect-ratio bucket of the image.
- `generate_vc`: the last `num_cond_frames` frames of a video become clean conditioning latents; with
  `use_kv_cache` their keys/values are computed once (timestep 0, no cross-attention) and every step
  denoises only the new frames. `enhance_hf` swaps the schedule's tail for 10 uniform steps.
- `generate_long`: t2v, then repeated continuation from the last frames of the previous segment;
  with a list of prompts, one per segment (upstream's run_demo_interactive_video).
- BSA in every mode: `enable_bsa()` (the config's bsa_params, as upstream's switch) or
  `enable_bsa_by_resolution()` (parameters by video size, jaxvid.attention.presets); chunks that
  do not tile the token grid are an error before compiling, as upstream asserts.
- `generate_refine`: the 480p video is resized to its 720p bucket (bilinear), doubled in time
  (linear) unless `spatial_refine_only`, VAE-encoded, noised to t = 0.5 and denoised from there
  with the refinement LoRA; upstream runs it with block sparse attention (`enable_bsa()`).

Differences from upstream, on purpose:
- Random numbers come from `jax.random` keys derived from `seed` (never torch's generator), see `_Keys`.
- Unsupported frame counts raise ValueError (upstream rounds down with a warning); so do
  conditioning frame counts the VAE cannot encode whole (upstream's VAE silently drops frames),
  except in refinement, where upstream's padded length relies on that drop and it is kept.
- i2v / continuation / refinement take an explicit `height` / `width` besides the buckets.
- `num_videos_per_prompt > 1` also repeats the text mask (upstream leaves it at batch B).
- Latents are carried in float32 through every loop (upstream keeps continuation latents in the
  DiT dtype when the KV cache is off); identical in float32.
- Under CFG with a batch > 1 the KV cache is repeated for both halves (upstream asserts batch 1).

Kept from upstream on purpose: without the KV cache, the CFG-Zero* scale is taken over every frame,
the clean ones included, so `use_kv_cache=False` is close to, not equal to, the cached run.
LoRAs run at run time (`model(..., lora=...)`, the base weights untouched), as upstream's do.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvid.attention.plan import BSA, AttentionPlan
from jaxvid.attention.presets import BSAChoice, resolve_bsa
from jaxvid.models.loading import OnDemandModel
from jaxvid.models.offload import Offload
from jaxvid.parallel import mesh_context, on_mesh, place_module, place_replicated, shard_spatial
from jaxvid.pipelines.longcat_buckets import bucket_size
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
from jaxvid.pipelines.settings import Sampling, check_positive_int
from jaxvid.schedulers import flow_match, guidance
from jaxvid.video import to_uint8_frames

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "LongCatPipeline",
    "bucket_size",
    "frames_to_uint8",
    "is_longcat_folder",
    "refine_layout",
]

COMPONENTS = ("dit", "text_encoder", "vae", "tokenizer", "scheduler")
LORA_DIR = "lora"
CFG_STEP_LORA = "cfg_step_lora"
REFINEMENT_LORA = "refinement_lora"
# upstream's negative prompt in every run_demo_*.py
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)
MAX_SEQUENCE_LENGTH = 512
# generate_refine pads conditioning and noisy latents to multiples of this many frames (BSA's chunk in time).
BSA_LATENT_GRANULARITY = 4
REFINE_T_THRESH = 0.5
# The DiT patch (1, 2, 2) on top of the VAE's 8x: pixel sizes must be multiples of 16 (upstream
# check_inputs); refinement asks 4x more (its buckets are the "F64" tables).
PATCH_SPATIAL = 2
REFINE_SPATIAL_EXTRA = 4
# upstream's demos write 15 fps videos; refinement doubles the frames (30 fps)
FPS, REFINE_FPS = 15, 30

# ---------------------------------------------------------------------------------------------
# Frames in and out
# ---------------------------------------------------------------------------------------------


def _as_frames(x: Any, what: str) -> np.ndarray:
    """uint8 [F, H, W, 3] from an array / list of [H, W, 3] uint8 frames or PIL images."""
    if isinstance(x, (list, tuple)):
        x = np.stack([np.asarray(f) for f in x]) if len(x) else np.zeros((0,), np.uint8)
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] < 1:
        raise ValueError(f"{what} has shape {x.shape}: expected uint8 frames [F, H, W, 3] with F >= 1")
    if x.dtype != np.uint8:
        raise ValueError(f"{what} has dtype {x.dtype}: expected uint8 frames (0..255)")
    return x


def _as_image(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"image has shape {x.shape}, dtype {x.dtype}: expected uint8 [H, W, 3]")
    return x


def preprocess_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """diffusers' VideoProcessor.preprocess_video on PIL frames: uint8 [F, H, W, 3] -> float32 [3, F, h, w] in [-1, 1].

    Each frame is resized with PIL's Lanczos filter (VaeImageProcessor's default), divided by 255,
    then mapped to [-1, 1].
    """
    from PIL import Image

    out = []
    for f in frames:
        img = Image.fromarray(f)
        if img.size != (width, height):
            img = img.resize((width, height), resample=Image.Resampling.LANCZOS)
        out.append(np.asarray(img).astype(np.float32) / 255.0)
    x = np.stack(out) * 2.0 - 1.0
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2))


def resize_linear_align_corners(x: jax.Array, axis: int, size: int) -> jax.Array:
    """torch's linear interpolation along one axis with align_corners=True (bilinear / trilinear are separable)."""
    n = x.shape[axis]
    if n == size:
        return x
    scale = np.float32((n - 1) / (size - 1)) if size > 1 else np.float32(0.0)
    pos = np.arange(size, dtype=np.float32) * scale
    i0 = np.minimum(np.floor(pos).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w1 = (pos - i0).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = size
    w1 = jnp.asarray(w1).reshape(shape).astype(x.dtype)
    return jnp.take(x, i0, axis=axis) * (1 - w1) + jnp.take(x, i1, axis=axis) * w1


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Frames in [0, 1] -> uint8 as upstream's demos do it: `(x * 255).astype(np.uint8)` (truncating)."""
    return to_uint8_frames(frames, value_range=(0.0, 1.0), rounding="truncate")


def resize_frames(frames: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """PIL bicubic resize of uint8 frames [F, H, W, 3] to (height, width), as the demos put outputs back
    at the input's size."""
    from PIL import Image

    if frames.shape[1:3] == tuple(size_hw):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize(size_hw[::-1], Image.Resampling.BICUBIC)) for f in frames])


class RefineLayout(NamedTuple):
    """How generate_refine pads the upsampled video (upstream's 'do padding' block).

    num_cond_latents: clean latent frames (a multiple of 4, or 0); cond_frames_added: copies of the
    first conditioning frame put in front; noise_frames_added: copies of the last frame appended;
    num_cond_frames: conditioning frames after padding (1 + 4 * (num_cond_latents - 1), or 0).
    """

    num_cond_latents: int
    num_cond_frames: int
    cond_frames_added: int
    noise_frames_added: int


def refine_layout(num_frames: int, num_cond_frames: int, temporal: int = 4,
                  granularity: int = BSA_LATENT_GRANULARITY) -> RefineLayout:
    """Latent padding of generate_refine for `num_frames` upsampled frames of which `num_cond_frames` condition."""
    if not 0 <= num_cond_frames < num_frames:
        raise ValueError(f"num_cond_frames={num_cond_frames}: expected 0 <= num_cond_frames < {num_frames} "
                         "(the refined frame count)")
    num_noise_frames = num_frames - num_cond_frames
    ncl = added = 0
    if num_cond_frames > 0:
        ncl = 1 + math.ceil((num_cond_frames - 1) / temporal)
        ncl = math.ceil(ncl / granularity) * granularity
        added = 1 + (ncl - 1) * temporal - num_cond_frames
        num_cond_frames += added
    nnl = math.ceil(num_noise_frames / temporal)
    nnl = math.ceil(nnl / granularity) * granularity
    return RefineLayout(ncl, num_cond_frames, added, nnl * temporal - num_noise_frames)


class _Keys(NamedTuple):
    """The random streams of one generate call, all from `seed`."""

    noise: jax.Array  # initial latent noise
    cond: jax.Array  # posterior sample of the conditioning frames' VAE encoding
    upsampled: jax.Array  # refinement: posterior sample of the upsampled video's encoding
    refine_noise: jax.Array  # refinement: the noise mixed in at t_thresh

    @classmethod
    def from_seed(cls, seed: int | jax.Array) -> "_Keys":
        key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
        return cls(*jax.random.split(key, 4))


# ---------------------------------------------------------------------------------------------
# Jitted pieces: weights are arguments, the module structure is static
# ---------------------------------------------------------------------------------------------


def _encode_text(graphdef, state, input_ids, attention_mask):
    """ids, mask int32 [B, L] -> umT5 last hidden state [B, L, D]."""
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


def _vae_encode(graphdef, state, frames, key):
    """frames [B, 3, F, H, W] in [-1, 1] -> VAE latents [B, z, F', h, w] (posterior sample; not normalised)."""
    return nnx.merge(graphdef, state).encode(frames, key=key)


def _vae_decode(graphdef, state, latents):
    """DiT latents [B, z, T, h, w] -> frames float32 [B, F, H, W, 3] in [0, 1] (upstream's postprocess 'np')."""
    vae = nnx.merge(graphdef, state)
    z = vae.denormalize_latents(latents.astype(vae.cfg.dtype))
    z = shard_spatial(z, axis=3)  # under a device mesh: latent rows split over the devices (XLA exchanges halos)
    video = vae.decode(z)
    video = jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.transpose(video, (0, 2, 3, 4, 1))


def _fresh_model(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.Module:
    """The module with Variables created at the current trace level.

    NNX refuses Variables made outside the fori_loop's trace inside the model's nnx.scan; rebuilding
    the state's leaves here (a no-op on the arrays) gives the loop body its own.
    """
    return nnx.merge(graphdef, jax.tree.map(lambda a: a, state))


@dataclasses.dataclass(frozen=True, slots=True)
class _LoopSpec:
    """Static shape of a denoising run: conditioning frames, KV cache, CFG, the DiT's compute dtype,
    the attention plan (its dense timesteps switch inside the loop) and the scheduler config."""

    num_cond_latents: int
    use_kv_cache: bool
    do_cfg: bool
    dtype: Any
    attention: AttentionPlan
    scheduler: flow_match.FlowMatchConfig


def _cache_clean_latents(graphdef, spec: _LoopSpec, state, lora, latents):
    """Upstream's `_cache_clean_latents`: one pass over the clean frames latents[:, :, :nc] at
    timestep 0, no text (the plan's sparse attention, as upstream caches with the model's current
    attention) -> the KV cache {layer: (k, v)}, repeated for both CFG halves."""
    dtype, nc = spec.dtype, spec.num_cond_latents
    cond = latents[:, :, :nc]
    zero_t = jnp.zeros(cond.shape[:1] + cond.shape[2:3], dtype)
    _, kv_cache = _fresh_model(graphdef, state)(cond.astype(dtype), zero_t, None, None, return_kv=True,
                                                skip_crs_attn=True, lora=lora, attention=spec.attention)
    if spec.do_cfg and cond.shape[0] > 1:  # uncond and cond halves share the clean frames
        kv_cache = jax.tree.map(lambda a: jnp.concatenate([a, a]), kv_cache)
    return kv_cache


def _denoise(graphdef, spec: _LoopSpec, state, lora, x, steps: StepRange, kv_cache, embeds, mask,
             schedule: flow_match.FlowMatchState, guidance_scale):
    """Upstream's denoising loop over `steps` (traced [start, stop); the host drives it, see
    loop.run_steps). x float32 [B, C, T, h, w]: every latent frame (the first num_cond_latents clean),
    or with the KV cache (from `_cache_clean_latents`) only the frames after them; embeds
    [B or 2B, 1, L, D], mask [B or 2B, L] -> x after the steps, same shape."""
    dtype, nc, scheduler = spec.dtype, spec.num_cond_latents, spec.scheduler

    def step(i, x):
        def model_call(model_in):
            timestep = jnp.full(model_in.shape[:1] + model_in.shape[2:3], schedule.timesteps[i], jnp.float32)
            timestep = timestep.astype(dtype)
            if nc and not spec.use_kv_cache:
                timestep = timestep.at[:, :nc].set(0)
            model = _fresh_model(graphdef, state)
            return with_plan_switch(spec.attention, i, lambda attention: model(
                model_in.astype(dtype), timestep, embeds, mask, num_cond_latents=nc, kv_cache_dict=kv_cache,
                lora=lora, attention=attention))

        pred = guided_prediction(model_call, x, do_cfg=spec.do_cfg,
                                 combine=lambda uncond, cond: guidance.longcat_guidance(uncond, cond, guidance_scale))
        velocity = -pred  # upstream: "negate for scheduler compatibility"
        if nc and not spec.use_kv_cache:  # the clean frames keep their latents
            return x.at[:, :, nc:].set(flow_match.step(scheduler, schedule, velocity[:, :, nc:], x[:, :, nc:], i))
        return flow_match.step(scheduler, schedule, velocity, x, i)

    return denoise_loop(step, x, steps)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def is_longcat_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a LongCat-Video checkpoint folder (upstream's or converted): dit/ holds a LongCat DiT."""
    from jaxvid.models.loading import class_name_of, read_config

    dit = Path(path) / "dit"
    if not (dit / "config.json").is_file():
        return False
    config = read_config(dit)  # a malformed config.json is an error naming it, not "not LongCat"
    try:
        return class_name_of(config) == "LongCatVideoTransformer3DModel"
    except ValueError:
        from convert.checkpoint import CheckpointReader, is_checkpoint

        return is_checkpoint(dit) and CheckpointReader(dit).class_name == "LongCatVideoTransformer3DModel"


def _check_prompt(prompt: Any, what: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{what}={prompt!r}: expected a string or a non-empty list of strings")


_positive_int = check_positive_int


def _bsa_dict(bsa: BSA) -> dict[str, Any]:
    """A BSA spec as upstream's bsa_params dict (lists for the chunk shapes)."""
    return {"sparsity": bsa.sparsity, "cdf_threshold": bsa.cdf_threshold,
            "chunk_3d_shape_q": list(bsa.chunk_3d_shape_q), "chunk_3d_shape_k": list(bsa.chunk_3d_shape_k)}


def _describe_bsa(bsa: BSA) -> str:
    q, k = ("x".join(map(str, c)) for c in (bsa.chunk_3d_shape_q, bsa.chunk_3d_shape_k))
    cdf = "" if bsa.cdf_threshold is None else f" cdf_threshold {bsa.cdf_threshold}"
    return f"sparsity {bsa.sparsity}{cdf}, chunks q {q} / k {k}"


def _check_bsa_fits(plan: AttentionPlan, latents_shape: Sequence[int], num_cond_latents: int, use_kv_cache: bool,
                    patch: Sequence[int], vae_spatial: int) -> None:
    """Fail before compiling when BSA's 3D chunks do not tile the token grid of a run.

    Upstream's flash_attn_bsa_3d (and FastVideo's copy of it) asserts that every chunk dimension
    divides the (T, H/patch, W/patch) grid of the queries and of the keys, padding nothing; jaxvid
    keeps that rule and says which sizes fit. Grids are checked as the DiT calls attention: with the
    KV cache the clean frames alone (one cache pass), then the noisy frames against all frames;
    without it the clean frames' own attention, then the noisy frames against all.
    """
    from jaxvid.models.longcat import LongCatVideoTransformer3D

    if not isinstance(plan.sparse, BSA):
        return
    t, h, w = (int(x) for x in latents_shape[-3:])
    grid_hw = (h // patch[1], w // patch[2])
    calls = []
    if use_kv_cache and num_cond_latents:
        if num_cond_latents > 1:
            calls.append(((num_cond_latents, *grid_hw), 0, False))
        calls.append(((t - num_cond_latents, *grid_hw), num_cond_latents, True))
    else:
        calls.append(((t, *grid_hw), num_cond_latents, False))
    for grid, nc, cache in calls:
        if grid[0] <= 1 and not cache:
            continue  # BSA is not used on single-frame latents
        try:
            LongCatVideoTransformer3D._check_bsa(plan.sparse, grid, nc, cache)
        except ValueError as e:
            q, k = plan.sparse.chunk_3d_shape_q, plan.sparse.chunk_3d_shape_k
            px = vae_spatial * patch[1]
            mh, mw = px * math.lcm(q[1], k[1]), px * math.lcm(q[2], k[2])
            raise ValueError(
                f"{e}. In pixels: BSA with chunks q {q} / k {k} needs height a multiple of {mh} and width a "
                f"multiple of {mw} (e.g. {mh * max(1, round(h * vae_spatial / mh))}x"
                f"{mw * max(1, round(w * vae_spatial / mw))} for {h * vae_spatial}x{w * vae_spatial}), and "
                f"latent frame counts (all, clean, noisy) that the time chunks divide; upstream and FastVideo "
                f"assert the same. Change the size or the chunks (bsa chunk_3d_shape_q / _k), or turn BSA off"
            ) from None


class LongCatPipeline:
    """LongCat-Video's pipeline on jaxvid components (see the module docstring).

    pipe = LongCatPipeline.from_pretrained("LongCat-Video", dtype=jnp.bfloat16)
    out = pipe.generate_t2v("a cat ...", DEFAULT_NEGATIVE_PROMPT, seed=42)      # 480p, 93 frames
    pipe.enable_loras(["cfg_step_lora"])                                        # distilled
    fast = pipe.generate_t2v("a cat ...", num_inference_steps=16, use_distill=True, guidance_scale=1.0)
    pipe.enable_loras(["refinement_lora"]); pipe.enable_bsa()                   # 720p refinement
    hd = pipe.generate_refine("a cat ...", stage1_video=fast.frames[0])         # frames uint8 [1, 186, 704, 1280, 3]

    Every mode returns a VideoOutput (uint8 frames as upstream's demos write them, `output_type="np"`
    for floats in [0, 1], "latent" for no decoding; the final latents; the fps). Attention: the DiT's
    plan (`enable_bsa()` / `disable_bsa()` set it, as upstream's switches do), or `denoise(...,
    attention=plan)`; the plan is a static argument of the one jitted loop, so the DiT is split once.
    """

    def __init__(self, *, tokenizer_dir: str | os.PathLike, text_encoder: nnx.Module | OnDemandModel, vae: nnx.Module,
                 dit: nnx.Module, scheduler: flow_match.FlowMatchConfig, lora_dir: str | os.PathLike | None = None,
                 progress: bool = True, offload: str | Offload | None = None):
        from jaxvid.models.lora import LoRALibrary

        self.tokenizer_dir = Path(tokenizer_dir)
        # where weights wait between uses (jaxvid.models.offload; default: the umT5 encoder read on demand)
        self.offload = offload if isinstance(offload, Offload) else Offload(offload)
        self.components = {name: Component(module, name, self.offload, progress=progress)
                           for name, module in (("dit", dit), ("text_encoder", text_encoder), ("vae", vae))}
        self.scheduler = scheduler
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.loras = LoRALibrary(dit.cfg)
        self.progress = StepProgress("denoising", enabled=progress)
        self._tokenizers: dict[int, Any] = {}
        self._lora_cache: tuple[Any, Any] = (None, None)
        self.last_timings: dict[str, float] = {}
        self.mesh: Any = None  # a jax Mesh after use_mesh(): DiT and VAE decode on several devices
        self.mesh_fsdp = False  # use_mesh(fsdp=True): the DiT's weights sharded over the mesh's seq axis
        self._bsa_by_size: dict[str, Any] | None = None  # enable_bsa_by_resolution's explicit values
        self.last_attention = "dense"  # what the latest denoise ran, for summary lines
        self._encode_text = CompiledFunction(_encode_text, static_argnums=(0,), name="umT5 text encoder")
        self._vae_encode = CompiledFunction(_vae_encode, static_argnums=(0,), name="VAE encode", stage="vae")
        self._vae_decode = CompiledFunction(_vae_decode, static_argnums=(0,), name="VAE decode", stage="vae")
        self._cache_kv = CompiledFunction(_cache_clean_latents, static_argnums=(0, 1), name="KV cache of clean frames")
        # the latents x are donated: each step updates them in place
        self._denoise = CompiledFunction(_denoise, static_argnums=(0, 1), donate_argnums=(4,), name="denoising loop")
        if vae.cfg.z_dim != dit.cfg.in_channels:
            raise ValueError(f"vae z_dim={vae.cfg.z_dim} != dit in_channels={dit.cfg.in_channels}")
        if text_encoder.cfg.d_model != dit.cfg.caption_channels:
            raise ValueError(f"text encoder d_model={text_encoder.cfg.d_model} != dit caption_channels="
                             f"{dit.cfg.caption_channels}")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: Any | None = None, progress: bool = True,
                        weights: str | None = None, offload: str | None = None) -> "LongCatPipeline":
        """Load a LongCat-Video folder: dit/, text_encoder/, vae/, tokenizer/, scheduler/ and optional lora/.

        Each model folder may be upstream's (config.json + safetensors) or a converted jaxvid
        checkpoint. `dtype` (e.g. jnp.bfloat16, upstream's choice) sets every model's parameter and
        compute dtype; None keeps the stored dtypes. `offload`: "none" / "text" (default) / "model" /
        "blocks" (jaxvid.models.offload); each component is parked as soon as it has loaded.
        Except under "none", the umT5 encoder's checkpoint is only checked here. Each
        `encode_prompt` reads its weights to the device and drops them after encoding
        (`Offload.on_demand`).
        """
        from jaxvid.models.loading import load_model, open_text_encoder, parse_config, read_json_file

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"path={str(path)!r}: not a folder; expected a LongCat-Video checkpoint folder")
        missing = [c for c in COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise ValueError(f"{path}: missing component folders {missing}; a LongCat-Video checkpoint has "
                             f"{list(COMPONENTS)} and lora/")
        parking = Offload(offload)
        # first: read on demand (every policy but "none"), umT5 is only checked here, so a bad file
        # fails before the DiT's gigabytes are read
        text_encoder = open_text_encoder(path / "text_encoder", dtype, ["UMT5EncoderModel", "T5EncoderModel"], parking)
        # weights="fp8": the DiT's attention/MLP linears in e4m3 (jaxvid.models.fp8)
        # parked weights load straight into pinned host memory (host_paths): the 27 GB DiT under
        # "model" / "blocks" never passes through the device
        dit = load_model(path / "dit", dtype=dtype, expect=["LongCatVideoTransformer3DModel"], weights=weights,
                         host=parking.host_paths("dit"))
        parking.park_module("dit", dit)  # a no-op unless fp8 quantizing loaded it to the device
        vae = load_model(path / "vae", dtype=dtype, expect=["AutoencoderKLWan"], host=parking.host_paths("vae"))
        parking.park_module("vae", vae)
        sched_file = path / "scheduler" / "scheduler_config.json"
        if not sched_file.is_file():
            raise ValueError(f"{sched_file}: missing; expected the FlowMatchEulerDiscreteScheduler config")
        scheduler = parse_config(flow_match.FlowMatchConfig, read_json_file(sched_file), sched_file)
        lora_dir = path / LORA_DIR if (path / LORA_DIR).is_dir() else None
        return cls(tokenizer_dir=path / "tokenizer", text_encoder=text_encoder, vae=vae, dit=dit,
                   scheduler=scheduler, lora_dir=lora_dir, progress=progress, offload=parking)

    # ---- properties --------------------------------------------------------------------------

    @property
    def dit(self) -> nnx.Module:
        return self.components["dit"].module

    @property
    def text_encoder(self) -> nnx.Module:
        """The loaded umT5 module; a ValueError naming the alternatives when it is read on demand (every
        offload policy but "none"): `components["text_encoder"].load_module()` reads a device copy."""
        return self.components["text_encoder"].module

    @property
    def vae(self) -> nnx.Module:
        return self.components["vae"].module

    @property
    def vae_scale_factor_spatial(self) -> int:
        return self.vae.cfg.spatial_compression

    @property
    def vae_scale_factor_temporal(self) -> int:
        return self.vae.cfg.temporal_compression

    @property
    def dit_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dit.cfg.dtype)

    # ---- switches (upstream's dit.load_lora / enable_loras / disable_all_loras / enable_bsa) ----

    def load_lora(self, name: str, path: str | os.PathLike | None = None, *, multiplier: float = 1.0) -> None:
        """Load a LoRA as `name`; `path` defaults to the checkpoint's lora/{name}.safetensors."""
        if path is None:
            if self.lora_dir is None:
                raise ValueError(f"LoRA {name!r}: this pipeline has no lora/ folder; pass path=")
            path = self.lora_dir / f"{name}.safetensors"
        path = Path(path)
        if not path.is_file():
            have = sorted(p.stem for p in path.parent.glob("*.safetensors")) if path.parent.is_dir() else []
            raise ValueError(f"LoRA {name!r}: {path} does not exist (LoRAs found there: {have})")
        self.loras.load(name, path, multiplier=multiplier)
        self._lora_cache = (None, None)  # a reloaded name may hold other weights

    def enable_loras(self, names: Sequence[str]) -> None:
        """Use exactly these LoRAs from now on, loading any not yet loaded from lora/{name}.safetensors."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.loras.names:
                self.load_lora(name)
        self.loras.enable(names)

    def disable_all_loras(self) -> None:
        self.loras.disable_all()

    def enable_bsa(self, **overrides: Any) -> AttentionPlan:
        """Block sparse self-attention in the DiT from now on (upstream enables it for 720p refinement);
        returns the plan (the DiT's bsa_params with `overrides`, e.g. sparsity=0.875)."""
        self._bsa_by_size = None
        return self.dit.enable_bsa(**overrides)

    def disable_bsa(self) -> AttentionPlan:
        """Dense self-attention from now on; returns the dense plan."""
        self._bsa_by_size = None
        return self.dit.disable_bsa()

    def enable_bsa_by_resolution(self, *, sparsity: float | None = None, cdf_threshold: float | None = None,
                                 chunk_3d_shape_q: Sequence[int] | None = None,
                                 chunk_3d_shape_k: Sequence[int] | None = None) -> None:
        """BSA from now on with parameters picked per run by the video's size (the BSA guide's mixed
        strategy): the row of config.json's per-resolution `bsa_params` table if it has one, else
        `jaxvid.attention.presets.DEFAULT_BSA_TABLE` (720p and up 0.9375 / 4x4x4, 480p 0.875 / 4x4x8,
        below dense). Values given here replace those fields of the row (of the config's bsa_params
        where the row is dense). `last_attention` says what each run used."""
        explicit = {k: v for k, v in dict(sparsity=sparsity, cdf_threshold=cdf_threshold,
                                          chunk_3d_shape_q=chunk_3d_shape_q,
                                          chunk_3d_shape_k=chunk_3d_shape_k).items() if v is not None}
        if explicit:  # bad values fail here, not at the first run
            BSA.from_dict({**_bsa_dict(self.dit.cfg.bsa_params or BSA()), **explicit})
        self._bsa_by_size = explicit  # takes precedence over the DiT's own switch (see _attention_for)
        log.info("LongCat: block sparse attention by resolution%s", f", explicit {explicit}" if explicit else "")

    def bsa_choice(self, height: int, width: int) -> BSAChoice | None:
        """The BSA row a `height` x `width` run uses under enable_bsa_by_resolution (None when it is off)."""
        if self._bsa_by_size is None:
            return None
        cfg = self.dit.cfg
        return resolve_bsa(int(height), int(width), self._bsa_by_size, table=cfg.bsa_table,
                           base=None if cfg.bsa_params is None else _bsa_dict(cfg.bsa_params))

    def _attention_for(self, latents_shape: Sequence[int]) -> tuple[AttentionPlan, str]:
        """The plan of a run on latents [B, C, T, h, w] without an explicit one, and its description."""
        s = self.vae_scale_factor_spatial
        choice = self.bsa_choice(latents_shape[-2] * s, latents_shape[-1] * s)
        if choice is not None:
            if choice.params is None:
                return AttentionPlan.dense(), f"dense by resolution: {choice.which}"
            bsa = BSA.from_dict(choice.params)
            return AttentionPlan(sparse=bsa), f"BSA {_describe_bsa(bsa)} by resolution: {choice.which}"
        plan = self.dit.attention_plan()
        return plan, ("dense" if plan.is_dense else f"BSA {_describe_bsa(plan.sparse)} (config bsa_params)")

    # ---- text ------------------------------------------------------------------------------------

    def _tokenizer(self, max_length: int):
        from jaxvid.tokenizer import longcat_tokenizer

        if max_length not in self._tokenizers:
            self._tokenizers[max_length] = longcat_tokenizer(self.tokenizer_dir, max_length=max_length)
        return self._tokenizers[max_length]

    def _t5(self, prompts: list[str], num_videos_per_prompt: int, max_sequence_length: int, state: Any):
        """Encode with the umT5 weights `state` (on the device: inside `text_encoder.resident()`)."""
        tokens = self._tokenizer(max_sequence_length)(prompts)
        text = self.components["text_encoder"]
        embeds = jax.block_until_ready(self._encode_text(text.graphdef, state, jnp.asarray(tokens.input_ids),
                                                         jnp.asarray(tokens.attention_mask)).astype(self.dit_dtype))
        mask = jnp.asarray(tokens.attention_mask)
        embeds = jnp.repeat(embeds, num_videos_per_prompt, axis=0)[:, None]
        return embeds, jnp.repeat(mask, num_videos_per_prompt, axis=0)

    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                      do_classifier_free_guidance: bool = True, num_videos_per_prompt: int = 1,
                      max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> tuple[jax.Array, jax.Array]:
        """-> embeds [B', 1, L, D] in the DiT dtype and mask int32 [B', L]; under CFG B' = 2B, negative first."""
        prompts = _check_prompt(prompt)
        negatives = None
        if do_classifier_free_guidance:
            negative = negative_prompt or ""
            if isinstance(negative, str):
                negatives = [negative] * len(prompts)
            else:
                negatives = _check_prompt(negative, "negative_prompt")
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries: expected {len(prompts)} like prompt")
        # one trip of the (parked) encoder to the device for both halves; its copy is deleted after
        with self.components["text_encoder"].resident() as state:
            embeds, mask = self._t5(prompts, num_videos_per_prompt, max_sequence_length, state)
            if negatives is None:
                return embeds, mask
            neg_embeds, neg_mask = self._t5(negatives, num_videos_per_prompt, max_sequence_length, state)
        return jnp.concatenate([neg_embeds, embeds]), jnp.concatenate([neg_mask, mask])

    # ---- schedule --------------------------------------------------------------------------------

    def schedule(self, num_inference_steps: int, *, use_distill: bool = False) -> flow_match.FlowMatchState:
        """Upstream `get_timesteps_sigmas` + `scheduler.set_timesteps(n, sigmas=...)`."""
        _positive_int("num_inference_steps", num_inference_steps)
        sigmas = flow_match.longcat_sigmas(num_inference_steps, use_distill=use_distill)
        return flow_match.set_timesteps(self.scheduler, num_inference_steps, sigmas=sigmas)

    # ---- checks ----------------------------------------------------------------------------------

    def _check_size(self, height: int, width: int, multiple: int) -> None:
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v < multiple or v % multiple:
                raise ValueError(f"{name}={v!r}: expected a positive multiple of {multiple} "
                                 f"(VAE {self.vae_scale_factor_spatial}x times the DiT patch"
                                 f"{' times the refinement granularity' if multiple > 16 else ''})")

    def _check_num_frames(self, num_frames: int) -> int:
        _positive_int("num_frames", num_frames)
        t = self.vae_scale_factor_temporal
        if (num_frames - 1) % t:
            raise ValueError(f"num_frames={num_frames}: expected 1 + {t}k frames (e.g. 93); the VAE packs {t} frames "
                             f"per latent after the first (upstream would round down to "
                             f"{(num_frames - 1) // t * t + 1})")
        return (num_frames - 1) // t + 1

    def _condition_size(self, frame_hw: tuple[int, int], resolution: str, height: int | None, width: int | None,
                        multiple: int) -> tuple[int, int]:
        if (height is None) != (width is None):
            raise ValueError(f"height={height!r}, width={width!r}: give both or neither (neither: the "
                             f"{resolution} aspect-ratio bucket of the input)")
        if height is None:
            if resolution not in ("480p", "720p"):
                raise ValueError(f"resolution={resolution!r}: expected '480p' or '720p'")
            height, width = bucket_size(*frame_hw, resolution, multiple)
        self._check_size(height, width, multiple)
        return height, width

    @staticmethod
    def _check_output_type(output_type: str) -> None:
        check_output_type(output_type)

    # ---- building blocks -------------------------------------------------------------------------

    def _noise(self, key: jax.Array, batch: int, latent_frames: int, height: int, width: int, dtype) -> jax.Array:
        s = self.vae_scale_factor_spatial
        shape = (batch, self.dit.cfg.in_channels, latent_frames, height // s, width // s)
        return jax.random.normal(key, shape, jnp.float32).astype(dtype)

    def _prompt_batch(self, prompt, negative_prompt, sampling: Sampling):
        """Text embeddings ([uncond; cond] under CFG) + mask, the batch size and the seed's keys."""
        embeds, mask = self.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance=sampling.do_cfg,
                                          num_videos_per_prompt=sampling.num_videos_per_prompt,
                                          max_sequence_length=sampling.max_sequence_length)
        return embeds, mask, len(_check_prompt(prompt)) * sampling.num_videos_per_prompt, _Keys.from_seed(sampling.seed)

    def _initial_latents(self, latents: jax.Array | None, key: jax.Array, batch: int, latent_frames: int,
                         height: int, width: int, dtype) -> jax.Array:
        """The given latents (checked against the request) or fresh N(0, 1) noise [B, C, T, h, w]."""
        if latents is None:
            return self._noise(key, batch, latent_frames, height, width, dtype)
        s = self.vae_scale_factor_spatial
        want = (batch, self.dit.cfg.in_channels, latent_frames, height // s, width // s)
        if tuple(latents.shape) != want:
            raise ValueError(f"latents has shape {tuple(latents.shape)}: expected {want} for this request")
        return jnp.asarray(latents, dtype)

    def encode_frames(self, frames: np.ndarray | jax.Array, key: jax.Array | None, dtype) -> jax.Array:
        """frames float [B, 3, F, H, W] in [-1, 1] -> normalised DiT latents in `dtype` (posterior sample with key)."""
        vae = self.components["vae"]
        frames = jnp.asarray(frames).astype(self.vae.cfg.dtype)
        with vae.resident() as state:
            latents = jax.block_until_ready(self._vae_encode(vae.graphdef, state, frames, key).astype(dtype))
        return self.vae.normalize_latents(latents)

    def use_mesh(self, mesh: Any, *, fsdp: bool = False) -> None:
        """Run every later denoising loop and VAE decode on the devices of `mesh` (a jax Mesh from
        jaxvid.parallel.make_mesh; None = back to one device for new weights placements): CFG halves
        over its `cfg` axis, Ulysses sequence parallel over `seq`, the decode split by latent rows.
        The DiT's weights are replicated, or with `fsdp` sharded over `seq` (1/n of them per device,
        gathered layer by layer; for 24 GB cards)."""
        self.mesh, self.mesh_fsdp = mesh, fsdp
        if mesh is not None:
            place_module(self.dit, mesh, fsdp=fsdp)
            place_module(self.vae, mesh)
            for name in ("dit", "vae"):
                self.components[name].refresh()

    def decode(self, latents: jax.Array) -> np.ndarray:
        """DiT latents [B, z, T, h, w] -> float32 frames [B, 1 + 4(T-1), 8h, 8w, 3] in [0, 1]."""
        vae = self.components["vae"]
        with vae.resident() as state, mesh_context(self.mesh):
            return np.asarray(self._vae_decode(vae.graphdef, state, place_replicated(latents, self.mesh)))

    def denoise(self, latents: jax.Array, embeds: jax.Array, mask: jax.Array, schedule: flow_match.FlowMatchState,
                *, guidance_scale: float, num_cond_latents: int = 0, use_kv_cache: bool = False,
                attention: AttentionPlan | None = None) -> jax.Array:
        """The jitted loop over `schedule` (CFG when guidance_scale > 1; embeds then [uncond; cond]).

        attention: the AttentionPlan (None: the DiT's, as enable_bsa / disable_bsa left it); its dense
        timesteps switch inside the loop, its dense layers run as a separate scan.
        """
        do_cfg = guidance_scale > 1.0
        if attention is None:
            attention, self.last_attention = self._attention_for(latents.shape)
        elif not isinstance(attention, AttentionPlan):
            raise ValueError(f"attention={attention!r}; expected None or an AttentionPlan")
        else:
            self.last_attention = "dense" if attention.is_dense else f"plan {attention}"
        _check_bsa_fits(attention, latents.shape, int(num_cond_latents), bool(use_kv_cache),
                        self.dit.cfg.patch_size, self.vae_scale_factor_spatial)
        log.info("attention: %s", self.last_attention)
        if embeds.shape[0] != latents.shape[0] * (2 if do_cfg else 1):
            raise ValueError(f"embeds batch {embeds.shape[0]} does not fit latents batch {latents.shape[0]} "
                             f"(CFG {'on' if do_cfg else 'off'})")
        spec = _LoopSpec(num_cond_latents=int(num_cond_latents), use_kv_cache=bool(use_kv_cache), do_cfg=do_cfg,
                         dtype=self.dit_dtype, attention=attention, scheduler=self.scheduler)
        dit = self.components["dit"]
        num_steps = int(schedule.timesteps.shape[0])
        if self.mesh is not None and not on_mesh(dit.state, self.mesh):
            self.use_mesh(self.mesh, fsdp=self.mesh_fsdp)  # weights loaded or changed since use_mesh()
        lora, scale, nc = self._lora_factors(), jnp.float32(guidance_scale), spec.num_cond_latents
        # a copy even when latents are float32 already: the loop donates (consumes) x, never the caller's array
        x = jnp.array(latents, dtype=jnp.float32, copy=True)
        schedule = pad_step_tables(schedule, num_steps)  # one loop program for every step count in a bucket
        lora, x, embeds, mask, schedule, scale = place_replicated((lora, x, embeds, mask, schedule, scale), self.mesh)
        with dit.resident() as state, mesh_context(self.mesh):
            compile_seconds = 0.0
            t0 = time.perf_counter()
            kv_cache = None
            if spec.use_kv_cache:  # the clean frames' keys/values, once, then only the new frames are denoised
                kv_cache = self._cache_kv(dit.graphdef, spec, state, lora, x)
                compile_seconds += self._cache_kv.last_compile_seconds
                x = x[:, :, nc:]

            def run_range(steps: StepRange, x: jax.Array) -> jax.Array:
                return self._denoise(dit.graphdef, spec, state, lora, x, steps, kv_cache, embeds, mask, schedule, scale)

            # compile before the bar starts
            compile_seconds += self._denoise.prepare(dit.graphdef, spec, state, lora, x, StepRange.of(0, 1), kv_cache,
                                                     embeds, mask, schedule, scale)
            self.progress.start(num_steps)
            t0 += compile_seconds  # the loop's time without compiling
            try:
                out = run_steps(run_range, x, num_steps, self.progress)
            finally:
                self.progress.close()
        if spec.use_kv_cache:
            out = jnp.concatenate([jnp.asarray(latents)[:, :, :nc].astype(out.dtype), out], axis=2)
        total = time.perf_counter() - t0
        ticks = self.progress.step_times
        # the first tick also waits for the KV-cache pass; later ones are pure steps
        per_step = float(np.median(ticks[1:])) if len(ticks) > 1 else total / num_steps
        self.last_timings = {"compile": compile_seconds, "denoise": total, "per_step": per_step, "steps": num_steps,
                             "compile_and_first_step": compile_seconds + (ticks[0] if ticks else total)}
        peak = peak_memory_gib()
        if peak is not None:  # updated again after decoding (_finish)
            self.last_timings["peak_gib"] = peak
        log.info("denoised %d steps in %.2f s (%.3f s/step after the first)", num_steps, total, per_step)
        return out

    def _lora_factors(self):
        """Run-time factors of the enabled LoRAs (built once per enabled set: ~1 GB at full size)."""
        key = (tuple(self.loras.enabled), self.dit_dtype)
        if self._lora_cache[0] != key:
            self._lora_cache = (key, self.loras.runtime(dtype=self.dit_dtype))
        return self._lora_cache[1]

    def _finish(self, latents: jax.Array, output_type: str, frame_slice: slice | None = None,
                fps: int = FPS) -> VideoOutput:
        if output_type == "latent":
            return VideoOutput(frames=None, latents=latents, fps=fps, output_type=output_type)
        frames = self.decode(latents)
        peak = peak_memory_gib()
        if peak is not None:  # the process's device memory peak so far (XLA's statistics; none on a CPU)
            self.last_timings["peak_gib"] = peak
        if frame_slice is not None:
            frames = frames[:, frame_slice]
        # uint8 as upstream's demos write them: (x * 255).astype(uint8), truncating
        return VideoOutput(frames=finish_frames(frames, output_type, rounding="truncate"), latents=latents, fps=fps,
                           output_type=output_type)

    # ---- modes -----------------------------------------------------------------------------------

    def generate_t2v(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                     height: int = 480, width: int = 832, num_frames: int = 93, num_inference_steps: int = 50,
                     use_distill: bool = False, guidance_scale: float = 4.0, num_videos_per_prompt: int = 1,
                     seed: int | jax.Array = 0, latents: jax.Array | None = None, output_type: str = "uint8",
                     max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> VideoOutput:
        """Text to video (upstream generate_t2v). Distilled: cfg_step LoRA enabled, 16 steps, use_distill, g = 1."""
        self._check_output_type(output_type)
        self._check_size(height, width, self.vae_scale_factor_spatial * PATCH_SPATIAL)
        latent_frames = self._check_num_frames(num_frames)
        sampling = Sampling(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                            max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt)
        embeds, mask, batch, keys = self._prompt_batch(prompt, negative_prompt, sampling)
        schedule = self.schedule(num_inference_steps, use_distill=use_distill)
        latents = self._initial_latents(latents, keys.noise, batch, latent_frames, height, width, jnp.float32)
        out = self.denoise(jnp.asarray(latents, jnp.float32), embeds, mask, schedule, guidance_scale=guidance_scale)
        return self._finish(out, output_type)

    def generate_i2v(self, image: np.ndarray, prompt: str | Sequence[str],
                     negative_prompt: str | Sequence[str] | None = None, *, resolution: str = "480p",
                     height: int | None = None, width: int | None = None, num_frames: int = 93,
                     num_inference_steps: int = 50, use_distill: bool = False, guidance_scale: float = 4.0,
                     num_videos_per_prompt: int = 1, seed: int | jax.Array = 0, latents: jax.Array | None = None,
                     output_type: str = "uint8", max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> VideoOutput:
        """Image to video (upstream generate_i2v): image uint8 [H, W, 3] becomes the first latent frame."""
        self._check_output_type(output_type)
        image = _as_image(image)
        height, width = self._condition_size(image.shape[:2], resolution, height, width,
                                             self.vae_scale_factor_spatial * PATCH_SPATIAL)
        latent_frames = self._check_num_frames(num_frames)
        if latent_frames < 2:
            raise ValueError(f"num_frames={num_frames}: image-to-video needs more than one latent frame (>= 5 frames)")
        sampling = Sampling(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                            max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt)
        embeds, mask, batch, keys = self._prompt_batch(prompt, negative_prompt, sampling)
        schedule = self.schedule(num_inference_steps, use_distill=use_distill)
        latents = self._initial_latents(latents, keys.noise, batch, latent_frames, height, width, jnp.float32)
        pixels = preprocess_frames(image[None], height, width)[None]  # [1, 3, 1, H, W]
        cond = self.encode_frames(np.repeat(pixels, batch, axis=0), keys.cond, jnp.float32)
        latents = jnp.asarray(latents, jnp.float32).at[:, :, :1].set(cond)
        out = self.denoise(latents, embeds, mask, schedule, guidance_scale=guidance_scale, num_cond_latents=1)
        return self._finish(out, output_type)

    def generate_vc(self, video: np.ndarray, prompt: str | Sequence[str],
                    negative_prompt: str | Sequence[str] | None = None, *, resolution: str = "480p",
                    height: int | None = None, width: int | None = None, num_frames: int = 93,
                    num_cond_frames: int = 13, num_inference_steps: int = 50, use_distill: bool = False,
                    guidance_scale: float = 4.0, num_videos_per_prompt: int = 1, seed: int | jax.Array = 0,
                    latents: jax.Array | None = None, output_type: str = "uint8",
                    max_sequence_length: int = MAX_SEQUENCE_LENGTH, use_kv_cache: bool = True,
                    enhance_hf: bool = True) -> VideoOutput:
        """Video continuation (upstream generate_vc): the last num_cond_frames of `video` (uint8 [F, H, W, 3])
        condition; the output's first num_cond_frames frames are their reconstruction."""
        self._check_output_type(output_type)
        if use_distill and enhance_hf:
            raise ValueError("use_distill=True with enhance_hf=True: upstream forbids the combination; "
                             "pass enhance_hf=False for the distilled schedule")
        video = _as_frames(video, "video")
        height, width = self._condition_size(video.shape[1:3], resolution, height, width,
                                             self.vae_scale_factor_spatial * PATCH_SPATIAL)
        latent_frames = self._check_num_frames(num_frames)
        t = self.vae_scale_factor_temporal
        _positive_int("num_cond_frames", num_cond_frames)
        if (num_cond_frames - 1) % t or num_cond_frames > video.shape[0] or num_cond_frames >= num_frames:
            raise ValueError(f"num_cond_frames={num_cond_frames}: expected 1 + {t}k frames (e.g. 13), at most the "
                             f"video's {video.shape[0]} frames and fewer than num_frames={num_frames}")
        num_cond_latents = 1 + (num_cond_frames - 1) // t
        sampling = Sampling(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                            max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt)
        embeds, mask, batch, keys = self._prompt_batch(prompt, negative_prompt, sampling)
        schedule = self.schedule(num_inference_steps, use_distill=use_distill)
        if enhance_hf:
            schedule = flow_match.state_from_timesteps(flow_match.enhance_hf_timesteps(np.asarray(schedule.timesteps)))
        dtype = self.dit_dtype  # upstream prepares continuation latents in the DiT dtype
        latents = self._initial_latents(latents, keys.noise, batch, latent_frames, height, width, dtype)
        pixels = preprocess_frames(video[-num_cond_frames:], height, width)[None]
        cond = self.encode_frames(np.repeat(pixels, batch, axis=0), keys.cond, dtype)
        latents = jnp.asarray(latents, dtype).at[:, :, :num_cond_latents].set(cond).astype(jnp.float32)
        out = self.denoise(latents, embeds, mask, schedule, guidance_scale=guidance_scale,
                           num_cond_latents=num_cond_latents, use_kv_cache=use_kv_cache)
        return self._finish(out, output_type)

    def generate_long(self, prompt: str | Sequence[str], negative_prompt: str | None = None, *,
                      num_segments: int | None = None, video: np.ndarray | None = None, num_frames: int = 93,
                      num_cond_frames: int = 13, height: int = 480, width: int = 832, num_inference_steps: int = 50,
                      use_distill: bool = False, guidance_scale: float = 4.0, seed: int = 0,
                      max_sequence_length: int = MAX_SEQUENCE_LENGTH, use_kv_cache: bool = True,
                      enhance_hf: bool = True) -> VideoOutput:
        """run_demo_long_video: a t2v segment (or `video`), then num_segments continuations (default 11),
        each conditioned on the last num_cond_frames frames of the previous one -> VideoOutput with uint8
        frames [1, F, H, W, 3] (no latents: the segments' latents do not join into one tensor).

        Interactive / multi-prompt (run_demo_interactive_video): `prompt` a list, one prompt per segment:
        prompt[0] for the t2v segment and prompt[k] for continuation k (with `video`: prompt[k] for
        continuation k + 1, nothing is generated from text); num_segments then follows from the list.
        Frames pass between segments as upstream's uint8 (truncated); segment s uses seed + s.
        """
        if isinstance(prompt, str):
            prompts = None
            num_segments = 11 if num_segments is None else num_segments
        else:
            prompts = _check_prompt(prompt, "prompt")
            implied = len(prompts) - (0 if video is not None else 1)
            if implied < 1:
                raise ValueError(f"prompt: {len(prompts)} prompt(s); a multi-prompt long video needs one for the first "
                                 "segment and one per continuation (at least 2, or 1 with `video`)")
            if num_segments is not None and num_segments != implied:
                raise ValueError(f"num_segments={num_segments} but prompt has {len(prompts)} prompts: "
                                 f"expected {implied} continuation segments (or leave num_segments out)")
            num_segments = implied
        _positive_int("num_segments", num_segments)
        segment_prompts = [prompt] * (num_segments + 1) if prompts is None else (
            prompts if video is None else [None, *prompts])
        sampling = Sampling(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                            max_sequence_length=max_sequence_length)
        common = dict(num_frames=num_frames, height=height, width=width, use_distill=use_distill,
                      **self._sampling_kwargs(sampling))
        if video is None:
            video = self.generate_t2v(segment_prompts[0], negative_prompt, **common).frames[0]
        video = _as_frames(video, "video")
        frames, current = [video], video
        for segment in range(num_segments):
            log.info("long video: segment %d/%d", segment + 1, num_segments)
            out = self.generate_vc(current, segment_prompts[segment + 1], negative_prompt,
                                   num_cond_frames=num_cond_frames, use_kv_cache=use_kv_cache, enhance_hf=enhance_hf,
                                   **{**common, "seed": seed + segment + 1})
            new = out.frames[0]  # uint8 as upstream passes frames between segments (truncated)
            frames.append(new[num_cond_frames:])
            current = new
        return VideoOutput(frames=np.concatenate(frames)[None], latents=None, fps=FPS)

    @staticmethod
    def _sampling_kwargs(sampling: Sampling) -> dict[str, Any]:
        """The keyword arguments of the mode methods that a Sampling holds."""
        return dict(num_inference_steps=sampling.num_inference_steps, guidance_scale=sampling.guidance_scale,
                    seed=sampling.seed, max_sequence_length=sampling.max_sequence_length,
                    num_videos_per_prompt=sampling.num_videos_per_prompt)

    def generate_refine(self, prompt: str | Sequence[str], stage1_video: np.ndarray, *,
                        image: np.ndarray | None = None, video: np.ndarray | None = None, num_cond_frames: int = 0,
                        num_inference_steps: int = 50, t_thresh: float = REFINE_T_THRESH,
                        spatial_refine_only: bool = False, height: int | None = None, width: int | None = None,
                        num_videos_per_prompt: int = 1, seed: int | jax.Array = 0, output_type: str = "uint8",
                        max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> VideoOutput:
        """720p refinement (upstream generate_refine) of stage1_video (uint8 [N, H, W, 3], e.g. a 480p result).

        Output: 2N frames (N with spatial_refine_only) at the 720p bucket size (or height x width,
        multiples of 64). Conditioning: `image` (num_cond_frames=1) or the last num_cond_frames frames
        of `video` (already at the refined frame rate) stay clean. Upstream runs it with the refinement
        LoRA and BSA enabled (`enable_loras(["refinement_lora"])`, `enable_bsa()`), no CFG.
        """
        self._check_output_type(output_type)
        if image is not None and video is not None:
            raise ValueError("image and video given: expected at most one conditioning input")
        stage1 = _as_frames(stage1_video, "stage1_video")
        multiple = self.vae_scale_factor_spatial * PATCH_SPATIAL * REFINE_SPATIAL_EXTRA
        height, width = self._condition_size(stage1.shape[1:3], "720p", height, width, multiple)
        if not isinstance(num_cond_frames, (int, np.integer)) or num_cond_frames < 0:
            raise ValueError(f"num_cond_frames={num_cond_frames!r}: expected an int >= 0")
        if num_cond_frames and image is None and video is None:
            raise ValueError(f"num_cond_frames={num_cond_frames} but neither image nor video given")
        if image is not None and num_cond_frames != 1:
            raise ValueError(f"num_cond_frames={num_cond_frames} with an image: expected 1")
        if (image is not None or video is not None) and num_cond_frames == 0:
            raise ValueError("a conditioning image/video needs num_cond_frames > 0")
        if not 0 < t_thresh < 1:
            raise ValueError(f"t_thresh={t_thresh!r}: expected a value in (0, 1)")
        # refinement runs without CFG (guidance 1)
        sampling = Sampling(num_inference_steps=num_inference_steps, guidance_scale=1.0, seed=seed,
                            max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt)
        embeds, mask, batch, keys = self._prompt_batch(prompt, None, sampling)
        schedule = self.schedule(num_inference_steps)
        timesteps = flow_match.refine_timesteps(np.asarray(schedule.timesteps), t_thresh)
        schedule = flow_match.state_from_timesteps(timesteps)

        # 5. upsample: bilinear to (height, width), linear in time to 2N frames, both align_corners=True
        n = stage1.shape[0]
        new_frames = n if spatial_refine_only else 2 * n
        layout = refine_layout(new_frames, num_cond_frames, self.vae_scale_factor_temporal)
        up = jnp.asarray(stage1, jnp.float32).transpose(3, 0, 1, 2)  # [3, N, H0, W0]
        up = resize_linear_align_corners(resize_linear_align_corners(up, 2, height), 3, width) / 255.0
        up = resize_linear_align_corners(up, 1, new_frames) * 2 - 1
        up = jnp.concatenate([jnp.repeat(up[:, :1], layout.cond_frames_added, axis=1), up,
                              jnp.repeat(up[:, -1:], layout.noise_frames_added, axis=1)], axis=1)
        # the padded length is 4k (no conditioning); upstream's VAE then drops the last 3 frames
        t = self.vae_scale_factor_temporal
        up = up[:, :1 + (up.shape[1] - 1) // t * t][None]
        vae_dtype = self.vae.cfg.dtype
        latent_up = self.encode_frames(up, keys.upsampled, vae_dtype)
        noise = jax.random.normal(keys.refine_noise, latent_up.shape, jnp.float32).astype(vae_dtype)
        latents = ((1 - t_thresh) * latent_up + t_thresh * noise).astype(jnp.float32)
        latents = jnp.repeat(latents, batch, axis=0)

        ncl = layout.num_cond_latents
        if ncl:
            if image is not None:
                cond_pixels = preprocess_frames(_as_image(image)[None], height, width)
            else:
                cond_video = _as_frames(video, "video")
                keep = num_cond_frames
                if keep > cond_video.shape[0]:
                    raise ValueError(f"num_cond_frames={num_cond_frames}: the video has only "
                                     f"{cond_video.shape[0]} frames")
                cond_pixels = preprocess_frames(cond_video[-keep:], height, width)
            cond_pixels = np.concatenate([np.repeat(cond_pixels[:, :1], layout.cond_frames_added, axis=1),
                                          cond_pixels], axis=1)[None]
            cond = self.encode_frames(np.repeat(cond_pixels, batch, axis=0), keys.cond, jnp.float32)
            latents = latents.at[:, :, :ncl].set(cond)
        out = self.denoise(latents, embeds, mask, schedule, guidance_scale=1.0, num_cond_latents=ncl)
        start = layout.cond_frames_added
        return self._finish(out, output_type, slice(start, start + new_frames),
                            fps=FPS if spatial_refine_only else REFINE_FPS)

    def refine_long(self, frames: np.ndarray, prompt: str = "", *, num_frames: int = 93, num_cond_frames: int = 13,
                    num_inference_steps: int = 50, spatial_refine_only: bool = False, seed: int = 0,
                    height: int | None = None, width: int | None = None,
                    max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> VideoOutput:
        """run_demo_long_video's refinement: refine windows of num_frames stage-1 frames that overlap by
        num_cond_frames, each conditioned on the end of the previous refined window -> VideoOutput with
        uint8 frames [1, F, H, W, 3] (no latents)."""
        frames = _as_frames(frames, "frames")
        stride = num_frames - num_cond_frames
        if stride < 1:
            raise ValueError(f"num_cond_frames={num_cond_frames}: expected fewer than num_frames={num_frames}")
        segments = 1 + max(0, math.ceil((frames.shape[0] - num_frames) / stride))
        refined, cond_video, cond_frames, start = [], None, 0, 0
        for segment in range(segments):
            log.info("refine: segment %d/%d", segment + 1, segments)
            out = self.generate_refine(prompt, frames[start:start + num_frames], video=cond_video,
                                       num_cond_frames=cond_frames, num_inference_steps=num_inference_steps,
                                       spatial_refine_only=spatial_refine_only, seed=seed + segment,
                                       height=height, width=width, max_sequence_length=max_sequence_length)
            new = out.frames[0]
            refined.append(new[cond_frames:])
            cond_video = new
            cond_frames = num_cond_frames if spatial_refine_only else 2 * num_cond_frames
            start += stride
        return VideoOutput(frames=np.concatenate(refined)[None], latents=None,
                           fps=FPS if spatial_refine_only else REFINE_FPS)
