"""LongCat-Video's demo runs (upstream's run_demo_*.py scripts) as one Python call.

    run = LongCatRun(mode="continue", prompt="...", video=frames, refine=True)
    outputs = run_longcat(pipe, run)          # {"video": VideoOutput, "refined": VideoOutput}
    video.save(outputs["video"].frames[0], "out.mp4", fps=outputs["video"].fps)

What each mode runs is what upstream's scripts run (frames as they write them, uint8 truncated):

    t2v       generate_t2v (480x832, 93 frames, 50 steps, guidance 4)             run_demo_text_to_video
    i2v       generate_i2v from `image`, the result resized back to the image's size   run_demo_image_to_video
    continue  generate_vc from the last num_cond_frames of `video`, KV cache; the result follows the
              source video (resized to it)                                         run_demo_video_continuation
    long      t2v (or `video`), then num_segments continuations                    run_demo_long_video
    refine    generate_refine of `video` (a 480p result) to 720p, 2x frames        the demos' refinement step

distill swaps in the cfg_step LoRA (16 steps, guidance 1, no enhance_hf); refine=True also runs the
720p refinement (refinement LoRA, BSA on) on the result of t2v / i2v / continue / long.
`prompts=[...]` with mode "long" is upstream's interactive demo (run_demo_interactive_video): one
prompt per segment, each segment continuing from the last num_cond_frames frames of the one before.

BSA (block sparse attention) in every mode, named as FastVideo names its flags: bsa=None keeps
upstream's defaults (stage 1 dense, refinement BSA), True turns it on everywhere, False off
everywhere. Its parameters come by resolution (`LongCatPipeline.enable_bsa_by_resolution`: the
config's per-resolution table or jaxvid.attention.presets.DEFAULT_BSA_TABLE); bsa_sparsity,
bsa_cdf_threshold, bsa_chunk_q / bsa_chunk_k replace fields of the chosen row.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from jaxvid.pipelines.longcat import (
    CFG_STEP_LORA,
    DEFAULT_NEGATIVE_PROMPT,
    FPS,
    REFINE_FPS,
    REFINEMENT_LORA,
    LongCatPipeline,
    resize_frames,
)
from jaxvid.pipelines.output import VideoOutput

__all__ = ["MODES", "LongCatRun", "run_longcat", "run_longcat_report", "T2V_SIZE", "DEFAULT_FRAMES", "DEFAULT_STEPS", "DISTILL_STEPS",
           "DEFAULT_GUIDANCE", "DISTILL_GUIDANCE", "DEFAULT_COND_FRAMES", "DEFAULT_REFINE_COND_FRAMES"]

log = logging.getLogger(__name__)

MODES = ("t2v", "i2v", "continue", "long", "refine")
T2V_SIZE = (480, 832)
DEFAULT_FRAMES = 93
DEFAULT_STEPS, DISTILL_STEPS = 50, 16
DEFAULT_GUIDANCE, DISTILL_GUIDANCE = 4.0, 1.0
DEFAULT_COND_FRAMES = 13  # continue / long
DEFAULT_REFINE_COND_FRAMES = 2 * 13  # refine with a conditioning video (at the refined frame rate)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongCatRun:
    """One demo run. Frames are uint8 [F, H, W, 3], images uint8 [H, W, 3]; None = the mode's default.

    video: continue / long: the video to continue (already at the target frame rate); refine: the
    stage-1 video. cond_video: refine: a video whose last num_cond_frames frames stay clean.
    refine_cond_video: continue + refine: the source video at the refined frame rate (30 fps).
    prompts: mode "long" only: one prompt per segment (the first for the t2v segment, or for the
    first continuation when `video` is given); replaces `prompt` and `num_segments`.
    bsa: None = upstream's defaults (stage 1 dense, refinement with BSA), True = BSA in every stage,
    False = none. bsa_sparsity / bsa_cdf_threshold / bsa_chunk_q / bsa_chunk_k ((t, h, w) token
    chunks): explicit values over the per-resolution row, for every stage that runs BSA.
    """

    mode: str = "t2v"
    prompt: str = ""
    negative_prompt: str | None = None
    image: np.ndarray | None = None
    video: np.ndarray | None = None
    cond_video: np.ndarray | None = None
    refine_cond_video: np.ndarray | None = None
    num_frames: int | None = None
    num_cond_frames: int | None = None
    height: int | None = None
    width: int | None = None
    resolution: str = "480p"
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    max_sequence_length: int = 512
    distill: bool = False
    use_kv_cache: bool = True
    enhance_hf: bool = True
    num_segments: int = 11
    refine: bool = False
    refine_steps: int = 50
    refine_height: int | None = None
    refine_width: int | None = None
    spatial_refine_only: bool = False
    prompts: tuple[str, ...] | None = None
    bsa: bool | None = None
    bsa_sparsity: float | None = None
    bsa_cdf_threshold: float | None = None
    bsa_chunk_q: tuple[int, int, int] | None = None
    bsa_chunk_k: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; expected one of {MODES}")
        need = {"i2v": "image", "continue": "video", "refine": "video"}
        if self.mode in need and getattr(self, need[self.mode]) is None:
            raise ValueError(f"mode={self.mode!r} needs {need[self.mode]}")
        if self.refine and self.mode == "refine":
            raise ValueError("refine=True with mode='refine': the refine mode already refines")
        if self.prompts is not None:
            if self.mode != "long":
                raise ValueError(f"prompts with mode={self.mode!r}: one prompt per segment is for mode 'long'")
            if isinstance(self.prompts, str) or not all(isinstance(p, str) for p in self.prompts):
                raise ValueError(f"prompts={self.prompts!r}; expected a list of strings, one per segment")
            object.__setattr__(self, "prompts", tuple(self.prompts))
            need = 1 if self.video is not None else 2
            if len(self.prompts) < need:
                raise ValueError(f"prompts has {len(self.prompts)} prompt(s); expected at least {need}: one for the "
                                 f"{'first continuation' if need == 1 else 't2v segment'} and one per continuation")
        if self.bsa not in (None, True, False):
            raise ValueError(f"bsa={self.bsa!r}; expected None (upstream's defaults), True or False")
        given = [name for name in ("bsa_sparsity", "bsa_cdf_threshold", "bsa_chunk_q", "bsa_chunk_k")
                 if getattr(self, name) is not None]
        refines = self.refine or self.mode == "refine"
        if given and (self.bsa is False or (self.bsa is None and not refines)):
            raise ValueError(f"{', '.join(given)} given but BSA is off in this run (bsa={self.bsa}, "
                             f"mode={self.mode!r}{', no refinement' if not refines else ''}); pass bsa=True")

    def bsa_values(self) -> dict[str, Any]:
        """The explicit BSA values, as `LongCatPipeline.enable_bsa_by_resolution` takes them."""
        return {k: v for k, v in dict(sparsity=self.bsa_sparsity, cdf_threshold=self.bsa_cdf_threshold,
                                      chunk_3d_shape_q=self.bsa_chunk_q,
                                      chunk_3d_shape_k=self.bsa_chunk_k).items() if v is not None}


def _set_bsa(pipe: LongCatPipeline, run: LongCatRun, on: bool) -> None:
    if on:
        pipe.enable_bsa_by_resolution(**run.bsa_values())
    else:
        pipe.disable_bsa()


def _refine_setup(pipe: LongCatPipeline, run: LongCatRun) -> None:
    pipe.enable_loras([REFINEMENT_LORA])
    _set_bsa(pipe, run, run.bsa is not False)  # upstream refines with BSA on


def run_longcat(pipe: LongCatPipeline, run: LongCatRun) -> dict[str, VideoOutput]:
    """Run `run` on `pipe`: {"video": the result as upstream saves it} plus {"refined": ...} with refine.

    Leaves the pipeline's LoRAs and attention as the run set them (upstream's scripts do the same).
    """
    return run_longcat_report(pipe, run)[0]


def run_longcat_report(pipe: LongCatPipeline, run: LongCatRun) -> tuple[dict[str, VideoOutput], dict[str, str]]:
    """`run_longcat`, and for each output the attention its last denoising ran (`pipe.last_attention`:
    dense, or BSA with its parameters and the resolution row that chose them)."""
    return _run(pipe, run)


def _run(pipe: LongCatPipeline, run: LongCatRun) -> tuple[dict[str, VideoOutput], dict[str, str]]:
    negative = DEFAULT_NEGATIVE_PROMPT if run.negative_prompt is None else run.negative_prompt
    steps = run.num_inference_steps or (DISTILL_STEPS if run.distill else DEFAULT_STEPS)
    guidance = run.guidance_scale if run.guidance_scale is not None else (
        DISTILL_GUIDANCE if run.distill else DEFAULT_GUIDANCE)
    num_frames = run.num_frames or DEFAULT_FRAMES
    common = dict(num_inference_steps=steps, use_distill=run.distill, guidance_scale=guidance, seed=run.seed,
                  max_sequence_length=run.max_sequence_length)
    size = {} if run.height is None and run.width is None else {"height": run.height, "width": run.width}
    vc = dict(use_kv_cache=run.use_kv_cache, enhance_hf=run.enhance_hf and not run.distill)
    ncf = run.num_cond_frames or DEFAULT_COND_FRAMES
    refine_fps = FPS if run.spatial_refine_only else REFINE_FPS
    if run.distill:
        pipe.enable_loras([CFG_STEP_LORA])
    if run.mode != "refine":
        _set_bsa(pipe, run, run.bsa is True)

    if run.mode == "t2v":
        h, w = (run.height or T2V_SIZE[0], run.width or T2V_SIZE[1])
        out = pipe.generate_t2v(run.prompt, negative, height=h, width=w, num_frames=num_frames, **common)
        stage1, result = out.frames[0], out
    elif run.mode == "i2v":
        out = pipe.generate_i2v(run.image, run.prompt, negative, resolution=run.resolution, num_frames=num_frames,
                                **size, **common)
        stage1 = out.frames[0]
        result = VideoOutput(frames=resize_frames(stage1, run.image.shape[:2])[None], latents=out.latents, fps=FPS)
    elif run.mode == "continue":
        out = pipe.generate_vc(run.video, run.prompt, negative, resolution=run.resolution, num_frames=num_frames,
                               num_cond_frames=ncf, **size, **common, **vc)
        stage1 = out.frames[0]
        full = np.concatenate([run.video, resize_frames(stage1, run.video.shape[1:3])[ncf:]])
        result = VideoOutput(frames=full[None], latents=out.latents, fps=FPS)
    elif run.mode == "long":
        h, w = (run.height or T2V_SIZE[0], run.width or T2V_SIZE[1])
        result = pipe.generate_long(list(run.prompts) if run.prompts is not None else run.prompt, negative,
                                    num_segments=None if run.prompts is not None else run.num_segments, video=run.video,
                                    num_frames=num_frames, num_cond_frames=ncf, height=h, width=w, **common, **vc)
        stage1 = result.frames[0]
    else:  # refine
        _refine_setup(pipe, run)
        image, cond_video = run.image, run.cond_video
        n_cond = 1 if image is not None else ((run.num_cond_frames or DEFAULT_REFINE_COND_FRAMES)
                                               if cond_video is not None else 0)
        out = pipe.generate_refine(run.prompt or "", run.video, image=image, video=cond_video, num_cond_frames=n_cond,
                                   num_inference_steps=run.num_inference_steps or DEFAULT_STEPS,
                                   spatial_refine_only=run.spatial_refine_only, seed=run.seed, **size,
                                   max_sequence_length=run.max_sequence_length)
        return {"video": out}, {"video": pipe.last_attention}

    outputs, attention = {"video": result}, {"video": pipe.last_attention}
    if run.refine:
        pipe.disable_all_loras()
        _refine_setup(pipe, run)
        kw: dict[str, Any] = dict(num_inference_steps=run.refine_steps, spatial_refine_only=run.spatial_refine_only,
                                  seed=run.seed, max_sequence_length=run.max_sequence_length,
                                  height=run.refine_height, width=run.refine_width)
        if run.mode == "long":
            refined = pipe.refine_long(stage1, "", num_frames=num_frames, num_cond_frames=ncf, **kw).frames[0]
        elif run.mode == "i2v":
            refined = pipe.generate_refine(run.prompt, stage1, image=run.image, num_cond_frames=1, **kw).frames[0]
        elif run.mode == "continue":
            # run_demo_video_continuation: the source at 30 fps conditions 2 * num_cond_frames frames
            cond = run.refine_cond_video if run.refine_cond_video is not None else run.video
            n_cond = ncf if run.spatial_refine_only else 2 * ncf
            refined = pipe.generate_refine(run.prompt, stage1, video=cond, num_cond_frames=n_cond, **kw).frames[0]
            refined = np.concatenate([resize_frames(cond, refined.shape[1:3]), refined[n_cond:]])
        else:
            refined = pipe.generate_refine(run.prompt, stage1, **kw).frames[0]
        outputs["refined"] = VideoOutput(frames=refined[None], latents=None, fps=refine_fps)
        attention["refined"] = pipe.last_attention
    return outputs, attention
