"""`jaxvid generate --model DIR --mode t2v|i2v|continue|long|refine ...` for LongCat-Video folders.

What each mode runs is what upstream's run_demo_*.py scripts run:

    t2v       generate_t2v (480x832, 93 frames, 50 steps, guidance 4)             run_demo_text_to_video
    i2v       generate_i2v from --image (480p bucket of the image)                run_demo_image_to_video
    continue  generate_vc from the last --num-cond-frames of --video, KV cache    run_demo_video_continuation
    long      t2v (or --video), then --num-segments continuations                 run_demo_long_video
    refine    generate_refine of --video (a 480p result) to 720p, 2x frames       the demos' refinement step

--distill swaps in the cfg_step LoRA, 16 steps, guidance 1 (and no enhance_hf); --refine runs the
720p refinement (refinement LoRA, BSA on) on the result of t2v / i2v / continue / long and writes
it beside --output as <name>_refine.mp4. Frames go to the file as upstream writes them
(`(x * 255).astype(uint8)`), at 15 fps (30 fps for refined videos with doubled frames).

`add_longcat_arguments(parser)` adds only the options the parser does not have yet, so it can share
one `generate` parser with CogVideoX's options (--model, --prompt, --output, ...); options whose
meaning depends on the model take `None` as "the LongCat default".
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("jaxvid.generate.longcat")

MODES = ("t2v", "i2v", "continue", "long", "refine")
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
T2V_SIZE = (480, 832)
DEFAULT_FRAMES = 93
DEFAULT_STEPS, DISTILL_STEPS = 50, 16
DEFAULT_GUIDANCE, DISTILL_GUIDANCE = 4.0, 1.0
FPS, REFINE_FPS = 15, 30


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    if flag not in parser._option_string_actions:  # shared with another model's generate options
        parser.add_argument(flag, **kwargs)


def add_longcat_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the LongCat-Video generate options (those not already on `parser`); returns the parser."""
    _add(parser, "--model", required=True, help="LongCat-Video folder (dit/, text_encoder/, vae/, tokenizer/, "
         "scheduler/, lora/), upstream's or jaxvid-convert'ed")
    _add(parser, "--mode", choices=MODES, default="t2v", help="what to generate (LongCat-Video models)")
    _add(parser, "--prompt", default=None, help="text prompt")
    _add(parser, "--negative-prompt", default=None,
         help="negative prompt (LongCat default: the one upstream's demos use; '' for none)")
    _add(parser, "--image", default=None, help="i2v: the first frame; refine: a conditioning image")
    _add(parser, "--video", default=None, help="continue / long: the video to continue; refine: the stage-1 video")
    _add(parser, "--cond-video", default=None, help="refine: a video whose last --num-cond-frames frames stay clean")
    _add(parser, "--num-frames", type=int, default=None, help="frames per segment, 1 + 4k (LongCat default 93)")
    _add(parser, "--num-cond-frames", type=int, default=None,
         help="continue / long: conditioning frames (default 13); refine with --cond-video: (default 26)")
    _add(parser, "--height", type=int, default=None, help="pixels (t2v default 480; else the aspect-ratio bucket)")
    _add(parser, "--width", type=int, default=None, help="pixels (t2v default 832; else the aspect-ratio bucket)")
    _add(parser, "--resolution", choices=("480p", "720p"), default="480p", help="i2v / continue: bucket table")
    _add(parser, "--steps", type=int, default=None, help="denoising steps (LongCat default 50; 16 with --distill)")
    _add(parser, "--guidance", type=float, default=None, help="guidance scale (LongCat default 4; 1 with --distill)")
    _add(parser, "--distill", action="store_true", help="cfg_step LoRA: 16 steps, guidance 1, distilled schedule")
    _add(parser, "--refine", action="store_true", help="also refine the result to 720p (refinement LoRA, BSA)")
    _add(parser, "--refine-steps", type=int, default=50, help="refinement steps (before t_thresh cuts them)")
    _add(parser, "--refine-height", type=int, default=None, help="--refine: pixels (default: the 720p bucket)")
    _add(parser, "--refine-width", type=int, default=None, help="--refine: pixels (default: the 720p bucket)")
    _add(parser, "--spatial-refine-only", action="store_true", help="refine: keep the frame count (no 2x)")
    _add(parser, "--num-segments", type=int, default=11, help="long: continuation segments after the first")
    _add(parser, "--target-fps", type=float, default=15.0,
         help="continue / long: subsample --video to about this frame rate first (upstream: 15)")
    _add(parser, "--no-kv-cache", action="store_true", help="continue / long: recompute the clean frames each step")
    _add(parser, "--no-enhance-hf", action="store_true", help="continue / long: keep the plain schedule")
    _add(parser, "--bsa-sparsity", type=float, default=None, help="refine: BSA sparsity (default: the config's)")
    _add(parser, "--max-sequence-length", type=int, default=512, help="text tokens")
    _add(parser, "--seed", type=int, default=0)
    _add(parser, "--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    _add(parser, "--fps", type=int, default=None, help="frames per second of the file (default 15; refined 30)")
    _add(parser, "--output", default="out.mp4", help="video file (.mp4, or .gif)")
    _add(parser, "--no-progress", action="store_true", help="no progress bar")
    return parser


# ---------------------------------------------------------------------------------------------


def _dtype(args: argparse.Namespace):
    import jax
    import jax.numpy as jnp

    name = args.dtype or ("fp32" if jax.default_backend() == "cpu" else "bf16")
    return jnp.dtype(DTYPES[name])


def _read_video(path: str, target_fps: float | None) -> np.ndarray:
    """uint8 [F, H, W, 3], every stride-th frame so the rate is about target_fps (run_demo's stride)."""
    import imageio.v2 as imageio

    from jaxvid import video

    if not Path(path).is_file():
        raise ValueError(f"--video / --cond-video={path!r}: no such file")
    frames = video.load(path)
    stride = 1
    if target_fps:
        try:
            fps = float(imageio.get_reader(path).get_meta_data().get("fps") or 0)
        except (OSError, RuntimeError, ValueError):
            fps = 0.0
        stride = max(1, round(fps / target_fps)) if fps else 1
    return frames[::stride]


def _resize(frames: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """PIL bicubic resize of uint8 frames, as the demos put outputs back at the input's size."""
    from PIL import Image

    if frames.shape[1:3] == tuple(size_hw):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize(size_hw[::-1], Image.Resampling.BICUBIC)) for f in frames])


def _check(args: argparse.Namespace) -> None:
    from jaxvid import video

    video.check_output(args.output, FPS if args.fps is None else args.fps, names=("--output", "--fps"))
    if not args.prompt and args.mode != "refine":
        raise ValueError(f"--prompt is required with --mode {args.mode}")
    need = {"i2v": "image", "continue": "video", "refine": "video"}
    if args.mode in need and getattr(args, need[args.mode]) is None:
        raise ValueError(f"--mode {args.mode} needs --{need[args.mode]}")
    for name in ("image", "video", "cond_video"):
        value = getattr(args, name, None)
        if value is not None and not Path(value).is_file():
            raise ValueError(f"--{name.replace('_', '-')}={value!r}: no such file")
    for name in ("steps", "num_frames", "num_segments", "refine_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value}: expected a positive int")


def _save(frames: np.ndarray, path: Path, fps: int) -> Path:
    from jaxvid import video

    out = video.save(frames, path, fps=fps)
    log.info("wrote %s: %d frames %dx%d at %d fps", out, frames.shape[0], frames.shape[1], frames.shape[2], fps)
    return out


def _refine_setup(pipe: Any, args: argparse.Namespace) -> None:
    from jaxvid.pipelines.longcat import REFINEMENT_LORA

    pipe.enable_loras([REFINEMENT_LORA])
    overrides = {} if args.bsa_sparsity is None else {"sparsity": args.bsa_sparsity}
    pipe.enable_bsa(**overrides)


def run_longcat(args: argparse.Namespace) -> list[Path]:
    """Run one LongCat-Video generation from parsed options; returns the written video paths."""
    from jaxvid import video as video_io
    from jaxvid.pipelines.longcat import (
        CFG_STEP_LORA,
        DEFAULT_NEGATIVE_PROMPT,
        LongCatPipeline,
        frames_to_uint8,
        is_longcat_folder,
    )

    t0 = time.perf_counter()
    _check(args)
    if not is_longcat_folder(args.model):
        raise ValueError(f"--model={args.model!r}: not a LongCat-Video folder (expected dit/ with a "
                         "LongCatVideoTransformer3DModel config)")
    pipe = LongCatPipeline.from_pretrained(args.model, dtype=_dtype(args), progress=not args.no_progress)
    negative = DEFAULT_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
    steps = args.steps or (DISTILL_STEPS if args.distill else DEFAULT_STEPS)
    guidance = args.guidance if args.guidance is not None else (DISTILL_GUIDANCE if args.distill else DEFAULT_GUIDANCE)
    num_frames = args.num_frames or DEFAULT_FRAMES
    common = dict(num_inference_steps=steps, use_distill=args.distill, guidance_scale=guidance, seed=args.seed,
                  max_sequence_length=args.max_sequence_length)
    size = {} if args.height is None and args.width is None else {"height": args.height, "width": args.width}
    vc = dict(use_kv_cache=not args.no_kv_cache, enhance_hf=not (args.no_enhance_hf or args.distill))
    ncf = args.num_cond_frames or 13
    output = Path(args.output)
    written: list[Path] = []
    if args.distill:
        pipe.enable_loras([CFG_STEP_LORA])

    image = video_io.load_image(args.image) if args.image else None
    source = _read_video(args.video, args.target_fps if args.mode in ("continue", "long") else None) \
        if args.video else None
    stage1: np.ndarray
    if args.mode == "t2v":
        h, w = (args.height or T2V_SIZE[0], args.width or T2V_SIZE[1])
        out = pipe.generate_t2v(args.prompt, negative, height=h, width=w, num_frames=num_frames, **common)
        stage1 = frames_to_uint8(out.frames[0])
        written.append(_save(stage1, output, args.fps or FPS))
    elif args.mode == "i2v":
        out = pipe.generate_i2v(image, args.prompt, negative, resolution=args.resolution, num_frames=num_frames,
                                **size, **common)
        stage1 = frames_to_uint8(out.frames[0])
        written.append(_save(_resize(stage1, image.shape[:2]), output, args.fps or FPS))
    elif args.mode == "continue":
        out = pipe.generate_vc(source, args.prompt, negative, resolution=args.resolution, num_frames=num_frames,
                               num_cond_frames=ncf, **size, **common, **vc)
        stage1 = frames_to_uint8(out.frames[0])
        full = np.concatenate([source, _resize(stage1, source.shape[1:3])[ncf:]])
        written.append(_save(full, output, args.fps or FPS))
    elif args.mode == "long":
        h, w = (args.height or T2V_SIZE[0], args.width or T2V_SIZE[1])
        stage1 = pipe.generate_long(args.prompt, negative, num_segments=args.num_segments, video=source,
                                    num_frames=num_frames, num_cond_frames=ncf, height=h, width=w, **common, **vc)
        written.append(_save(stage1, output, args.fps or FPS))
    else:  # refine
        _refine_setup(pipe, args)
        cond_video = _read_video(args.cond_video, None) if args.cond_video else None
        n_cond = 1 if image is not None else ((args.num_cond_frames or 2 * 13) if cond_video is not None else 0)
        out = pipe.generate_refine(args.prompt or "", source, image=image, video=cond_video, num_cond_frames=n_cond,
                                   num_inference_steps=args.steps or DEFAULT_STEPS,
                                   spatial_refine_only=args.spatial_refine_only, seed=args.seed, **size,
                                   max_sequence_length=args.max_sequence_length)
        fps = args.fps or (FPS if args.spatial_refine_only else REFINE_FPS)
        written.append(_save(frames_to_uint8(out.frames[0]), output, fps))
        log.info("done in %.1f s", time.perf_counter() - t0)
        return written

    if args.refine:
        pipe.disable_all_loras()
        _refine_setup(pipe, args)
        kw = dict(num_inference_steps=args.refine_steps, spatial_refine_only=args.spatial_refine_only,
                  seed=args.seed, max_sequence_length=args.max_sequence_length, height=args.refine_height,
                  width=args.refine_width)
        if args.mode == "long":
            refined = pipe.refine_long(stage1, "", num_frames=num_frames, num_cond_frames=ncf, **kw)
        elif args.mode == "i2v":
            refined = frames_to_uint8(pipe.generate_refine(args.prompt, stage1, image=image, num_cond_frames=1,
                                                           **kw).frames[0])
        elif args.mode == "continue":
            # run_demo_video_continuation: the source at 30 fps conditions 2 * num_cond_frames frames
            cond = _read_video(args.video, REFINE_FPS)
            n_cond = ncf if args.spatial_refine_only else 2 * ncf
            refined = frames_to_uint8(pipe.generate_refine(args.prompt, stage1, video=cond, num_cond_frames=n_cond,
                                                           **kw).frames[0])
            refined = np.concatenate([_resize(cond, refined.shape[1:3]), refined[n_cond:]])
        else:
            refined = frames_to_uint8(pipe.generate_refine(args.prompt, stage1, **kw).frames[0])
        path = output.with_name(output.stem + "_refine" + output.suffix)
        written.append(_save(refined, path, args.fps or (FPS if args.spatial_refine_only else REFINE_FPS)))
    log.info("done in %.1f s", time.perf_counter() - t0)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jaxvid.pipelines.longcat_cli --model DIR --mode ...`: 0 on success, 2 on bad input."""
    parser = add_longcat_arguments(argparse.ArgumentParser(prog="jaxvid-longcat",
                                                           description="LongCat-Video generation in JAX."))
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    try:
        run_longcat(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
