"""jaxvid: CogVideoX and LongCat-Video in JAX / Flax NNX with Pallas sparse-attention kernels.

The public entry points (imported lazily, so `import jaxvid` stays cheap):

    jaxvid.load_pipeline(path, dtype=None)   CogVideoX or LongCat-Video pipeline, by folder layout
    jaxvid.load_model(path, dtype=None)      any single model (transformer, text encoder, VAE)
    jaxvid.load_transformer(path, dtype=None)
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["load_model", "load_pipeline", "load_transformer"]


def load_pipeline(path: str | os.PathLike, dtype: Any = None) -> Any:
    """A generation pipeline for `path`: a LongCat-Video folder (dit/ holds a LongCat DiT) gives a
    `LongCatPipeline`, a CogVideoX pipeline folder (model_index.json) a `CogVideoXPipeline`; either
    may be the original layout or its `jaxvid-convert` output. `path` may also be a model id already
    in the local Hugging Face cache ("THUDM/CogVideoX-5b"; never downloaded: ModelNotCachedError
    names the download command)."""
    from pathlib import Path

    from jaxvid.hub import resolve_model_path
    from jaxvid.pipelines.longcat import LongCatPipeline, is_longcat_folder

    path = resolve_model_path(path)  # a folder as it is; a model id from the local Hugging Face cache
    if is_longcat_folder(path):
        return LongCatPipeline.from_pretrained(path, dtype=dtype)
    if (Path(path) / "model_index.json").is_file():
        from jaxvid.pipelines.cogvideox import CogVideoXPipeline

        return CogVideoXPipeline.from_pretrained(path, dtype=dtype)
    raise ValueError(f"path={str(path)!r}: expected a CogVideoX pipeline folder (model_index.json) or a "
                     "LongCat-Video folder (dit/, text_encoder/, vae/, tokenizer/, scheduler/)")


def __getattr__(name: str) -> Any:
    if name in ("load_model", "load_transformer"):
        from jaxvid import models

        return getattr(models, name)
    raise AttributeError(f"module 'jaxvid' has no attribute {name!r}")
