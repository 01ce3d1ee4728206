"""`jaxvid-convert SRC DST [--dtype bf16|fp32] [--overwrite]`: diffusers/transformers weights -> jaxvid checkpoints.

SRC is one of
- a component folder (config.json + safetensors, sharded or not);
- a pipeline folder (model_index.json): every listed component whose class jaxvid supports is
  converted, weight-free folders (tokenizer/, scheduler/) and model_index.json are copied as they
  are, other components are skipped with a warning;
- a folder of component subfolders without model_index.json, as LongCat-Video's release
  (dit/, text_encoder/, vae/, tokenizer/, scheduler/, lora/): every subfolder whose config.json
  names a supported class is converted under the same name, subfolders without config.json
  (tokenizer/, scheduler/, lora/ with its LoRA safetensors, ...) and top-level files are copied as
  they are (LoRA files are checked to be readable safetensors first).
The model type comes from each config.json. Every component's key table is checked against its
source before anything is written, so a bad component fails the run at once. Tensors stream one at
a time through the key table into a CheckpointWriter. The output appears atomically: everything
is staged in a temp folder beside DST and renamed at the end; on any error nothing is left.

Unlike the rest of convert/, this module imports jaxvid: it needs the model classes to build the
abstract target that the key table is checked against.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from convert.apply import check_rules, dominant_float_dtype, iter_converted
from convert.checkpoint import CheckpointWriter
from convert.safetensors_io import SafetensorsReader, read_header

log = logging.getLogger("jaxvid.convert")

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
# LongCat-Video release layout: the pipeline needs all of these; lora/ (LoRA files, no config) is optional.
_LONGCAT_COMPONENTS = ("dit", "text_encoder", "vae", "tokenizer", "scheduler")
_LORA_DIR = "lora"


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


def _entry_importable(entry: Any) -> bool:
    """True when the entry's model and key-table modules exist (other models land over time)."""
    modules = {ref.split(":")[0] for ref in (entry.config, entry.model, entry.rules)}
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:
        return False


def _has_weights(folder: Path) -> bool:
    return any(p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir())


@dataclass(frozen=True, slots=True)
class ComponentPlan:
    """One component, checked and ready to write: its key table matched both ways against its source."""

    src: Path
    class_name: str
    hf_config: dict[str, Any]
    cfg: Any
    source: SafetensorsReader
    specs: dict[str, Any]
    rules: list[Any]

    @property
    def n_bytes(self) -> int:
        return sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in self.specs.values())


def plan_component(src: Path, *, dtype: str | None = None) -> ComponentPlan:
    """Read `src`'s config.json and safetensors headers and check its key table (no tensor is read).

    Raises ValueError (ConversionError, SafetensorsError) on an unknown class, a bad config or any
    key/shape mismatch.
    """
    from jaxvid.models.loading import (
        _resolve,
        class_name_of,
        config_for,
        entry_for,
        model_specs,
        read_config,
        rules_for,
    )

    src = Path(src)
    hf_config = read_config(src)
    class_name = class_name_of(hf_config)
    entry = entry_for(class_name)
    if not _entry_importable(entry):
        raise ValueError(f"{src}: {class_name} is registered but its jaxvid modules are not installed yet")
    source = SafetensorsReader(src)
    if dtype is None:
        target_dtype = dominant_float_dtype(source) or np.dtype(np.float32)
    elif dtype in DTYPES:
        target_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)} or None")
    cfg = config_for(entry, hf_config, target_dtype)
    specs = model_specs(_resolve(entry.model), cfg)
    rules = check_rules(rules_for(entry, cfg, source), source, specs, ignore=entry.ignore, what=str(src))
    return ComponentPlan(src=src, class_name=class_name, hf_config=hf_config, cfg=cfg, source=source, specs=specs,
                         rules=rules)


def write_component(plan: ComponentPlan, dst: Path, *, show_progress: bool = True, label: str | None = None) -> Path:
    """Stream a checked component into a jaxvid checkpoint at `dst` (which must not exist)."""
    label = label or dst.name
    param_dtype = np.dtype(plan.cfg.param_dtype).name
    log.info(
        "%s: %s, %d tensors -> %d parameters (%.2f GB as %s)",
        plan.src, plan.class_name, len(plan.rules), len(plan.specs), plan.n_bytes / 1e9, param_dtype,
    )
    t0 = time.perf_counter()
    with CheckpointWriter(
        dst, class_name=plan.class_name, config=plan.hf_config, extra={"source": str(plan.src), "dtype": param_dtype}
    ) as writer:
        progress = tqdm(
            iter_converted(plan.rules, plan.source, plan.specs), total=len(plan.rules), unit="tensor", desc=label,
            disable=not show_progress or None,
        )
        for rule, array in progress:
            writer.add(rule.target, array)
        writer.commit()
    log.info("%s: %d tensors written in %.1f s", label, len(plan.rules), time.perf_counter() - t0)
    return dst


def convert_component(
    src: Path, dst: Path, *, dtype: str | None = None, show_progress: bool = True, label: str | None = None
) -> Path:
    """Convert one component folder (config.json + safetensors) into a jaxvid checkpoint at `dst`.

    `dtype`: 'bf16' / 'fp32' / 'fp16' or None (the dtype holding most of the source's bytes).
    `dst` must not exist. Raises ValueError (ConversionError, SafetensorsError) on any mismatch.
    `label` names the output in logs and the progress bar (default: dst's name).
    """
    return write_component(plan_component(src, dtype=dtype), dst, show_progress=show_progress, label=label)


def _supported_class(folder: Path) -> str | None:
    """The class named by `folder/config.json` if jaxvid can convert it, else None."""
    from jaxvid.models.loading import class_name_of, read_config
    from jaxvid.models.registry import MODELS

    if not (folder / "config.json").is_file():
        return None
    try:
        class_name = class_name_of(read_config(folder))
    except (ValueError, json.JSONDecodeError):
        return None
    return class_name if class_name in MODELS and _entry_importable(MODELS[class_name]) else None


def _check_lora_folder(folder: Path) -> None:
    """LoRA files are copied, not converted: check each is a complete safetensors file (not truncated)."""
    files = sorted(folder.rglob("*.safetensors"))
    for file in files:
        read_header(file)
    log.info("%s: %d LoRA file(s) checked: %s", folder, len(files), [f.name for f in files])


def _convert_pipeline(src: Path, dst: Path, *, dtype: str | None, show_progress: bool) -> Path:
    index = _load_json(src / "model_index.json")
    plans: dict[str, ComponentPlan] = {}
    copies: list[str] = []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[-1] is None:
            continue
        folder = src / name
        if not folder.is_dir():
            log.warning("component %s listed in model_index.json has no folder; skipped", name)
            continue
        if _supported_class(folder) is not None:
            plans[name] = plan_component(folder, dtype=dtype)
        elif not _has_weights(folder):
            copies.append(name)
        else:
            log.warning("component %s (%s) is not supported by jaxvid yet; skipped", name, value[-1])
    if not plans:
        raise ValueError(f"{src}: no component jaxvid can convert (model_index.json lists {sorted(k for k in index if not k.startswith('_'))})")
    dst.mkdir()
    shutil.copy2(src / "model_index.json", dst / "model_index.json")
    _write_all(src, dst, plans, copies, show_progress=show_progress)
    return dst


def _write_all(src: Path, dst: Path, plans: dict[str, ComponentPlan], copies: list[str], *, show_progress: bool) -> None:
    """Copy the weight-free folders (cheap) first, then stream each checked component."""
    for name in copies:
        shutil.copytree(src / name, dst / name)
        log.info("copied %s/ as it is", name)
    total = sum(p.n_bytes for p in plans.values())
    log.info("converting %d component(s), %.2f GB: %s", len(plans), total / 1e9, ", ".join(plans))
    for name, plan in plans.items():
        write_component(plan, dst / name, show_progress=show_progress, label=name)


def is_component_set(path: str | os.PathLike) -> bool:
    """True for a folder of component subfolders without model_index.json (LongCat-Video's release layout).

    That is: no model_index.json and no config.json of its own, and at least one subfolder whose
    config.json names a model class jaxvid supports.
    """
    path = Path(path)
    if (path / "model_index.json").is_file() or (path / "config.json").is_file() or not path.is_dir():
        return False
    return any(_supported_class(p) is not None for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _convert_component_set(src: Path, dst: Path, *, dtype: str | None, show_progress: bool) -> Path:
    """Convert every supported subfolder of `src` into `dst/<same name>`; copy the rest as it is.

    Subfolders: config.json naming a supported class -> converted; lora/ -> LoRA files checked and
    copied; no config.json -> copied (tokenizer/, scheduler/, assets); config.json of an unsupported
    class -> copied if weight-free, else skipped with a warning. Top-level files are copied; hidden
    entries (.git, .cache, .gitattributes) are skipped.
    """
    plans: dict[str, ComponentPlan] = {}
    copies: list[str] = []
    files: list[str] = []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name.startswith("."):
            continue
        if entry.is_file():
            if name.endswith(_WEIGHT_SUFFIXES):
                log.warning("top-level weight file %s belongs to no component; skipped", name)
            else:
                files.append(name)
        elif not entry.is_dir():
            continue
        elif _supported_class(entry) is not None:
            plans[name] = plan_component(entry, dtype=dtype)
        elif name == _LORA_DIR:
            _check_lora_folder(entry)
            copies.append(name)
        elif (entry / "config.json").is_file() and _has_weights(entry):
            log.warning("component %s/ (%s) is not supported by jaxvid yet; skipped", name, _config_class(entry))
        elif _has_weights(entry):
            log.warning("%s/ holds weights but no config.json (and is not lora/); skipped", name)
        else:
            copies.append(name)
    if not plans:
        raise ValueError(f"SRC={str(src)!r}: no subfolder whose config.json names a model class jaxvid supports")
    if "dit" in plans and plans["dit"].class_name == "LongCatVideoTransformer3DModel":
        missing = [c for c in _LONGCAT_COMPONENTS if c not in plans and c not in copies]
        if missing:
            log.warning("%s looks like a LongCat-Video checkpoint but lacks %s; the pipeline will not load without "
                        "them", src, missing)
    dst.mkdir()
    for name in files:
        shutil.copy2(src / name, dst / name)
    _write_all(src, dst, plans, copies, show_progress=show_progress)
    return dst


def _config_class(folder: Path) -> str:
    try:
        from jaxvid.models.loading import class_name_of, read_config

        return class_name_of(read_config(folder))
    except (ValueError, json.JSONDecodeError):
        return "unknown class"


def convert_path(
    src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Convert a component, pipeline or component-set folder `src` into `dst`, atomically (see module docstring)."""
    src, dst = Path(src), Path(dst).absolute()
    if not src.is_dir():
        raise ValueError(f"SRC={str(src)!r} is not a folder; expected a diffusers component or pipeline folder")
    is_pipeline = (src / "model_index.json").is_file()
    is_set = not is_pipeline and is_component_set(src)
    if not is_pipeline and not is_set and not (src / "config.json").is_file():
        raise ValueError(
            f"SRC={str(src)!r} has neither model_index.json nor config.json nor a subfolder with a supported "
            "config.json; expected a component folder, a pipeline folder or a checkpoint folder such as "
            "LongCat-Video's (dit/, text_encoder/, vae/, tokenizer/, scheduler/, lora/)"
        )
    if dst.exists() and not overwrite:
        raise FileExistsError(f"DST={str(dst)!r} already exists; remove it or pass --overwrite")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")

    made_parent = not dst.parent.exists()
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.convert-", dir=dst.parent))
    try:
        out = staging / "out"
        if is_pipeline:
            _convert_pipeline(src, out, dtype=dtype, show_progress=show_progress)
        elif is_set:
            _convert_component_set(src, out, dtype=dtype, show_progress=show_progress)
        else:
            convert_component(src, out, dtype=dtype, show_progress=show_progress, label=dst.name)
        if dst.exists():  # overwrite: move the old one aside first so a failed rename loses nothing
            os.rename(dst, staging / "old")
        os.rename(out, dst)
    except BaseException:
        old = staging / "old"
        if old.exists() and not dst.exists():  # the final rename failed: put the previous output back
            os.rename(old, dst)
        shutil.rmtree(staging, ignore_errors=True)
        if made_parent:
            try:
                dst.parent.rmdir()
            except OSError:
                pass
        raise
    shutil.rmtree(staging, ignore_errors=True)
    log.info("done: %s", dst)
    return dst


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxvid-convert",
        description="Convert diffusers/transformers safetensors (a component, a pipeline folder, or a folder of "
        "component subfolders such as LongCat-Video's dit/ text_encoder/ vae/ tokenizer/ scheduler/ lora/) "
        "into jaxvid checkpoints.",
    )
    parser.add_argument("src", help="component folder (config.json + safetensors), pipeline folder (model_index.json) "
                        "or folder of component subfolders (LongCat-Video)")
    parser.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="stored parameter dtype (default: as the source)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 conversion error)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("absl", "jax._src.xla_bridge"):  # orbax logs every save step at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        convert_path(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, show_progress=not args.quiet)
    except (ValueError, FileExistsError, OSError) as e:
        log.error("conversion failed: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
