"""`jaxvid-convert SRC DST [--dtype bf16|fp32] [--overwrite]`: diffusers/transformers weights -> jaxvid checkpoints.

SRC is a component folder (config.json + safetensors, sharded or not) or a pipeline folder
(model_index.json): every component whose class jaxvid supports is converted, weight-free folders
(tokenizer/, scheduler/) and model_index.json are copied as they are, other components are
skipped with a warning. The model type comes from each config.json. Tensors stream one at a time
through the model's key table into a CheckpointWriter. The output appears atomically: everything
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
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from convert.apply import check_rules, dominant_float_dtype, iter_converted
from convert.checkpoint import CheckpointWriter
from convert.safetensors_io import SafetensorsReader

log = logging.getLogger("jaxvid.convert")

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


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


def convert_component(
    src: Path, dst: Path, *, dtype: str | None = None, show_progress: bool = True, label: str | None = None
) -> Path:
    """Convert one component folder (config.json + safetensors) into a jaxvid checkpoint at `dst`.

    `dtype`: 'bf16' / 'fp32' / 'fp16' or None (the dtype holding most of the source's bytes).
    `dst` must not exist. Raises ValueError (ConversionError, SafetensorsError) on any mismatch.
    `label` names the output in logs and the progress bar (default: dst's name).
    """
    label = label or dst.name
    from jaxvid.models.loading import class_name_of, config_for, entry_for, model_specs, read_config, _resolve

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
    rules = check_rules(_resolve(entry.rules)(cfg), source, specs, ignore=entry.ignore, what=str(src))
    n_bytes = sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in specs.values())
    log.info(
        "%s: %s, %d tensors -> %d parameters (%.2f GB as %s)",
        src, class_name, len(rules), len(specs), n_bytes / 1e9, np.dtype(cfg.param_dtype).name,
    )
    t0 = time.perf_counter()
    with CheckpointWriter(
        dst, class_name=class_name, config=hf_config, extra={"source": str(src), "dtype": np.dtype(cfg.param_dtype).name}
    ) as writer:
        progress = tqdm(
            iter_converted(rules, source, specs), total=len(rules), unit="tensor", desc=label,
            disable=not show_progress or None,
        )
        for rule, array in progress:
            writer.add(rule.target, array)
        writer.commit()
    log.info("%s: %d tensors written in %.1f s", label, len(rules), time.perf_counter() - t0)
    return dst


def _convert_pipeline(src: Path, dst: Path, *, dtype: str | None, show_progress: bool) -> Path:
    from jaxvid.models.loading import class_name_of, read_config
    from jaxvid.models.registry import MODELS

    index = _load_json(src / "model_index.json")
    dst.mkdir()
    shutil.copy2(src / "model_index.json", dst / "model_index.json")
    converted: list[str] = []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[-1] is None:
            continue
        folder = src / name
        if not folder.is_dir():
            log.warning("component %s listed in model_index.json has no folder; skipped", name)
            continue
        class_name = None
        if (folder / "config.json").is_file():
            try:
                class_name = class_name_of(read_config(folder))
            except ValueError:
                class_name = None
        if class_name in MODELS and _entry_importable(MODELS[class_name]):
            convert_component(folder, dst / name, dtype=dtype, show_progress=show_progress, label=name)
            converted.append(name)
        elif not _has_weights(folder):
            shutil.copytree(folder, dst / name)
            log.info("copied %s/ as it is", name)
        else:
            log.warning("component %s (%s) is not supported by jaxvid yet; skipped", name, class_name or value[-1])
    if not converted:
        raise ValueError(f"{src}: no component jaxvid can convert (model_index.json lists {sorted(k for k in index if not k.startswith('_'))})")
    return dst


def convert_path(
    src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Convert a component or pipeline folder `src` into `dst`, atomically (see module docstring)."""
    src, dst = Path(src), Path(dst).absolute()
    if not src.is_dir():
        raise ValueError(f"SRC={str(src)!r} is not a folder; expected a diffusers component or pipeline folder")
    is_pipeline = (src / "model_index.json").is_file()
    if not is_pipeline and not (src / "config.json").is_file():
        raise ValueError(f"SRC={str(src)!r} has neither model_index.json nor config.json")
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
        else:
            convert_component(src, out, dtype=dtype, show_progress=show_progress, label=dst.name)
        if dst.exists():  # overwrite: move the old one aside first so a failed rename loses nothing
            os.rename(dst, staging / "old")
        os.rename(out, dst)
    except BaseException:
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
        description="Convert diffusers/transformers safetensors (a component or a whole pipeline folder) "
        "into jaxvid checkpoints.",
    )
    parser.add_argument("src", help="component folder (config.json + safetensors) or pipeline folder (model_index.json)")
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
