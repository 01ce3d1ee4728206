"""Convert diffusers/transformers folders into jaxvid checkpoints, given a resolver of model targets.

SRC is one of
- a component folder (config.json + safetensors, sharded or not);
- a pipeline folder (model_index.json): every listed component whose class the resolver supports is
  converted, weight-free folders (tokenizer/, scheduler/) and model_index.json are copied as they
  are, components of a class in NO_JAX_PORT are skipped (the summary says so); anything else
  fails the run;
- a folder of component subfolders without model_index.json, as LongCat-Video's release
  (dit/, text_encoder/, vae/, tokenizer/, scheduler/, lora/): the same per subfolder, plus lora/
  (LoRA safetensors, checked readable and copied) and top-level files (copied).

Every component's key table is checked against its source before anything is written, so a bad
component fails the run at once. Tensors stream one at a time through the key table into a
CheckpointWriter. The output appears atomically: everything is staged in a temp folder beside DST
(named `.DST.convert-*`, with the owning pid inside) and renamed at the end; on any error, or
SIGINT/SIGTERM (the CLI's handler sets a `convert.cancel.Cancellation`, checked between tensors
and before the final rename), nothing is left, not even the parent folders the run created. A
temp folder of a killed run (SIGKILL) is removed by the next run into the same DST once its pid
is gone.

This module knows nothing of jaxvid's models: which classes convert, their abstract parameter
shapes and key tables come from a `TargetResolver` (jaxvid's lives in `jaxvid.cli.convert`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert.apply import check_rules, dominant_float_dtype, iter_converted
from convert.cancel import Cancellation
from convert.checkpoint import CheckpointWriter, is_checkpoint, read_json_object
from convert.keymap import Rule
from convert.paths import allowed_root, check_disjoint, child, inside, plain_name
from convert.safetensors_io import SafetensorsReader, read_header

log = logging.getLogger("jaxvid.convert")

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
# Stored weight formats beyond the float dtypes: "fp8" stores the DiT's linear kernels as e4m3 with
# per-output-channel scales (which tensors, and how, is the resolver's business: Target.quantize).
WEIGHT_FORMATS = ("fp8",)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
# Classes that diffusers video pipelines carry and jaxvid has no JAX port of: the only components
# a conversion may skip (with weights) without failing. Everything else with weights must convert.
NO_JAX_PORT = frozenset({
    "CLIPTextModel",  # text_encoder_2 of HunyuanVideo-like pipelines
    "CLIPTextModelWithProjection",
    "CLIPVisionModel",  # image_encoder of Wan/SkyReels image-to-video pipelines
    "CLIPVisionModelWithProjection",
    "SiglipVisionModel",
    "LlamaModel",  # HunyuanVideo's text encoder
    "StableDiffusionSafetyChecker",
})
# LongCat-Video release layout: the pipeline needs all of these; lora/ (LoRA files, no config) is optional.
_LONGCAT_COMPONENTS = ("dit", "text_encoder", "vae", "tokenizer", "scheduler")
_LORA_DIR = "lora"
_OWNER = "owner.json"


@dataclass(frozen=True, slots=True)
class Target:
    """What one model class needs: its flat parameter specs (path -> .shape/.dtype) and key table."""

    specs: Mapping[str, Any]
    rules: list[Rule]
    ignore: tuple[str, ...]
    param_dtype: np.dtype
    # (target name, converted array) -> the tensors to store instead, e.g. an fp8 kernel and its
    # scales; None stores every array as it is. Applied tensor by tensor while streaming.
    quantize: Callable[[str, np.ndarray], list[tuple[str, np.ndarray]]] | None = None


class TargetResolver(Protocol):
    """Tells the converter which classes it can convert and what each becomes."""

    def supports(self, class_name: str) -> bool: ...
    def supported(self) -> list[str]: ...
    def target(self, class_name: str, hf_config: dict[str, Any], source: SafetensorsReader, dtype: np.dtype,
               *, weights: str | None = None) -> Target: ...


def read_config(folder: Path) -> dict[str, Any]:
    """`folder/config.json` as a dict (one-line ValueError naming the file when missing or malformed)."""
    file = folder / "config.json"
    inside(file, allowed_root(folder), what=str(folder))
    return read_json_object(file)


def class_name_of(config: dict[str, Any], *, where: Path | str = "config.json") -> str | None:
    """The class a config.json names: diffusers' `_class_name` or transformers' `architectures[0]`."""
    name = config.get("_class_name")
    if name is None and isinstance(config.get("architectures"), list) and config["architectures"]:
        name = config["architectures"][0]
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{where}: the class name is a {type(name).__name__} ({name!r}); expected a string")
    return name


def has_weights(folder: Path) -> bool:
    return any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.rglob("*"))


@dataclass(frozen=True, slots=True)
class ComponentPlan:
    """One component, checked and ready to write: its key table matched both ways against its source."""

    src: Path
    class_name: str
    hf_config: dict[str, Any]
    target: Target
    source: SafetensorsReader
    rules: list[Rule]

    @property
    def n_bytes(self) -> int:
        return sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize for s in self.target.specs.values())


def check_weights(weights: str | None) -> None:
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}; expected None (float weights) or one of {WEIGHT_FORMATS}")


def plan_component(src: Path, resolver: TargetResolver, *, dtype: str | None = None,
                   weights: str | None = None) -> ComponentPlan:
    """Read `src`'s config.json and safetensors headers and check its key table (no tensor is read).

    Raises ValueError (ConversionError, SafetensorsError) on an unknown class, a bad config or any
    key/shape/dtype mismatch; every message names the file.
    """
    src = Path(src)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)} or None")
    check_weights(weights)
    hf_config = read_config(src)
    class_name = class_name_of(hf_config, where=src / "config.json")
    if class_name is None:
        raise ValueError(f"{src / 'config.json'}: names no model class (no '_class_name' or 'architectures')")
    if not resolver.supports(class_name):
        raise ValueError(f"{src / 'config.json'}: unknown model class {class_name!r}; jaxvid converts {resolver.supported()}")
    source = SafetensorsReader(src)
    if dtype is None:
        target_dtype = dominant_float_dtype(source) or np.dtype(np.float32)
    else:  # numpy cannot name bfloat16 on its own
        target_dtype = np.dtype(ml_dtypes.bfloat16) if DTYPES[dtype] == "bfloat16" else np.dtype(DTYPES[dtype])
    try:
        target = (resolver.target(class_name, hf_config, source, target_dtype, weights=weights) if weights
                  else resolver.target(class_name, hf_config, source, target_dtype))
    except (TypeError, KeyError, AttributeError) as e:  # a config value of the wrong type
        raise ValueError(f"{src / 'config.json'}: bad config for {class_name}: {type(e).__name__}: {e}") from None
    except ValueError as e:
        if str(src) in str(e):
            raise
        raise ValueError(f"{src / 'config.json'}: {e}") from None
    rules = check_rules(target.rules, source, target.specs, ignore=target.ignore, what=str(src))
    return ComponentPlan(src=src, class_name=class_name, hf_config=hf_config, target=target, source=source, rules=rules)


def write_component(plan: ComponentPlan, dst: Path, *, progress: tqdm | None = None, label: str | None = None,
                    cancel: Cancellation | None = None) -> Path:
    """Stream a checked component into a jaxvid checkpoint at `dst` (which must not exist).

    `cancel` is checked before every tensor; a requested stop raises `Cancelled` (the writer cleans up).
    """
    cancel = cancel if cancel is not None else Cancellation()
    label = label or dst.name
    param_dtype = np.dtype(plan.target.param_dtype).name
    log.info("%s: %s, %d tensors -> %d parameters (%.2f GB as %s)",
             plan.src, plan.class_name, len(plan.rules), len(plan.target.specs), plan.n_bytes / 1e9, param_dtype)
    t0 = time.perf_counter()
    with CheckpointWriter(
        dst, class_name=plan.class_name, config=plan.hf_config,
        extra={"source": str(plan.src), "dtype": param_dtype, **({"weights": "fp8"} if plan.target.quantize else {})}
    ) as writer:
        if progress is not None:
            progress.set_description(label)
        quantize = plan.target.quantize
        for rule, array in iter_converted(plan.rules, plan.source, plan.target.specs):
            cancel.check()
            for key, stored in (quantize(rule.target, array) if quantize else [(rule.target, array)]):
                writer.add(key, stored)
            if progress is not None:
                progress.update(array.nbytes)
        cancel.check()
        writer.commit()
    log.info("%s: %d tensors written in %.1f s", label, len(plan.rules), time.perf_counter() - t0)
    return dst


def _bar(total_bytes: int, show: bool) -> tqdm:
    """One progress bar over the whole conversion, in bytes shown as kB/MB/GB."""
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, disable=not show or None)


def convert_component(src: Path, dst: Path, resolver: TargetResolver, *, dtype: str | None = None,
                      show_progress: bool = True, label: str | None = None, weights: str | None = None) -> Path:
    """Convert one component folder (config.json + safetensors) into a jaxvid checkpoint at `dst`.

    `dtype`: 'bf16' / 'fp32' / 'fp16' or None (the dtype holding most of the source's bytes).
    """
    plan = plan_component(src, resolver, dtype=dtype, weights=weights)
    with _bar(plan.n_bytes, show_progress) as bar:
        return write_component(plan, dst, progress=bar, label=label)


@dataclass
class Summary:
    """What a conversion did with each entry of the source."""

    converted: dict[str, str] = field(default_factory=dict)  # name -> class
    copied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why

    def line(self) -> str:
        parts = [f"converted {', '.join(f'{k} ({v})' for k, v in self.converted.items()) or 'nothing'}"]
        if self.copied:
            parts.append(f"copied {', '.join(self.copied)}")
        if self.skipped:
            parts.append(f"skipped {', '.join(f'{k} ({v})' for k, v in self.skipped.items())}")
        return "; ".join(parts)


def _classify(folder: Path, name: str, resolver: TargetResolver, *, dtype: str | None,
              plans: dict[str, ComponentPlan], copies: list[str], summary: Summary,
              weight_format: str | None = None) -> None:
    """Decide what to do with one component folder; raise for anything that can neither convert nor be skipped."""
    weights = has_weights(folder)
    cls = None
    if (folder / "config.json").is_file():
        cls = class_name_of(read_config(folder), where=folder / "config.json")
    if cls is not None and resolver.supports(cls):
        plans[name] = plan_component(folder, resolver, dtype=dtype, weights=weight_format)
        summary.converted[name] = cls
    elif not weights:
        copies.append(name)
    elif cls in NO_JAX_PORT:
        summary.skipped[name] = f"{cls}: no JAX port"
        log.warning("%s/ (%s) skipped: jaxvid has no JAX port of this class", name, cls)
    elif cls is None:
        raise ValueError(f"{folder}: holds weights but its config.json names no model class (or there is no "
                         "config.json); cannot tell what it is")
    else:
        raise ValueError(f"{folder / 'config.json'}: class {cls!r} is neither converted by jaxvid ({resolver.supported()}) "
                         f"nor a known class without a JAX port ({sorted(NO_JAX_PORT)})")


def _copy_checked(src: Path, dst: Path, root: Path, cancel: Cancellation) -> None:
    """Copy a file or folder whose every file resolves inside `root` (a symlink out of it fails)."""
    def copy_one(s: str, d: str) -> None:
        cancel.check()
        inside(s, root, what=str(src))
        shutil.copy2(s, d)

    inside(src, root, what=str(src))
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=copy_one)
    else:
        copy_one(str(src), str(dst))


def _check_lora_folder(folder: Path) -> None:
    """LoRA files are copied, not converted: check each is a complete safetensors file (not truncated)."""
    files = sorted(folder.rglob("*.safetensors"))
    for file in files:
        read_header(file)
    log.info("%s: %d LoRA file(s) checked: %s", folder, len(files), [f.name for f in files])


def _plan_pipeline(src: Path, root: Path, resolver: TargetResolver, *, dtype: str | None, summary: Summary,
                   weights: str | None = None):
    index_file = inside(src / "model_index.json", root, what=str(src))
    index = read_json_object(index_file)
    plans: dict[str, ComponentPlan] = {}
    copies: list[str] = []
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"{index_file}: entry {name!r} is {value!r}; expected [library, class]")
        plain_name(name, what=f"{index_file}: component")
        if value[-1] is None:
            continue
        folder = child(src, name, root, what=f"{index_file}: component {name!r}")
        if not folder.is_dir():
            raise ValueError(f"{index_file}: lists component {name!r} ({value[-1]}) but {folder} is not a folder")
        _classify(folder, name, resolver, dtype=dtype, plans=plans, copies=copies, summary=summary,
                  weight_format=weights)
    if not plans:
        raise ValueError(f"SRC={str(src)!r}: no component jaxvid can convert (model_index.json lists "
                         f"{sorted(k for k in index if not k.startswith('_'))})")
    return plans, copies, ["model_index.json"]


def is_component_set(path: str | os.PathLike, resolver: TargetResolver) -> bool:
    """True for a folder of component subfolders without model_index.json (LongCat-Video's release layout).

    That is: no model_index.json and no config.json of its own, and at least one subfolder whose
    config.json names a model class the resolver supports.
    """
    path = Path(path)
    if (path / "model_index.json").is_file() or (path / "config.json").is_file() or not path.is_dir():
        return False
    for p in path.iterdir():
        if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file():
            try:
                cls = class_name_of(read_config(p))
            except ValueError:
                continue
            if cls is not None and resolver.supports(cls):
                return True
    return False


def _plan_component_set(src: Path, root: Path, resolver: TargetResolver, *, dtype: str | None, summary: Summary,
                        weights: str | None = None):
    plans: dict[str, ComponentPlan] = {}
    copies: list[str] = []
    files: list[str] = []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name.startswith("."):
            continue
        inside(entry, root, what=str(src))
        if entry.is_file():
            if name.endswith(WEIGHT_SUFFIXES):
                summary.skipped[name] = "top-level weight file of no component"
                log.warning("top-level weight file %s belongs to no component; skipped", name)
            else:
                files.append(name)
        elif not entry.is_dir():
            continue
        elif name == _LORA_DIR and not (entry / "config.json").is_file():
            _check_lora_folder(entry)
            copies.append(name)
        else:
            _classify(entry, name, resolver, dtype=dtype, plans=plans, copies=copies, summary=summary,
                      weight_format=weights)
    if not plans:
        raise ValueError(f"SRC={str(src)!r}: no subfolder whose config.json names a model class jaxvid supports")
    if "dit" in plans and plans["dit"].class_name == "LongCatVideoTransformer3DModel":
        missing = [c for c in _LONGCAT_COMPONENTS if c not in plans and c not in copies]
        if missing:
            log.warning("%s looks like a LongCat-Video checkpoint but lacks %s; the pipeline will not load without "
                        "them", src, missing)
    return plans, copies, files


def _write_all(src: Path, out: Path, root: Path, plans: dict[str, ComponentPlan], copies: list[str],
               files: list[str], *, show_progress: bool, cancel: Cancellation) -> None:
    """Copy the weight-free entries (cheap) first, then stream each checked component."""
    out.mkdir()
    for name in files:
        _copy_checked(src / name, out / name, root, cancel)
    for name in copies:
        _copy_checked(src / name, out / name, root, cancel)
        log.info("copied %s/ as it is", name)
    total = sum(p.n_bytes for p in plans.values())
    log.info("converting %d component(s), %.2f GB: %s", len(plans), total / 1e9, ", ".join(plans))
    with _bar(total, show_progress) as bar:
        for name, plan in plans.items():
            write_component(plan, out / name, progress=bar, label=name, cancel=cancel)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(dst: Path) -> list[Path]:
    """Remove temp folders `.DST.convert-*` whose run is dead (same host, pid gone); warn about others.

    Returns the folders still present (a live run's, or one whose owner is unknown).
    """
    left: list[Path] = []
    if not dst.parent.is_dir():
        return left
    for stale in sorted(dst.parent.glob(f".{dst.name}.convert-*")):
        try:
            owner = json.loads((stale / _OWNER).read_text())
            dead = owner.get("host") == socket.gethostname() and not _pid_alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            dead = False
            owner = {}
        if dead:
            shutil.rmtree(stale, ignore_errors=True)
            log.warning("removed %s, left by a killed conversion (pid %s)", stale, owner.get("pid"))
        else:
            left.append(stale)
            log.warning("%s is the temp folder of another conversion (pid %s on %s) or of unknown owner; "
                        "remove it if no conversion is running", stale, owner.get("pid", "?"), owner.get("host", "?"))
    return left


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; return the folders created, innermost first (to remove them on failure)."""
    made = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        made.append(p)
    folder.mkdir(parents=True, exist_ok=True)
    return made


def check_paths(src: Path, dst: Path, *, overwrite: bool, dtype: str | None) -> str:
    """Validate SRC/DST before touching anything; return 'pipeline' (model_index.json) or 'other'.

    Telling a component folder from a component set needs the resolver: the caller does that.
    """
    if not src.is_dir():
        raise ValueError(f"SRC={str(src)!r} is not a folder; expected a diffusers component or pipeline folder")
    check_disjoint(src, dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"DST={str(dst)!r} already exists; remove it or pass --overwrite")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"DST={str(dst)!r} is a file, not a folder; --overwrite replaces only a folder")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    for p in (dst.parent, *dst.parent.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"DST={str(dst)!r}: {p} is a file, so DST cannot be created under it")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"DST={str(dst)!r}: {p} is not writable")
            break
    return "pipeline" if (src / "model_index.json").is_file() else "other"


def convert_path(
    src: str | os.PathLike, dst: str | os.PathLike, resolver: TargetResolver, *, dtype: str | None = None,
    overwrite: bool = False, show_progress: bool = True, weights: str | None = None,
    cancel: Cancellation | None = None,
) -> Path:
    """Convert a component, pipeline or component-set folder `src` into `dst`, atomically (see module docstring).

    `weights="fp8"`: components whose resolver target has a `quantize` hook (the DiTs) store fp8 kernels.
    `cancel` (set by a signal handler, see `convert.cancel`) is checked between steps; a requested stop
    raises `Cancelled` with nothing written. Once the final rename is done the output stays: a stop
    requested after that is left for the caller to see in `cancel.signum`.
    """
    cancel = cancel if cancel is not None else Cancellation()
    src, dst = Path(src), Path(dst).absolute()
    check_weights(weights)
    kind = check_paths(src, dst, overwrite=overwrite, dtype=dtype)
    root = allowed_root(src)
    if kind != "pipeline":
        if is_component_set(src, resolver):
            kind = "set"
        elif (src / "config.json").is_file():
            kind = "component"
        else:
            raise ValueError(
                f"SRC={str(src)!r} has neither model_index.json nor config.json nor a subfolder with a supported "
                "config.json; expected a component folder, a pipeline folder or a checkpoint folder such as "
                "LongCat-Video's (dit/, text_encoder/, vae/, tokenizer/, scheduler/, lora/)"
            )
    summary = Summary()
    if kind == "pipeline":
        plans, copies, files = _plan_pipeline(src, root, resolver, dtype=dtype, summary=summary, weights=weights)
    elif kind == "set":
        plans, copies, files = _plan_component_set(src, root, resolver, dtype=dtype, summary=summary,
                                                   weights=weights)
    else:
        plans, copies, files = {"": plan_component(src, resolver, dtype=dtype, weights=weights)}, [], []
        summary.converted[dst.name] = plans[""].class_name

    cancel.check()
    clean_stale_staging(dst)
    made = _make_parents(dst.parent)
    staging = None
    try:
        with cancel.interruptible():
            staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.convert-", dir=dst.parent))
            (staging / _OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            out = staging / "out"
            if kind == "component":
                with _bar(plans[""].n_bytes, show_progress) as bar:
                    write_component(plans[""], out, progress=bar, label=dst.name, cancel=cancel)
            else:
                _write_all(src, out, root, plans, copies, files, show_progress=show_progress, cancel=cancel)
        cancel.check()  # the last point where a stop leaves nothing behind
        if dst.exists():  # overwrite: move the old one aside first so a failed rename loses nothing
            os.rename(dst, staging / "old")
        os.rename(out, dst)
    except BaseException:
        if staging is not None:
            old = staging / "old"
            if old.exists() and not dst.exists():  # the final rename failed: put the previous output back
                os.rename(old, dst)
            shutil.rmtree(staging, ignore_errors=True)
        for p in made:  # innermost first; stops being empty at the first folder someone else filled
            try:
                p.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(staging, ignore_errors=True)
    log.info("done: %s (%s)", dst, summary.line())
    return dst


def iter_checkpoints(path: Path) -> list[Path]:
    """`path` itself if it is a jaxvid checkpoint, else every checkpoint one level below it."""
    if is_checkpoint(path):
        return [path]
    return [p for p in sorted(path.iterdir()) if p.is_dir() and is_checkpoint(p)] if path.is_dir() else []
