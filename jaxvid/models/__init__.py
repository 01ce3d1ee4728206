"""Flax NNX models and their loaders."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jaxvid.models.loading import load_model

__all__ = ["load_model", "load_transformer"]

_TRANSFORMERS = ("CogVideoXTransformer3DModel", "LongCatVideoTransformer3DModel")


def load_transformer(path: str | os.PathLike, dtype: Any | None = None, **config_overrides: Any):
    """Load a video transformer (CogVideoX or LongCat-Video).

    `path`: a jaxvid checkpoint, a diffusers component folder (config.json + safetensors), or a
    pipeline folder (model_index.json) whose `transformer/` is either. `dtype` None keeps the stored
    dtype; e.g. jnp.bfloat16 sets parameter and compute dtype. Keyword overrides replace config.json
    entries, e.g. `load_transformer("LongCat-Video/dit", enable_bsa=True,
    bsa_params={"sparsity": 0.875, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4],
    "chunk_3d_shape_k": [4, 4, 4]})`.
    """
    path = Path(path)
    if (path / "model_index.json").is_file() and not (path / "config.json").is_file():
        path = path / "transformer"
    return load_model(path, dtype=dtype, expect=_TRANSFORMERS, config_overrides=config_overrides or None)
