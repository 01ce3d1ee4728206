"""`jaxvid generate`: prompt (and image or video) -> video file, with CogVideoX or LongCat-Video.

    jaxvid generate --prompt "a green square moving up on a black background"   # the embedded default model
    jaxvid generate --model CogVideoX-5b --prompt "A panda playing guitar" --dtype bf16 --output panda.mp4
    jaxvid generate --model CogVideoX-5b-I2V --image first.png --prompt "..." --attention radial
    jaxvid generate --model LongCat-Video --mode t2v|i2v|continue|long|refine --prompt "..."

One parser with an option group per model: an option the chosen model does not take is an error
(never silently ignored). Everything is checked before any weight is loaded: numbers (finite, in
range, consistent with the model's configs), input files, and the output file (extension, folder,
permission). The CLI only parses, reads input files and reports; the work is the pipelines' Python
API (`CogVideoXPipeline.generate`, `jaxvid.pipelines.longcat_runs.run_longcat`).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("dense", "radial")
DTYPE_CHOICES = ("bf16", "fp32", "fp16")
OFFLOAD_CHOICES = ("none", "text", "model", "blocks")  # jaxvid.models.offload.OFFLOAD_POLICIES
VIDEO_SUFFIXES = (".mp4", ".gif")

# Options by the model that takes them (dest names). The rest are common to both.
COGVIDEOX_OPTIONS = ("dynamic_cfg", "scheduler", "attention", "dense_layers", "dense_timesteps", "decay_factor",
                     "block_size", "vae_tiling", "lora", "strength", "preset", "scene_boundaries", "scene_rule", "step_cache")
LONGCAT_OPTIONS = ("mode", "cond_video", "num_cond_frames", "resolution", "distill", "refine",
                   "refine_steps", "refine_height", "refine_width", "spatial_refine_only", "num_segments",
                   "target_fps", "no_kv_cache", "no_enhance_hf", "bsa_sparsity", "bsa", "bsa_cdf_threshold",
                   "bsa_chunk_q", "bsa_chunk_k", "prompt_file", "fsdp")


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (`jaxvid generate: error: ...`), exit code 2, no usage dump."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `generate` subcommand (its handler is `args.func`) on an argparse subparsers object."""
    p = subparsers.add_parser(
        "generate",
        help="generate a video with CogVideoX or LongCat-Video",
        description="Generate a video with a CogVideoX pipeline folder (diffusers layout, or jaxvid-convert'ed) "
        "or a LongCat-Video folder. Without --model, runs the embedded default model (a tiny CogVideoX trained on "
        "a synthetic world of shapes: 'a red circle moving right on a black background'; no download), or a tiny "
        "random pipeline where that model is not installed. Defaults that depend on the model are stated per model.",
    )
    common = p.add_argument_group("common options")
    common.add_argument("--model", default=None,
                        help="CogVideoX pipeline or LongCat-Video folder, or a model id already in the local Hugging "
                        "Face cache, e.g. THUDM/CogVideoX-5b (never downloaded; default: the model embedded in jaxvid/assets, "
                        "at its own frames, size, steps and guidance, or a random tiny one while it holds no weights)")
    common.add_argument("--prompt", default=None, help="text prompt (required with --model)")
    common.add_argument("--negative-prompt", default=None,
                        help="negative prompt for classifier-free guidance (CogVideoX: ''; LongCat: upstream's)")
    common.add_argument("--image", default=None,
                        help="CogVideoX I2V / LongCat i2v: the first frame; LongCat refine: a conditioning image")
    common.add_argument("--num-frames", type=int, default=None,
                        help="frames, 1 + 4k (CogVideoX: the model's, 49, 81 for 1.5, 9 tiny; LongCat: 93 per segment)")
    common.add_argument("--height", type=int, default=None,
                        help="pixels (CogVideoX: 480, 768 for 1.5, 32 tiny; LongCat t2v: 480, else the aspect bucket)")
    common.add_argument("--width", type=int, default=None,
                        help="pixels (CogVideoX: 720, 1360 for 1.5, 32 tiny; LongCat t2v: 832, else the aspect bucket)")
    common.add_argument("--steps", type=int, default=None,
                        help="denoising steps (CogVideoX: 50, 4 tiny; LongCat: 50, 16 with --distill)")
    common.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale, <= 1: no CFG (CogVideoX: 6; LongCat: 4, 1 with --distill)")
    common.add_argument("--seed", type=int, default=0, help="random seed of the noise (jax.random; default 0)")
    common.add_argument("--max-sequence-length", type=int, default=None,
                        help="text tokens (CogVideoX: 226; LongCat: 512)")
    common.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="weights and compute dtype (default: bf16 on GPU, fp32 on CPU and for the tiny model)")
    common.add_argument("--weights", choices=("fp8",), default=None,
                        help="fp8: the DiT's attention/MLP linears in float8 e4m3 with per-channel scales (Hopper "
                        "FP8 GEMMs; quantized at load unless the checkpoint was converted with --weights fp8)")
    common.add_argument("--attention-precision", choices=("bf16", "fp8", "int8-fp8"), default=None,
                        help="attention arithmetic: bf16 (default), or Sage-style 8-bit fp8 / int8-fp8 (8-bit Q.K^T "
                        "with smoothed K, fp8 P.V)")
    common.add_argument("--fps", type=int, default=None,
                        help="frames per second of the file (CogVideoX: 8, 16 for 1.5; LongCat: 15, refined 30)")
    common.add_argument("--output", default="out.mp4",
                        help="video file, .mp4 or .gif (default out.mp4); --refine writes <name>_refine beside it")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--video", default=None,
                        help="CogVideoX (T2V): video-to-video input; LongCat continue / long: the video to continue; "
                        "refine: the stage-1 video")
    # memory and compilation (issue 15): jaxvid.models.offload, jaxvid.compile_cache
    common.add_argument("--offload", choices=OFFLOAD_CHOICES, default=None,
                        help="where weights wait between uses: text (default) = the text encoder is read from its "
                        "files onto the GPU for each encode and dropped after, model = as text and every other "
                        "component waits in pinned host memory, on the GPU only while it runs, blocks = as model "
                        "and the DiT streams its layers from host memory inside each step, none = all on the GPU")
    common.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="persistent compilation cache folder (default: $JAXVID_COMPILE_CACHE, else "
                        "~/.cache/jaxvid/jax-compile): a second run of the same shapes compiles nothing")
    common.add_argument("--no-compile-cache", action="store_true", help="neither read nor write the compilation cache")
    common.add_argument("--devices", type=int, default=None,
                        help="run on the first N devices (GPUs): Ulysses sequence parallel over all N unless --mesh "
                             "splits them (default: one device, no mesh)")
    common.add_argument("--mesh", default=None,
                        help="device mesh axes, e.g. 'cfg=2,seq=4': cfg = the two CFG halves on different devices, "
                             "seq = Ulysses sequence parallel; their product is the device count")

    cog = p.add_argument_group("CogVideoX options")
    cog.add_argument("--dynamic-cfg", action="store_true", default=None,
                     help="dynamic (cosine-ramped) guidance scale, as diffusers' use_dynamic_cfg")
    cog.add_argument("--scheduler", choices=("ddim", "dpm"), default=None,
                     help="override the folder's scheduler (default: scheduler/scheduler_config.json's)")
    cog.add_argument("--attention", choices=ATTENTION_CHOICES, default=None,
                     help="self-attention: dense, or radial sparse attention (default dense)")
    cog.add_argument("--dense-layers", type=int, default=None,
                     help="radial: the first N layers stay dense (default 1)")
    cog.add_argument("--dense-timesteps", type=int, default=None,
                     help="radial: the first N steps run fully dense (default 12)")
    cog.add_argument("--decay-factor", type=float, default=None, help="radial: window decay factor > 0 (default 1)")
    cog.add_argument("--block-size", type=int, choices=(64, 128), default=None,
                     help="radial: mask block size (default 128)")
    cog.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                     help="decode in overlapping spatial tiles, as diffusers' enable_tiling() (default: on with "
                     "--model, off for the tiny model)")
    cog.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                     help="a LoRA (.safetensors file, folder or cached model id; diffusers/PEFT or kohya layout) "
                     "with its weight (default 1); repeat for several, all active together")
    cog.add_argument("--strength", type=float, default=None,
                     help="with --video: how far to re-noise it, in (0, 1]: the last steps x strength steps run "
                     "(default 0.8)")
    cog.add_argument("--preset", choices=("auto", "short", "medium", "long", "none"), default=None,
                     help="radial: dense layers / dense steps by video length (auto: < 30 frames short 1/3, > 50 "
                     "long 3/8, else medium 2/5); --dense-layers / --dense-timesteps override it (default: 1 / 12)")
    cog.add_argument("--scene-boundaries", default=None, metavar="0,F1,...,N",
                     help="radial: scene edges in frames (0 .. --num-frames), e.g. 0,17,49; tokens attend across "
                     "scenes only as --scene-rule allows")
    cog.add_argument("--step-cache", type=int, default=None, metavar="N",
                     help="pyramid attention broadcast: between timesteps 100 and 800, recompute attention every N "
                     "steps and reuse it in between (diffusers' PAB; faster, approximate; default off)")
    cog.add_argument("--scene-rule", choices=("causal", "isolated"), default=None,
                     help="--scene-boundaries: causal (a scene sees itself and earlier scenes; default) or isolated")

    lc = p.add_argument_group("LongCat-Video options")
    lc.add_argument("--mode", choices=("t2v", "i2v", "continue", "long", "refine"), default=None,
                    help="what to generate (default t2v)")
    lc.add_argument("--cond-video", default=None,
                    help="refine: a video whose last --num-cond-frames frames stay clean")
    lc.add_argument("--num-cond-frames", type=int, default=None,
                    help="continue / long: conditioning frames (default 13); refine with --cond-video: 26")
    lc.add_argument("--resolution", choices=("480p", "720p"), default=None,
                    help="i2v / continue: the aspect-ratio bucket table (default 480p)")
    lc.add_argument("--distill", action="store_true", default=None,
                    help="cfg_step LoRA: 16 steps, guidance 1, the distilled schedule")
    lc.add_argument("--refine", action="store_true", default=None,
                    help="also refine the result to 720p (refinement LoRA, BSA), written as <output>_refine")
    lc.add_argument("--refine-steps", type=int, default=None, help="refinement steps before t_thresh cuts them (default 50)")
    lc.add_argument("--refine-height", type=int, default=None, help="--refine: pixels (default: the 720p bucket)")
    lc.add_argument("--refine-width", type=int, default=None, help="--refine: pixels (default: the 720p bucket)")
    lc.add_argument("--spatial-refine-only", action="store_true", default=None,
                    help="refine: keep the frame count (no 2x in time)")
    lc.add_argument("--num-segments", type=int, default=None, help="long: continuation segments after the first (default 11)")
    lc.add_argument("--target-fps", type=float, default=None,
                    help="continue / long: subsample --video to about this frame rate first (default 15, upstream's)")
    lc.add_argument("--no-kv-cache", action="store_true", default=None,
                    help="continue / long: recompute the clean frames every step")
    lc.add_argument("--no-enhance-hf", action="store_true", default=None,
                    help="continue / long: keep the plain schedule")
    lc.add_argument("--prompt-file", default=None,
                    help="long: a text file, one prompt per segment (upstream's interactive demo): line 1 for the "
                    "first segment (t2v, or the first continuation with --video), each next line one continuation")
    lc.add_argument("--bsa", action=argparse.BooleanOptionalAction, default=None,
                    help="block sparse attention in every stage (default: off, on in refinement); parameters by "
                    "resolution (the config's bsa_params table, else 720p+: 0.9375 4x4x4, 480p: 0.875 4x4x8, below "
                    "dense) unless given below")
    lc.add_argument("--fsdp", action="store_true", default=None,
                    help="with --devices/--mesh: shard the DiT's weights over the mesh's seq axis (1/n per device, "
                    "gathered layer by layer; for 24 GB cards) instead of replicating them")
    lc.add_argument("--bsa-sparsity", type=float, default=None,
                    help="BSA sparsity in [0, 1) (default: the resolution row's)")
    lc.add_argument("--bsa-cdf-threshold", type=float, default=None,
                    help="BSA: keep key chunks up to this softmax mass, in (0, 1] (default: the resolution row's)")
    lc.add_argument("--bsa-chunk-q", type=_chunk3, default=None, metavar="T,H,W",
                    help="BSA query chunk in latent tokens (default: the resolution row's, e.g. 4,4,4)")
    lc.add_argument("--bsa-chunk-k", type=_chunk3, default=None, metavar="T,H,W",
                    help="BSA key chunk in latent tokens (default: the resolution row's, e.g. 4,4,4)")
    p.set_defaults(func=run_generate)
    return p


# ---------------------------------------------------------------------------------------------
# Checks (before anything is loaded)
# ---------------------------------------------------------------------------------------------


def _chunk3(text: str) -> tuple[int, int, int]:
    """--bsa-chunk-q / -k: 'T,H,W' -> three positive ints."""
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        dims = ()
    if len(dims) != 3 or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}; expected three positive ints T,H,W (e.g. 4,4,4)")
    return dims  # type: ignore[return-value]


def _given(args: argparse.Namespace, dests: tuple[str, ...]) -> list[str]:
    return [_flag(d) for d in dests if getattr(args, d, None) is not None]


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option: finite and in range (model-independent part); ValueError naming the option."""
    for dest in ("num_frames", "height", "width", "steps", "fps", "max_sequence_length", "refine_steps", "step_cache",
                 "refine_height", "refine_width", "num_segments", "num_cond_frames"):
        value = getattr(args, dest, None)
        if value is not None and value < 1:
            raise ValueError(f"{_flag(dest)}={value}; expected a positive int")
    for dest in ("dense_layers", "dense_timesteps"):
        value = getattr(args, dest, None)
        if value is not None and value < 0:
            raise ValueError(f"{_flag(dest)}={value}; expected an int >= 0")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance={args.guidance}; expected a finite number (<= 1 turns guidance off)")
    if args.decay_factor is not None and not (math.isfinite(args.decay_factor) and args.decay_factor > 0):
        raise ValueError(f"--decay-factor={args.decay_factor:g}; expected a finite number > 0")
    if args.target_fps is not None and not (math.isfinite(args.target_fps) and args.target_fps > 0):
        raise ValueError(f"--target-fps={args.target_fps}; expected a finite number > 0")
    if args.bsa_sparsity is not None and not (math.isfinite(args.bsa_sparsity) and 0 <= args.bsa_sparsity < 1):
        raise ValueError(f"--bsa-sparsity={args.bsa_sparsity}; expected a number in [0, 1)")
    if getattr(args, "strength", None) is not None and not (math.isfinite(args.strength) and 0 < args.strength <= 1):
        raise ValueError(f"--strength={args.strength}; expected a number in (0, 1]")
    cdf = getattr(args, "bsa_cdf_threshold", None)
    if cdf is not None and not (math.isfinite(cdf) and 0 < cdf <= 1):
        raise ValueError(f"--bsa-cdf-threshold={cdf}; expected a number in (0, 1]")


def check_output(path: str) -> Path:
    """The output file: a .mp4 / .gif whose folder exists (or can be made) and is writable; fast, no I/O but stat."""
    out = Path(path)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"--output={path!r}: unsupported video extension {out.suffix!r}; expected one of "
                         f"{VIDEO_SUFFIXES}")
    if out.is_dir():
        raise ValueError(f"--output={path!r} is a folder; expected a video file name")
    folder = out.absolute().parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output={path!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output={path!r}: the folder {existing} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"--output={path!r}: the file exists and is not writable")
    return out


RADIAL_OPTIONS = ("dense_layers", "dense_timesteps", "decay_factor", "block_size", "preset", "scene_boundaries",
                  "scene_rule")


def radial_dense_settings(args: argparse.Namespace, num_frames: int | None) -> tuple[int, int, str]:
    """(dense layers, dense timesteps, where they came from) for --attention radial: --preset's row
    (auto by --num-frames), explicit --dense-layers / --dense-timesteps over it, else 1 / 12."""
    from jaxvid.attention.presets import radial_preset

    layers, steps, which = 1, 12, "default"
    if getattr(args, "preset", None) is not None:
        if args.preset == "auto" and num_frames is None:
            raise ValueError("--preset auto needs the frame count; it is chosen when the model is known")
        layers, steps, which = radial_preset(num_frames or 1, args.preset)
        which = f"preset {which}"
    explicit = [f"{_flag(d)}" for d in ("dense_layers", "dense_timesteps") if getattr(args, d) is not None]
    if explicit:
        which += f", {' and '.join(explicit)} given"
    layers = layers if args.dense_layers is None else args.dense_layers
    steps = steps if args.dense_timesteps is None else args.dense_timesteps
    return layers, steps, which


def parse_scene_boundaries(text: str) -> tuple[int, ...]:
    """'0,17,49' -> (0, 17, 49); ValueError naming --scene-boundaries otherwise."""
    try:
        bounds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--scene-boundaries={text!r}; expected comma-separated frame numbers like 0,17,49") from None
    if len(bounds) < 2 or bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"--scene-boundaries={text!r}; expected increasing frame edges from 0 to the frame count, "
                         "e.g. 0,17,49")
    return bounds


def attention_plan(args: argparse.Namespace, num_frames: int | None = None, scene: Any = None) -> Any:
    """The AttentionPlan the CogVideoX options ask for (None = dense everywhere). num_frames: the
    video's (for --preset auto); scene: an attention Scene (from --scene-boundaries)."""
    from jaxvid.attention.plan import AttentionPlan

    if args.attention in (None, "dense"):
        for dest in RADIAL_OPTIONS:
            if getattr(args, dest, None) is not None:
                raise ValueError(f"{_flag(dest)} is a radial attention option; add --attention radial")
        return None
    check_numbers(args)
    layers, steps, _ = radial_dense_settings(args, num_frames)
    return AttentionPlan.radial_cogvideox(
        decay_factor=1.0 if args.decay_factor is None else args.decay_factor,
        block_size=args.block_size or 128, dense_layers=layers, dense_timesteps=steps, scene=scene)


def device_mesh(args: argparse.Namespace) -> Any:
    """--devices / --mesh -> a jax Mesh (checked against the visible devices), or None for one device."""
    from jaxvid.parallel import describe_mesh, mesh_from_options

    mesh = mesh_from_options(args.devices, args.mesh)
    if mesh is not None:
        log.info("device mesh: %s", describe_mesh(mesh))
    return mesh


def _default_dtype(tiny: bool) -> str:
    import jax

    return "fp32" if tiny or jax.default_backend() == "cpu" else "bf16"


def _options_error(options: list[str], model: str, other: str) -> ValueError:
    names = ", ".join(options)
    return ValueError(f"{names} {'is an option' if len(options) == 1 else 'are options'} for {other} models; "
                      f"{model}")


def _save(frames: Any, path: Path, fps: int) -> Path:
    """Write the video; if that fails, keep the frames in a .npy file and say where (then exit 1)."""
    import numpy as np

    from jaxvid import video

    try:
        return video.save(frames, path, fps=fps)
    except OSError as e:
        fd, keep = tempfile.mkstemp(prefix=f"{path.stem}-frames-", suffix=".npy",
                                    dir=path.parent if os.access(path.parent, os.W_OK) else None)
        with os.fdopen(fd, "wb") as f:
            np.save(f, frames)
        raise OutputError(f"--output={str(path)!r}: writing the video failed ({e.strerror or e}); the frames "
                          f"(uint8 {tuple(frames.shape)}) are kept in {keep}") from None


class OutputError(RuntimeError):
    """The video could not be written at the end of a run (the frames were kept elsewhere)."""


# ---------------------------------------------------------------------------------------------
# CogVideoX
# ---------------------------------------------------------------------------------------------


def _cogvideox_settings(args: argparse.Namespace, tiny: bool, tcfg: Any, vcfg: Any,
                        embedded: dict[str, Any] | None = None) -> tuple[Any, Any, str]:
    """(geometry, sampling, prompt) from the options over the model's defaults; `embedded`: the
    embedded default model's generation settings (jaxvid.synthetic.default_model.generation_settings)."""
    from jaxvid.pipelines.cogvideox import DEFAULT_STEPS, default_geometry
    from jaxvid.pipelines.settings import Sampling, VideoGeometry
    from jaxvid.synthetic.cogvideox import TinyDefaults
    from jaxvid.tokenizer import COGVIDEOX_MAX_LENGTH

    geo = default_geometry(tcfg, vcfg)
    steps = TinyDefaults().num_inference_steps if tiny else DEFAULT_STEPS
    prompt = args.prompt if args.prompt is not None or not tiny else TinyDefaults().prompt
    guidance = 6.0
    if embedded is not None:
        from jaxvid.synthetic.default_model import DEFAULT_PROMPT

        geo = VideoGeometry(num_frames=embedded["num_frames"], height=embedded["height"], width=embedded["width"])
        steps, guidance = embedded["num_inference_steps"], embedded["guidance_scale"]
        prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    geometry = VideoGeometry(num_frames=args.num_frames or geo.num_frames, height=args.height or geo.height,
                             width=args.width or geo.width)
    sampling = Sampling(num_inference_steps=args.steps or steps,
                        guidance_scale=guidance if args.guidance is None else args.guidance, seed=args.seed,
                        max_sequence_length=args.max_sequence_length or COGVIDEOX_MAX_LENGTH)
    return geometry, sampling, prompt


def _check_cogvideox(model_dir: Path, args: argparse.Namespace, geometry: Any, tcfg: Any, vcfg: Any,
                     i2v: bool) -> None:
    """Fail fast, before weights load: shapes against the configs, --image against the model kind."""
    from jaxvid.pipelines.cogvideox import check_video_shape

    try:
        check_video_shape(tcfg, vcfg, geometry.num_frames, geometry.height, geometry.width)
    except ValueError as e:  # name the CLI options, not the Python arguments
        msg = str(e)
        for name, flag in (("num_frames", "--num-frames"), ("height", "--height"), ("width", "--width")):
            msg = msg.replace(f"{name}=", f"{flag}=")
        raise ValueError(msg) from None
    if not tcfg.use_rotary_positional_embeddings or tcfg.use_learned_positional_embeddings:
        if args.max_sequence_length is not None and args.max_sequence_length != tcfg.max_text_seq_length:
            raise ValueError(f"--max-sequence-length={args.max_sequence_length}; this model's position table is "
                             f"built for max_text_seq_length={tcfg.max_text_seq_length} text tokens")
    if args.dense_layers is not None and args.dense_layers > tcfg.num_layers:
        raise ValueError(f"--dense-layers={args.dense_layers}; this model has {tcfg.num_layers} layers "
                         f"(expected 0..{tcfg.num_layers})")
    if i2v and args.image is None:
        raise ValueError(f"--model {model_dir} is an image-to-video model: pass the first frame with --image IMG")
    if not i2v and args.image is not None:
        raise ValueError(f"--image was given, but --model {model_dir} is a text-to-video model")
    if args.image is not None and not Path(args.image).is_file():
        raise ValueError(f"--image={args.image!r}: no such file")


def parse_lora_specs(specs: list[str] | None) -> list[tuple[str, float]]:
    """--lora values 'PATH[:SCALE]' -> [(path, scale)], each path an existing file / folder or a
    model id; ValueError naming --lora otherwise (checked before any weight loads)."""
    from jaxvid.hub import looks_like_repo_id

    out = []
    for spec in specs or []:
        path, sep, tail = spec.rpartition(":")
        scale = 1.0
        if sep:
            try:
                scale = float(tail)
            except ValueError:
                path = spec  # a ':' inside the path
        else:
            path = spec
        if not math.isfinite(scale):
            raise ValueError(f"--lora={spec!r}: scale {tail!r}; expected a finite number")
        if not path or not (Path(path).expanduser().exists() or looks_like_repo_id(path)):
            raise ValueError(f"--lora={spec!r}: {path!r} is no file or folder (nor a model id); expected PATH[:SCALE]")
        out.append((path, scale))
    return out


def _video_input(args: argparse.Namespace, tcfg: Any, vcfg: Any) -> Any:
    """--video for CogVideoX: uint8 [F, H, W, 3], cut to --num-frames, else to the longest 1 + 4k
    prefix the model takes (for CogVideoX 1.5 also an even latent count)."""
    from jaxvid import video

    frames = video.load(args.video)
    if args.num_frames is not None:
        if args.num_frames > len(frames):
            raise ValueError(f"--num-frames={args.num_frames}; --video {args.video} has only {len(frames)} frames")
        return frames[: args.num_frames]
    tc, pt = vcfg.temporal_compression_ratio, tcfg.patch_size_t or 1
    n = len(frames)
    while n >= 1 and ((n - 1) % tc or ((n - 1) // tc + 1) % pt):
        n -= 1
    if n < 1:
        raise ValueError(f"--video {args.video}: {len(frames)} frames; the model needs 1 + {tc}k frames")
    if n != len(frames):
        log.info("--video: using the first %d of %d frames (1 + %dk frames for the VAE)", n, len(frames), tc)
    return frames[:n]


def _check_cogvideox_inputs(args: argparse.Namespace) -> None:
    """Option checks that need no model: radial-only options, --strength without --video, files."""
    if args.attention in (None, "dense"):
        attention_plan(args)  # raises for radial options without --attention radial
    if args.strength is not None and args.video is None:
        raise ValueError("--strength is a video-to-video option; add --video IN.mp4")
    if args.scene_rule is not None and args.scene_boundaries is None:
        raise ValueError("--scene-rule needs --scene-boundaries")
    if args.scene_boundaries is not None:
        parse_scene_boundaries(args.scene_boundaries)
    if args.video is not None and not Path(args.video).is_file():
        raise ValueError(f"--video={args.video!r}: no such file")


def generate_cogvideox(args: argparse.Namespace) -> Path:
    """One CogVideoX generation from parsed options; returns the path of the written video."""
    from jaxvid import video
    from jaxvid.pipelines.cogvideox import (
        CogVideoXPipeline,
        default_fps,
        default_geometry_sources,
        read_pipeline_configs,
        scene_for_frames,
    )

    t0 = time.perf_counter()
    tiny = args.model is None
    longcat_only = _given(args, LONGCAT_OPTIONS)
    if args.mode == "t2v":  # what CogVideoX does anyway
        longcat_only.remove("--mode")
    if longcat_only:
        raise _options_error(longcat_only, f"--model {args.model or '(the tiny default)'} is a CogVideoX model",
                             "LongCat-Video")
    if not tiny and not args.prompt:
        raise ValueError("--prompt is required with --model")
    _check_cogvideox_inputs(args)
    loras = parse_lora_specs(args.lora)
    mesh = device_mesh(args)
    embedded = None
    with tempfile.TemporaryDirectory(prefix="jaxvid-tiny-") as tmp:
        if tiny:
            from jaxvid.synthetic.default_model import default_model_folder, generation_settings

            model_dir = default_model_folder()
            if (model_dir / "model_index.json").is_file():
                embedded = generation_settings(model_dir)
                log.info("no --model: running the embedded default model %s (a tiny CogVideoX trained on a synthetic "
                         "world of shapes; see its MODEL_CARD.md)", model_dir)
            else:
                from jaxvid.synthetic.cogvideox import write_tiny_pipeline

                log.info("no --model and no embedded default model at %s: running a tiny random CogVideoX pipeline "
                         "(random weights, noise-like video)", model_dir)
                model_dir = write_tiny_pipeline(Path(tmp) / "tiny-cogvideox", seed=0)
        else:
            model_dir = Path(args.model)
        tcfg, vcfg, i2v = read_pipeline_configs(model_dir)
        sources = {k: "given" if getattr(args, k) is not None else s
                   for k, s in default_geometry_sources(tcfg, vcfg).items()}
        source = None
        if args.video is not None:
            if i2v:
                raise ValueError(f"--video was given, but --model {model_dir} is an image-to-video model; "
                                 "video-to-video needs a text-to-video model")
            source = _video_input(args, tcfg, vcfg)
            if args.num_frames is None:
                sources["num_frames"] = f"the input video, {len(source)} frames"
            args.num_frames = len(source)
        geometry, sampling, prompt = _cogvideox_settings(args, tiny, tcfg, vcfg, embedded)
        _check_cogvideox(model_dir, args, geometry, tcfg, vcfg, i2v)
        scene = None
        if args.scene_boundaries is not None:
            try:
                scene = scene_for_frames(parse_scene_boundaries(args.scene_boundaries), geometry.num_frames, tcfg, vcfg,
                                         args.scene_rule or "causal")
            except ValueError as e:
                raise ValueError(str(e).replace("scene_boundaries=", "--scene-boundaries=")) from None
        plan = attention_plan(args, geometry.num_frames, scene)
        if args.attention_precision not in (None, "bf16"):
            from jaxvid.attention.plan import AttentionPlan

            plan = (plan or AttentionPlan.dense()).with_precision(args.attention_precision)
        fps = args.fps or (embedded["fps"] if embedded is not None else default_fps(tcfg))
        image = video.load_image(args.image) if args.image is not None else None
        log.info("%s", _cogvideox_summary(args, geometry, sampling, sources, loras, plan))
        pipe = CogVideoXPipeline.from_pretrained(model_dir, dtype=args.dtype or _default_dtype(tiny),
                                                 scheduler=args.scheduler, weights=args.weights,
                                                 offload=args.offload)
        if loras:
            names = [pipe.load_lora_weights(path, adapter_name=f"lora{i}_{Path(path).stem}")
                     for i, (path, _) in enumerate(loras)]
            pipe.set_adapters(names, [scale for _, scale in loras])
        if args.vae_tiling if args.vae_tiling is not None else not tiny:
            pipe.enable_vae_tiling()
        if args.step_cache is not None:
            pipe.enable_pyramid_attention_broadcast(block_skip_range=args.step_cache)
        # inside the `with`: the tiny folder (its tokenizer) must live until the prompt is encoded
        out = pipe.generate(prompt, args.negative_prompt or "", geometry, sampling,
                            use_dynamic_cfg=bool(args.dynamic_cfg), image=image, video=source,
                            strength=0.8 if args.strength is None else args.strength, attention=plan,
                            progress=not args.no_progress, mesh=mesh)
    frames = out.frames[0]
    path = _save(frames, Path(args.output), fps)
    t = pipe.last_timings
    log.info(
        "wrote %s: %d frames %dx%d at %d fps | compile %.2f s, %.3f s/step x %d steps, decode %.2f s, total %.2f s",
        path, frames.shape[0], frames.shape[1], frames.shape[2], fps, t["compile"], t["per_step"],
        sampling.num_inference_steps, t.get("decode", 0.0), time.perf_counter() - t0,
    )
    _log_peak_memory()
    return path


def _log_peak_memory() -> None:
    """The run's device memory peak, when the backend reports one (GPUs do; jax's CPU backend does not)."""
    from jaxvid.pipelines.memory import describe_peak

    peak = describe_peak()
    if peak is not None:
        log.info("%s", peak)


def _cogvideox_summary(args: argparse.Namespace, geometry: Any, sampling: Any, sources: dict[str, str],
                       loras: list[tuple[str, float]], plan: Any) -> str:
    """One line: what will be generated and where each size came from ("given", "model default (...)")."""
    size = ", ".join(f"{k} {getattr(geometry, k)} ({sources[k]})" for k in ("num_frames", "height", "width"))
    parts = [f"CogVideoX: {size}", f"{sampling.num_inference_steps} steps, guidance {sampling.guidance_scale:g}, "
             f"seed {sampling.seed}, {sampling.max_sequence_length} text tokens"]
    if args.video is not None:
        parts.append(f"video-to-video from {args.video} at strength {0.8 if args.strength is None else args.strength:g}")
    if plan is None:
        parts.append("attention dense")
    else:
        layers, steps, which = radial_dense_settings(args, geometry.num_frames)
        text = f"attention radial: {layers} dense layers, {steps} dense steps ({which})"
        if args.scene_boundaries is not None:
            text += f"; scenes at frames {args.scene_boundaries} ({args.scene_rule or 'causal'})"
        parts.append(text)
    if args.step_cache is not None:
        parts.append(f"step cache: attention recomputed every {args.step_cache} steps within timesteps (100, 800)")
    if loras:
        parts.append("LoRA " + ", ".join(f"{Path(p).name}:{s:g}" for p, s in loras))
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# LongCat-Video
# ---------------------------------------------------------------------------------------------


def _read_video(path: str, target_fps: float | None) -> Any:
    """uint8 [F, H, W, 3], every stride-th frame so the rate is about target_fps (run_demo's stride)."""
    import imageio.v2 as imageio

    from jaxvid import video

    frames = video.load(path)
    stride = 1
    if target_fps:
        try:
            fps = float(imageio.get_reader(path).get_meta_data().get("fps") or 0)
        except (OSError, RuntimeError, ValueError):
            fps = 0.0
        stride = max(1, round(fps / target_fps)) if fps else 1
    return frames[::stride]


def _check_longcat(args: argparse.Namespace, mode: str) -> None:
    cog_only = _given(args, COGVIDEOX_OPTIONS)
    if cog_only:
        raise _options_error(cog_only, f"--model {args.model} is a LongCat-Video model", "CogVideoX")
    if args.fsdp and args.devices is None and args.mesh is None:
        raise ValueError("--fsdp shards the weights over a device mesh; add --devices N or --mesh cfg=..,seq=..")
    if args.prompt_file is not None:
        if mode != "long":
            raise ValueError(f"--prompt-file is for --mode long (one prompt per segment), not --mode {mode}")
        if args.prompt is not None:
            raise ValueError("--prompt and --prompt-file given: expected one (--prompt-file: one prompt per segment)")
        if args.num_segments is not None:
            raise ValueError("--num-segments with --prompt-file: the file's lines give the segments")
    elif not args.prompt and mode != "refine":
        raise ValueError(f"--prompt is required with --mode {mode}")
    need = {"i2v": "image", "continue": "video", "refine": "video"}
    if mode in need and getattr(args, need[mode]) is None:
        raise ValueError(f"--mode {mode} needs --{need[mode]}")
    if args.refine and mode == "refine":
        raise ValueError("--refine with --mode refine: the refine mode already refines")
    for dest in ("image", "video", "cond_video", "prompt_file"):
        value = getattr(args, dest)
        if value is not None and not Path(value).is_file():
            raise ValueError(f"{_flag(dest)}={value!r}: no such file")
    bsa_values = _given(args, ("bsa_sparsity", "bsa_cdf_threshold", "bsa_chunk_q", "bsa_chunk_k"))
    refines = bool(args.refine) or mode == "refine"
    if bsa_values and (args.bsa is False or (args.bsa is None and not refines)):
        why = "--no-bsa" if args.bsa is False else f"--mode {mode} runs dense unless --bsa (or --refine) is given"
        raise ValueError(f"{', '.join(bsa_values)}: BSA is off in this run ({why}); add --bsa")
    if (args.height is None) != (args.width is None):
        raise ValueError(f"--height={args.height}, --width={args.width}: give both or neither")
    for dest, multiple in (("height", 16), ("width", 16), ("refine_height", 64), ("refine_width", 64)):
        value = getattr(args, dest)
        if value is not None and value % multiple:
            raise ValueError(f"{_flag(dest)}={value}; expected a multiple of {multiple}")
    if args.num_frames is not None and (args.num_frames - 1) % 4:
        raise ValueError(f"--num-frames={args.num_frames}; expected 1 + 4k frames (e.g. 93)")
    if args.num_cond_frames is not None and mode in ("continue", "long") and (args.num_cond_frames - 1) % 4:
        raise ValueError(f"--num-cond-frames={args.num_cond_frames}; expected 1 + 4k frames (e.g. 13)")


def read_prompt_file(path: str) -> list[str]:
    """--prompt-file: one prompt per line (UTF-8); blank lines and lines starting with '#' are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompt-file={path!r}: cannot read it as UTF-8 text ({e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(prompts) < 1:
        raise ValueError(f"--prompt-file={path!r}: no prompts in it; expected one prompt per line")
    return prompts


def generate_longcat(args: argparse.Namespace) -> list[Path]:
    """One LongCat-Video run from parsed options; returns the written video paths."""
    from jaxvid import video as video_io
    from jaxvid.models.dtypes import resolve_dtype
    from jaxvid.pipelines.longcat import REFINE_FPS, LongCatPipeline
    from jaxvid.pipelines.longcat_runs import LongCatRun, run_longcat_report

    t0 = time.perf_counter()
    mode = args.mode or ("long" if args.prompt_file is not None else "t2v")
    _check_longcat(args, mode)
    prompts = read_prompt_file(args.prompt_file) if args.prompt_file is not None else None
    if prompts is not None and len(prompts) < (1 if args.video else 2):
        raise ValueError(f"--prompt-file={args.prompt_file!r} has {len(prompts)} prompt(s); expected at least "
                         f"{1 if args.video else 2}: one for the first segment and one per continuation")
    mesh = device_mesh(args)
    target_fps = 15.0 if args.target_fps is None else args.target_fps
    image = video_io.load_image(args.image) if args.image else None
    source = _read_video(args.video, target_fps if mode in ("continue", "long") else None) if args.video else None
    run = LongCatRun(
        mode=mode, prompt=args.prompt or "", negative_prompt=args.negative_prompt, image=image, video=source,
        cond_video=_read_video(args.cond_video, None) if args.cond_video else None,
        refine_cond_video=_read_video(args.video, REFINE_FPS) if args.refine and mode == "continue" else None,
        num_frames=args.num_frames, num_cond_frames=args.num_cond_frames, height=args.height, width=args.width,
        resolution=args.resolution or "480p", num_inference_steps=args.steps, guidance_scale=args.guidance,
        seed=args.seed, max_sequence_length=args.max_sequence_length or 512, distill=bool(args.distill),
        use_kv_cache=not args.no_kv_cache, enhance_hf=not args.no_enhance_hf, num_segments=args.num_segments or 11,
        refine=bool(args.refine), refine_steps=args.refine_steps or 50, refine_height=args.refine_height,
        refine_width=args.refine_width, spatial_refine_only=bool(args.spatial_refine_only),
        prompts=prompts, bsa=args.bsa, bsa_sparsity=args.bsa_sparsity, bsa_cdf_threshold=args.bsa_cdf_threshold,
        bsa_chunk_q=args.bsa_chunk_q, bsa_chunk_k=args.bsa_chunk_k)
    dtype = resolve_dtype(args.dtype or _default_dtype(False), "--dtype")
    pipe = LongCatPipeline.from_pretrained(args.model, dtype=dtype, progress=not args.no_progress,
                                           weights=args.weights, offload=args.offload)
    pipe.use_mesh(mesh, fsdp=bool(args.fsdp))
    if args.attention_precision is not None:
        pipe.dit.set_attention_precision(args.attention_precision)
    outputs, attention = run_longcat_report(pipe, run)
    output = Path(args.output)
    written = []
    for name, path in (("video", output), ("refined", output.with_name(output.stem + "_refine" + output.suffix))):
        if name in outputs:
            frames, fps = outputs[name].frames[0], args.fps or outputs[name].fps
            written.append(_save(frames, path, fps))
            log.info("wrote %s: %d frames %dx%d at %d fps | attention: %s", written[-1], frames.shape[0],
                     frames.shape[1], frames.shape[2], fps, attention[name])
    log.info("done in %.1f s", time.perf_counter() - t0)
    _log_peak_memory()
    return written


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def generate(args: argparse.Namespace) -> list[Path]:
    """Run one generation from parsed options (checked first); returns the written video paths."""
    from jaxvid.compile_cache import enable_compile_cache

    check_numbers(args)
    check_output(args.output)
    enable_compile_cache(args.compile_cache, enabled=not args.no_compile_cache)
    if args.model is not None:
        from jaxvid.pipelines.longcat import is_longcat_folder

        args.model = str(resolve_model_option(args.model))
        if is_longcat_folder(args.model):
            return generate_longcat(args)
    return [generate_cogvideox(args)]


def resolve_model_option(model: str) -> Path:
    """--model: a folder as it is, or a model id's snapshot in the local Hugging Face cache (no
    network); ValueError naming --model and the download command when it is not there."""
    from jaxvid.hub import looks_like_repo_id, resolve_model_path

    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    if not looks_like_repo_id(model):
        raise ValueError(f"--model={model!r}: no such folder (nor a model id like THUDM/CogVideoX-5b)")
    try:
        return resolve_model_path(model)
    except FileNotFoundError as e:  # ModelNotCachedError: its message names the download command
        raise ValueError(f"--model={model!r}: {e}") from None


def run_generate(args: argparse.Namespace) -> int:
    """The subcommand's handler: 0 on success, 2 with one clear error line on bad input, 1 when the
    video could not be written (the frames are kept and the message says where)."""
    try:
        generate(args)
    except ValueError as e:
        log.error("%s", str(e).replace("\n", " "))
        return 2
    except OutputError as e:
        log.error("%s", e)
        return 1
    return 0

