"""Load a LongCat-Video DiT saved in FastVideo's native layout (see convert/keymaps/longcat_fastvideo.py).

    model = load_longcat_fastvideo("weights/longcat-native/transformer")

    lora = load_fastvideo_lora("weights/longcat-native/lora/distilled/cfg_step_lora.safetensors", model.cfg)

The checkpoint is read under upstream names through `FastVideoSource` (split projections joined
again, modules renamed, both ways checked) and filled by the upstream key table, so the model is
the one `load_transformer` gives for the upstream `dit/` folder.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from convert.apply import dominant_float_dtype
from convert.keymaps.longcat_fastvideo import (
    FASTVIDEO_CLASS_NAME,
    FastVideoSource,
    fastvideo_hf_config,
    fastvideo_linear_parts,
)
from convert.safetensors_io import SafetensorsReader
from jaxvid.models.loading import class_name_of, config_for, entry_for, fill_model, read_config, rules_for
from jaxvid.models.longcat import LongCatConfig
from jaxvid.models.lora import LoRA, LoRALayer, _linear_targets, _param_shapes
from jaxvid.models.registry import resolve

log = logging.getLogger(__name__)

__all__ = ["FASTVIDEO_CLASS_NAME", "is_fastvideo_longcat", "load_longcat_fastvideo", "load_fastvideo_lora"]

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
    model = fill_model(resolve(entry.model), cfg, rules_for(entry, cfg, source), source, ignore=entry.ignore,
                       what=str(path))
    log.info("loaded FastVideo-layout LongCat DiT from %s", path)
    return model


# FastVideo's LoRA files (its converter's output): per FastVideo Linear module M
#   M.lora_A [r, in], M.lora_B [out_M, r], M.lora_alpha (scalar, = upstream alpha_scale * r)
# scale alpha / r, as upstream's alpha_scale. A module FastVideo split (attn.qkv, kv_linear) gets
# one low-rank pair per part: side by side on the fused kernel, up block-diagonal.
_FV_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_alpha)$")


def load_fastvideo_lora(path: str | os.PathLike, cfg: LongCatConfig, name: str | None = None, *,
                        multiplier: float = 1.0) -> LoRA:
    """A LongCat LoRA converted by FastVideo (`lora/<name>/<file>.safetensors`) as a jaxvid LoRA,
    usable with `LoRALibrary.add` (run time or merged). Raises ValueError naming keys that fit no
    module of the model, missing parts and shape mismatches."""
    path = Path(path)
    reader = SafetensorsReader(path)
    parts_of = fastvideo_linear_parts(cfg)
    targets = _linear_targets(cfg)
    shapes = _param_shapes(cfg)
    groups: dict[str, dict[str, np.ndarray]] = {}
    problems = []
    for key in reader.keys():
        m = _FV_LORA_KEY.match(key)
        if not m or m["module"] not in parts_of:
            problems.append(f"{key}: not a FastVideo LoRA tensor of a Linear of the model")
            continue
        groups.setdefault(m["module"], {})[m["part"]] = reader.read(key).astype(np.float32)
    # upstream module -> {part j: (down [r, in], up [out/n, r] scaled)}
    by_upstream: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    n_parts: dict[str, int] = {}
    for module, parts in sorted(groups.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            problems.append(f"{module}: has {sorted(parts)}; needs lora_A and lora_B")
            continue
        a, b = parts["lora_A"], parts["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{module}: lora_A {a.shape} and lora_B {b.shape} are not [r, in] and [out, r]")
            continue
        rank = a.shape[0]
        scale = float(parts["lora_alpha"].reshape(())) / rank if "lora_alpha" in parts else 1.0
        upstream, j, n = parts_of[module]
        by_upstream.setdefault(upstream, {})[j] = (a, b * np.float32(scale))
        n_parts[upstream] = n
    layers = []
    for upstream, pieces in sorted(by_upstream.items()):
        rule = targets[upstream]
        d_in, d_out = shapes[rule.target_path][-2:]
        n = n_parts[upstream]
        step = d_out // n
        total = sum(a.shape[0] for a, _ in pieces.values())
        down = np.zeros((d_in, total), np.float32)
        up = np.zeros((total, d_out), np.float32)
        off = 0
        for j, (a, b) in sorted(pieces.items()):
            r = a.shape[0]
            if a.shape[1] != d_in or b.shape[0] != step:
                problems.append(f"{upstream} part {j}/{n}: lora_A {a.shape}, lora_B {b.shape} do not fit "
                                f"[in={d_in}, out={step}]")
                continue
            down[:, off:off + r] = a.T
            up[off:off + r, j * step:(j + 1) * step] = b.T
            off += r
        layers.append(LoRALayer(module=upstream, target=rule.target_path.removesuffix(".kernel"),
                                index=rule.target_index, down=down, up=up, alpha_scale=1.0))
    if problems:
        raise ValueError(f"{path}: FastVideo LoRA does not fit the LongCat model:\n  " + "\n  ".join(problems[:40]))
    if not layers:
        raise ValueError(f"{path}: no FastVideo LoRA tensors (expected keys like 'blocks.0.self_attn.to_q.lora_A')")
    lora = LoRA(name=name or path.parent.name, layers=tuple(layers), multiplier=float(multiplier))
    log.info("loaded FastVideo-layout LoRA %r from %s: %d layers", lora.name, path, len(layers))
    return lora
