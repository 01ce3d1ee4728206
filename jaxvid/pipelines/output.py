"""What every pipeline returns: one `VideoOutput`, whatever the model.

    out = pipe(prompt, ...)                  # CogVideoX;  LongCat: pipe.generate_t2v(prompt, ...)
    out.frames[0]                            # uint8 [F, H, W, 3] of the first video (diffusers' `.frames[0]`)
    video.save(out.frames[0], "out.mp4", fps=out.fps)

`output_type` as diffusers users know it: "uint8" (default) gives uint8 frames, "np" float32
frames in [0, 1] (diffusers' "np"), "latent" no decoding (frames None). The final latents are
always attached (they are on the device already; `latents` of a pipeline's own layout).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxvid.video import to_uint8_frames

__all__ = ["OUTPUT_TYPES", "VideoOutput", "check_output_type", "finish_frames"]

OUTPUT_TYPES = ("uint8", "np", "latent")


@dataclasses.dataclass(frozen=True, slots=True)
class VideoOutput:
    """frames: uint8 [B, F, H, W, 3] ("uint8"), float32 [B, F, H, W, 3] in [0, 1] ("np") or None
    ("latent"); latents: the final latents [B, ...] in the pipeline's layout; fps: the model's
    frame rate for this result; output_type: what `frames` holds.

    Batched as diffusers' outputs are: `out.frames[0]` is the first video.
    """

    frames: np.ndarray | None
    latents: Any
    fps: int
    output_type: str = "uint8"

    @property
    def video(self) -> np.ndarray:
        """The first (often the only) video's frames [F, H, W, 3]."""
        if self.frames is None:
            raise ValueError("VideoOutput.video: output_type='latent' decoded no frames")
        return self.frames[0]


def check_output_type(output_type: str) -> str:
    """Raise ValueError naming `output_type` unless it is one of OUTPUT_TYPES."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
    return output_type


def finish_frames(frames01: Any, output_type: str, *, rounding: str) -> np.ndarray:
    """Decoded float frames [B, F, H, W, 3] in [0, 1] -> what `output_type` asks for.

    rounding: "round" (CogVideoX, as diffusers' PIL output) or "truncate" (LongCat, as upstream).
    """
    frames01 = np.asarray(frames01, np.float32)
    if output_type == "np":
        return frames01
    return to_uint8_frames(frames01, value_range=(0.0, 1.0), rounding=rounding)
