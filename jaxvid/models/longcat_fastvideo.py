"""Load a LongCat-Video DiT saved in FastVideo's native layout (see convert/keymaps/longcat_fastvideo.py).

    model = load_longcat_fastvideo("weights/longcat-native/transformer")

The checkpoint is read under upstream names through `FastVideoSource` (split projections joined
again, modules renamed, both ways checked) and filled by the upstream key table, so the model is
the one `load_transformer` gives for the upstream `dit/` folder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from convert.apply import dominant_float_dtype
from convert.keymaps.longcat_fastvideo import FASTVIDEO_CLASS_NAME, FastVideoSource, fastvideo_hf_config
from convert.safetensors_io import SafetensorsReader
from jaxvid.models.loading import _resolve, class_name_of, config_for, entry_for, fill_model, read_config, rules_for

log = logging.getLogger(__name__)

__all__ = ["FASTVIDEO_CLASS_NAME", "is_fastvideo_longcat", "load_longcat_fastvideo"]

_UPSTREAM_CLASS = "LongCatVideoTransformer3DModel"


def is_fastvideo_longcat(path: str | os.PathLike) -> bool:
    """True for a folder whose config.json names FastVideo's LongCat class."""
    try:
        return class_name_of(read_config(path)) == FASTVIDEO_CLASS_NAME
    except ValueError:
        return False


def load_longcat_fastvideo(path: str | os.PathLike, *, dtype: Any | None = None):
    """LongCatVideoTransformer3D from a FastVideo-layout folder (config.json + safetensors).

    `dtype` None keeps the stored float dtype. Raises ValueError (ConversionError) listing every
    tensor the FastVideo table does not account for.
    """
    path = Path(path)
    hf_config = fastvideo_hf_config(read_config(path))
    name = class_name_of(hf_config)
    if name != _UPSTREAM_CLASS:
        raise ValueError(f"{path}: config.json names {name!r}; expected FastVideo's {FASTVIDEO_CLASS_NAME!r}")
    entry = entry_for(_UPSTREAM_CLASS)
    raw = SafetensorsReader(path)
    cfg = config_for(entry, hf_config, dtype if dtype is not None else dominant_float_dtype(raw))
    source = FastVideoSource(raw, cfg, what=str(path))
    model = fill_model(_resolve(entry.model), cfg, rules_for(entry, cfg, source), source, ignore=entry.ignore,
                       what=str(path))
    log.info("loaded FastVideo-layout LongCat DiT from %s", path)
    return model
