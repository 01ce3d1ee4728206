"""Flax NNX models and their loaders."""
from __future__ import annotations

import os
from typing import Any

from jaxvid.models.loading import load_model

__all__ = ["load_model", "load_transformer"]

_TRANSFORMERS = ("CogVideoXTransformer3DModel", "LongCatVideoTransformer3DModel")


def load_transformer(path: str | os.PathLike, dtype: Any | None = None):
    """Load a video transformer (CogVideoX or LongCat-Video) from a jaxvid checkpoint or a diffusers folder."""
    return load_model(path, dtype=dtype, expect=_TRANSFORMERS)
