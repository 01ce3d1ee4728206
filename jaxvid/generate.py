"""`jaxvid generate`: prompt (and image or video) -> video file, with CogVideoX or LongCat-Video.

    jaxvid generate                                   # embedded tiny random pipeline, writes out.mp4
    jaxvid generate --model CogVideoX-5b --prompt "A panda playing guitar" --dtype bf16 --output panda.mp4
    jaxvid generate --model CogVideoX-5b-I2V --image first.png --prompt "..." --attention radial
    jaxvid generate --model LongCat-Video --mode t2v|i2v|continue|long|refine --prompt "..."

Without --model the embedded tiny default runs: a random tiny CogVideoX pipeline written on the
fly (jaxvid.tiny, no download), tiny shapes and few steps; it finishes in seconds on a CPU.
Frame count and resolution are checked against the model's configs before any weight is loaded.
A LongCat-Video folder (dit/ holds a LongCat DiT) is handed to jaxvid.pipelines.longcat_cli.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from jaxvid.pipelines.longcat_cli import add_longcat_arguments, run_longcat

log = logging.getLogger("jaxvid.generate")

DEFAULT_STEPS = 50
# CogVideoX 1.5's model card size (height, width); its config's sample size is the RoPE grid's maximum.
MODEL_1_5_SIZE = (768, 1360)
ATTENTION_CHOICES = ("dense", "radial")
DTYPE_CHOICES = ("bf16", "fp32", "fp16")


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `generate` subcommand (its handler is `args.func`) on an argparse subparsers object."""
    p = subparsers.add_parser(
        "generate",
        help="generate a video with CogVideoX or LongCat-Video",
        description="Generate a video with a CogVideoX pipeline folder (diffusers layout, or jaxvid-convert'ed) "
        "or a LongCat-Video folder (--mode t2v|i2v|continue|long|refine). "
        "Without --model, runs an embedded tiny random CogVideoX pipeline (no download) and writes a video.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None,
                   help="CogVideoX pipeline or LongCat-Video folder (default: the embedded tiny CogVideoX pipeline)")
    p.add_argument("--prompt", default=None, help="text prompt (required with --model)")
    p.add_argument("--negative-prompt", default=None,
                   help="negative prompt for classifier-free guidance (CogVideoX default ''; LongCat: upstream's)")
    p.add_argument("--image", default=None, help="first frame for image-to-video (I2V) models")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames, 1 + 4k (default: the model's, 49 for CogVideoX, 81 for 1.5, 9 for tiny)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: 480; 768 for 1.5; 32 for tiny)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: 720; 1360 for 1.5; 32 for tiny)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 4 for tiny)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, <= 1: no CFG (default 6.0 CogVideoX, 4.0 LongCat)")
    p.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX's dynamic (cosine-ramped) guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=("ddim", "dpm"), default=None,
                   help="override the folder's scheduler (default: as in scheduler/scheduler_config.json)")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="dense")
    p.add_argument("--dense-layers", type=int, default=1, help="radial: first N layers stay dense")
    p.add_argument("--dense-timesteps", type=int, default=12, help="radial: first N steps run fully dense")
    p.add_argument("--decay-factor", type=float, default=1.0, help="radial: window decay factor")
    p.add_argument("--block-size", type=int, choices=(64, 128), default=128, help="radial: mask block size")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="weights and compute dtype (default: bf16 on GPU, fp32 on CPU and for the tiny model)")
    p.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                   help="decode in overlapping spatial tiles as diffusers' enable_tiling() (default: on with --model)")
    p.add_argument("--fps", type=int, default=None, help="frames per second of the file (default 8; 16 for CogVideoX 1.5)")
    p.add_argument("--output", default="out.mp4", help="video file (.mp4, or .gif)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_longcat_arguments(p)  # only adds the LongCat options the parser does not have yet
    p.set_defaults(func=run_generate)
    return p


def attention_plan(args: argparse.Namespace) -> Any:
    """The AttentionPlan the options ask for (None = dense everywhere)."""
    from jaxvid.attention.plan import AttentionPlan

    if args.attention == "dense":
        return None
    for name in ("dense_layers", "dense_timesteps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}; expected an int >= 0")
    if not args.decay_factor > 0:
        raise ValueError(f"--decay-factor={args.decay_factor}; expected a number > 0")
    return AttentionPlan.radial_cogvideox(
        decay_factor=args.decay_factor, block_size=args.block_size, dense_layers=args.dense_layers,
        dense_timesteps=args.dense_timesteps)


def _video_defaults(tcfg: Any, vcfg: Any) -> dict[str, int]:
    """Frames and size when not given: the transformer's sample size, as diffusers' pipelines default.

    CogVideoX 1.5 configs give the RoPE grid's maximum (300 x 300 latents) instead of a size to
    generate at, so those are capped at the model card's 768 x 1360.
    """
    s = vcfg.spatial_compression
    height, width = tcfg.sample_height * s, tcfg.sample_width * s
    if tcfg.patch_size_t is not None:
        height, width = min(height, MODEL_1_5_SIZE[0]), min(width, MODEL_1_5_SIZE[1])
    return {"num_frames": tcfg.sample_frames, "height": height, "width": width, "steps": DEFAULT_STEPS}


def _settings(args: argparse.Namespace, tiny: bool, tcfg: Any, vcfg: Any) -> dict[str, Any]:
    from jaxvid.tiny import TinyDefaults

    defaults = _video_defaults(tcfg, vcfg)
    prompt = args.prompt
    if tiny:
        defaults["steps"] = TinyDefaults().num_inference_steps
        prompt = prompt if prompt is not None else TinyDefaults().prompt
    out = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    if out["steps"] < 1:
        raise ValueError(f"--steps={out['steps']}; expected a positive int")
    out["prompt"] = prompt
    return out


def _check_request(model_dir: Path, args: argparse.Namespace, s: dict[str, Any], tcfg: Any, vcfg: Any,
                   i2v: bool) -> None:
    """Fail fast, before weights load: shapes against the configs, --image against the model kind."""
    from jaxvid.pipelines.cogvideox import check_video_shape

    try:
        check_video_shape(tcfg, vcfg, s["num_frames"], s["height"], s["width"])
    except ValueError as e:  # name the CLI options, not the Python arguments
        msg = str(e)
        for name, flag in (("num_frames", "--num-frames"), ("height", "--height"), ("width", "--width")):
            msg = msg.replace(f"{name}=", f"{flag}=")
        raise ValueError(msg) from None
    if i2v and args.image is None:
        raise ValueError(f"--model {model_dir} is an image-to-video model: pass the first frame with --image IMG")
    if not i2v and args.image is not None:
        raise ValueError(f"--image was given, but --model {model_dir} is a text-to-video model")
    if args.image is not None and not Path(args.image).is_file():
        raise ValueError(f"--image={args.image!r}: no such file")


def _default_dtype(tiny: bool) -> str:
    import jax

    return "fp32" if tiny or jax.default_backend() == "cpu" else "bf16"


def generate(args: argparse.Namespace) -> Path:
    """Run one generation from parsed options; returns the path of the written video."""
    from jaxvid import video
    from jaxvid.pipelines.cogvideox import CogVideoXPipeline, read_pipeline_configs
    from jaxvid.pipelines.longcat import is_longcat_folder

    t0 = time.perf_counter()
    tiny = args.model is None
    if not tiny and is_longcat_folder(args.model):
        return run_longcat(args)[-1]
    if getattr(args, "mode", "t2v") != "t2v":
        raise ValueError(f"--mode={args.mode!r} is for LongCat-Video models; CogVideoX generates from text (t2v), "
                         "or from --image with an I2V checkpoint")
    video.check_output(args.output, 8 if args.fps is None else args.fps, names=("--output", "--fps"))
    guidance = 6.0 if args.guidance is None else args.guidance
    negative_prompt = "" if args.negative_prompt is None else args.negative_prompt
    if not tiny and not args.prompt:
        raise ValueError("--prompt is required with --model")
    plan = attention_plan(args)
    with tempfile.TemporaryDirectory(prefix="jaxvid-tiny-") as tmp:
        if tiny:
            from jaxvid.tiny import write_tiny_pipeline

            model_dir = write_tiny_pipeline(Path(tmp) / "tiny-cogvideox", seed=0)
            log.info("no --model: running the embedded tiny random CogVideoX pipeline (random weights, noise-like video)")
        else:
            model_dir = Path(args.model)
            if not model_dir.is_dir():
                raise ValueError(f"--model={args.model!r}: no such folder")
        tcfg, vcfg, i2v = read_pipeline_configs(model_dir)
        settings = _settings(args, tiny, tcfg, vcfg)
        _check_request(model_dir, args, settings, tcfg, vcfg, i2v)
        image = video.load_image(args.image) if args.image is not None else None
        pipe = CogVideoXPipeline.from_pretrained(model_dir, dtype=args.dtype or _default_dtype(tiny),
                                                 scheduler=args.scheduler)
        if args.vae_tiling if args.vae_tiling is not None else not tiny:
            pipe.enable_vae_tiling()
        # inside the `with`: the tiny folder (its tokenizer) must live until the prompt is encoded
        frames = pipe(
            settings["prompt"], negative_prompt, num_frames=settings["num_frames"], height=settings["height"],
            width=settings["width"], num_inference_steps=settings["steps"], guidance_scale=guidance,
            use_dynamic_cfg=args.dynamic_cfg, seed=args.seed, image=image, attention=plan,
            progress=not args.no_progress,
        )
    fps = args.fps or (16 if tcfg.patch_size_t is not None else 8)
    path = video.save(frames, args.output, fps=fps)
    t = pipe.last_timings
    log.info(
        "wrote %s: %d frames %dx%d at %d fps | compile %.2f s, %.3f s/step x %d steps, decode %.2f s, total %.2f s",
        path, frames.shape[0], frames.shape[1], frames.shape[2], fps, t["compile"], t["per_step"], settings["steps"],
        t.get("decode", 0.0), time.perf_counter() - t0,
    )
    return path


def run_generate(args: argparse.Namespace) -> int:
    """The subcommand's handler: 0 on success, 2 with one clear error line on bad input."""
    try:
        generate(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    return 0
