"""The settings that travel together through a generation, as small frozen dataclasses.

    VideoGeometry(num_frames=49, height=480, width=720)      what video to make
    Sampling(num_inference_steps=50, guidance_scale=6.0, seed=0, max_sequence_length=226)

Pipelines keep their diffusers-style keyword arguments (`pipe(prompt, num_frames=..., seed=...)`)
and build these once at the top of a call; from there the helpers, the chained modes (LongCat's
long video and its refinement windows) and the CLI pass them whole. Each checks its values when
built, so a bad number fails before anything is loaded or compiled.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["Sampling", "VideoGeometry", "check_positive_int"]


def check_positive_int(name: str, value: Any) -> int:
    """`value` as an int; ValueError naming `name` unless it is a positive int (bools are not)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive int")
    return int(value)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VideoGeometry:
    """num_frames x height x width pixels of one video (the model checks divisibility)."""

    num_frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("num_frames", "height", "width"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Sampling:
    """How to denoise: steps, guidance scale (<= 1: no CFG pass), seed (an int, or a tuple of ints: one per
    video), text length, videos per prompt."""

    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    seed: int = 0
    max_sequence_length: int = 226
    num_videos_per_prompt: int = 1

    def __post_init__(self) -> None:
        for name in ("num_inference_steps", "max_sequence_length", "num_videos_per_prompt"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float, np.floating, np.integer)) or not math.isfinite(g):
            raise ValueError(f"guidance_scale={g!r}; expected a finite number (<= 1 turns guidance off)")
        object.__setattr__(self, "guidance_scale", float(g))
        if isinstance(self.seed, (list, tuple)):  # one seed per video
            if not self.seed or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in self.seed):
                raise ValueError(f"seed={self.seed!r}; expected an int or a non-empty list of ints (one per video)")
            object.__setattr__(self, "seed", tuple(int(s) for s in self.seed))
        elif not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            if not (hasattr(self.seed, "dtype") and hasattr(self.seed, "shape")):  # a jax.random key is fine too
                raise ValueError(f"seed={self.seed!r}; expected an int or a list of ints (one per video)")

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance runs when the scale exceeds 1 (diffusers' rule)."""
        return self.guidance_scale > 1.0
