"""Load any registered model from a converted jaxvid checkpoint or its original HF folder.

Weights go into an abstract model (jaxvid.models.abstract: the parameter tree as shapes, built
without tracing -> `nnx.split` -> fill -> `nnx.merge`), so no random init of billions of parameters
happens and no second copy is kept.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.apply import check_rules, dominant_float_dtype
from convert.checkpoint import CheckpointReader, is_checkpoint
from convert.int8_weights import INT8_SUFFIX, Int8WeightOnlySource, has_int8_weights
from convert.int8_weights import SCALE_SUFFIX as INT8_SCALE_SUFFIX
from convert.keymap import Rule
from convert.safetensors_io import SafetensorsReader
from convert.transforms import Transform
from jaxvid.models.abstract import abstract_model
from jaxvid.models.dtypes import resolve_dtype
from jaxvid.models.fp8 import SCALE_SUFFIX, is_fp8_state, quantize_model_fp8, resolve_weights
from jaxvid.models.registry import MODELS, ModelEntry, resolve

log = logging.getLogger(__name__)


def rules_for(entry: ModelEntry, cfg: Any, source: Any) -> list[Rule]:
    """The entry's key table for `cfg`; tables that take `source_keys` (e.g. T5's tied embedding,
    stored under either of two names) also see which keys the checkpoint holds."""
    fn = resolve(entry.rules)
    if "source_keys" in inspect.signature(fn).parameters:
        return fn(cfg, source_keys=source.keys())
    return fn(cfg)


def read_json_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from `path`; ValueError naming the file and what is wrong (one line) otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (not UTF-8 text at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object ({{...}}), got a {type(data).__name__}")
    return data


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a model folder, as a dict (clear one-line errors for a missing or malformed file)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no config.json; expected a model folder (diffusers/transformers component or jaxvid checkpoint)")
    return read_json_file(cfg_file)


def parse_config(config_cls: Any, hf_config: dict[str, Any], where: str | os.PathLike) -> Any:
    """`config_cls.from_hf_config(hf_config)`, with any complaint about a value turned into one
    ValueError line naming the file `where` (a config of the wrong type raises TypeError deep inside)."""
    try:
        return config_cls.from_hf_config(hf_config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{where}: {reason}") from None


def class_name_of(config: dict[str, Any]) -> str:
    """The model class named by a config.json: diffusers' `_class_name` or transformers' `architectures`."""
    name = config.get("_class_name")
    if name is None and isinstance(config.get("architectures"), list) and config["architectures"]:
        name = config["architectures"][0]
    if isinstance(name, str):
        return name
    if name is not None:
        raise ValueError(f"config.json names the model class {name!r}; expected a string")
    raise ValueError("config.json names no model class (no '_class_name' or 'architectures')")


def entry_for(class_name: str) -> ModelEntry:
    if class_name not in MODELS:
        raise ValueError(f"unknown model class {class_name!r}; jaxvid supports {sorted(MODELS)}")
    return MODELS[class_name]


def abstract_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, jax.ShapeDtypeStruct], Any, nnx.State]:
    """Split an (abstract) model into graphdef, flat '.'-joined Param specs, the flat state and the rest."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    specs = {".".join(str(p) for p in path): v.get_value() for path, v in flat}
    return graphdef, specs, flat, rest


def model_specs(model_cls: Callable[..., nnx.Module], cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat '.'-joined Param path -> ShapeDtypeStruct of `model_cls(cfg)`, built abstractly (no weights)."""
    return abstract_params(abstract_model(model_cls, cfg))[1]


# ------------------------------------------------------------------ loading at storage speed
#
# Each tensor goes from the mapped file (page cache) to the device in its stored layout and dtype,
# and is transposed / reshaped / cast there by a small jitted program: no per-tensor host copy.
# Host->device copies run in a thread pool so several tensors are in flight (device_put releases
# the GIL; page faults of a cold cache overlap too), at most `max_in_flight` tensors and
# `max_bytes_in_flight` bytes: without that cap every per-layer slice of a stacked parameter would
# land on the device before the first was written into its stacked buffer (2x the model; the
# 24 GiB and 16 GiB runs of CogVideoX-5b ran out of memory that way). Stacked parameters (per-layer
# tables into one [L, ...] array) are filled slice by slice into a donated device buffer.

_NAMED_PERMUTATIONS = {"linear_T": (1, 0), "conv1d_to_kio": (2, 1, 0), "conv2d_to_hwio": (2, 3, 1, 0),
                       "conv3d_to_dhwio": (2, 3, 4, 1, 0)}
LOAD_THREADS = 16  # an H200 host: device_put from 8 threads 4.1 GB/s, from 16 8.3 GB/s (bench/load_speed.py)
MAX_IN_FLIGHT = 32  # tensors submitted to the copy threads and not yet placed
MAX_BYTES_IN_FLIGHT = 1 << 30  # their stored + loaded bytes (one larger tensor still goes alone)
DEVICE_MIN_BYTES = 1 << 22  # tensors from 4 MB up change layout on the device; smaller ones on the host
# Stacked targets up to this size are assembled on the host and copied once: slice by slice into a
# device buffer would run a program per distinct shape (each a compile, or a compile-cache read,
# ~10-20 ms), which for the many small stacked biases and norms costs more than their bytes.
HOST_STACK_MAX_BYTES = 1 << 26
HOST_BATCH_BYTES = 1 << 26  # host-side tensors go to the device in one device_put per this many bytes


def _device_steps(name: str) -> list[tuple[str, Any]] | None:
    """A transform's name -> the layout steps it stands for, or None if unknown (host fallback).

    Steps are ("transpose", axes), ("flatten1", None) or ("reshape", None) (the target shape
    comes from shape_fn); "+" chains steps left to right, as convert.transforms.chain names them.
    """
    steps: list[tuple[str, Any]] = []
    for part in name.split("+"):
        if part == "identity":
            continue
        if part in _NAMED_PERMUTATIONS:
            steps.append(("transpose", _NAMED_PERMUTATIONS[part]))
        elif part.startswith("transpose(") and part.endswith(")"):
            steps.append(("transpose", tuple(int(a) for a in part[len("transpose("):-1].split(",") if a.strip())))
        elif part == "conv_patch_to_linear":  # [O, I, p, p] -> [O, I*p*p] -> transposed
            steps += [("flatten1", None), ("transpose", (1, 0))]
        elif part.startswith("reshape") or part.startswith("flatten_gamma"):
            steps.append(("reshape", None))
        else:
            return None
    return steps


def device_transform(transform: Transform, src_shape: tuple[int, ...], dtype: Any
                     ) -> Callable[[jax.Array], jax.Array] | None:
    """A jitted device version of `transform` for a source of `src_shape`, cast to `dtype`; None if
    the transform is not a known pure layout change (then the loader runs it on the host)."""
    steps = _device_steps(transform.name)
    if steps is None:
        return None
    return _device_fn(tuple(steps), tuple(src_shape), tuple(transform.shape_fn(tuple(src_shape))), jnp.dtype(dtype))


@functools.lru_cache(maxsize=None)
def _device_fn(steps: tuple[tuple[str, Any], ...], src_shape: tuple[int, ...], out_shape: tuple[int, ...],
               dtype: Any) -> Callable[[jax.Array], jax.Array]:
    def fn(x: jax.Array) -> jax.Array:
        for op, arg in steps:
            if op == "transpose":
                x = jnp.transpose(x, arg)
            elif op == "flatten1":
                x = x.reshape(x.shape[0], -1)
            else:
                x = x.reshape(out_shape)
        if x.shape != out_shape:
            raise ValueError(f"device transform {steps} of {src_shape} gave {x.shape}, expected {out_shape}")
        return x.astype(dtype)

    return jax.jit(fn)


@functools.partial(jax.jit, donate_argnums=0)
def _set_slice(buffer: jax.Array, value: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(buffer, value.astype(buffer.dtype), index, 0)


def _nbytes(spec: Any) -> int:
    return int(np.prod(tuple(spec.shape), dtype=np.int64)) * np.dtype(spec.dtype).itemsize


def _on_host(r: Rule, value: Any, dtype: Any) -> np.ndarray:
    """The rule's tensor `value` in its target layout and `dtype`, on the host (numpy's casts; a
    view of the mapped file when nothing changes)."""
    if r.transform.name != "identity":
        value = r.transform(np.asarray(value))
    return np.asarray(value).astype(dtype, copy=False)


def _stored_nbytes(source: Any, key: str) -> int:
    if hasattr(source, "nbytes"):
        return int(source.nbytes(key))
    return int(np.prod(source.shape(key), dtype=np.int64)) * np.dtype(source.dtype(key)).itemsize


def load_arrays(
    rules: list[Rule],
    source: Any,
    specs: dict[str, Any],
    *,
    device: Any = None,
    progress: bool = True,
    desc: str = "loading",
    max_in_flight: int = MAX_IN_FLIGHT,
    max_bytes_in_flight: int = MAX_BYTES_IN_FLIGHT,
) -> dict[str, jax.Array]:
    """Every target array of checked `rules` (see convert.apply.check_rules) on `device` (default:
    the first device), in the dtype of `specs[path]`. Returns target path -> array.

    Sources with `read_mapped` (safetensors) are copied from their memory map; others (jaxvid
    checkpoints) are read one tensor at a time on this thread. A tqdm bar counts stored bytes.
    Tensors under DEVICE_MIN_BYTES and stacked targets up to HOST_STACK_MAX_BYTES are converted on
    the host and copied in batches (one device_put each); larger ones go through copy threads.
    Exact: transposes and reshapes move bytes; casts round as numpy's astype does.
    Device memory beyond the loaded arrays: at most `max_in_flight` tensors and about
    `max_bytes_in_flight` bytes (stored + loaded size) at a time.
    """
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    from tqdm.auto import tqdm

    if max_in_flight < 1 or max_bytes_in_flight < 1:
        raise ValueError(f"max_in_flight={max_in_flight}, max_bytes_in_flight={max_bytes_in_flight}; expected >= 1")
    read = getattr(source, "read_mapped", None) or source.read
    t_start = time.perf_counter()
    stored = {r.source: _stored_nbytes(source, r.source) for r in rules}
    total = sum(stored.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, disable=not progress,
               leave=False)
    target = device if device is not None else jax.devices()[0]
    device_memory = jax.sharding.SingleDeviceSharding(target, memory_kind="device") \
        if "device" in {m.kind for m in _memories(target)} else target

    def to_device(r: Rule, host: np.ndarray) -> jax.Array:
        dtype = np.dtype(specs[r.target_path].dtype)
        # may_alias=False: a CPU "device" array must never alias the file mapping itself
        if r.transform.name == "identity" and host.dtype == dtype:
            out = jax.device_put(host, device_memory, may_alias=False)  # the common case: no program at all
        else:
            # Small tensors change layout on the host: a device program per small shape would cost
            # more to compile than the copy it saves.
            fn = device_transform(r.transform, tuple(host.shape), dtype) if host.nbytes >= DEVICE_MIN_BYTES else None
            if fn is None:
                host = np.ascontiguousarray(r.transform(np.asarray(host)).astype(dtype, copy=False))
                out = jax.device_put(host, device_memory, may_alias=False)
            else:
                out = fn(jax.device_put(host, device_memory, may_alias=False))
        jax.block_until_ready(out)  # the mapped view is released only once copied
        bar.update(stored[r.source])
        return out

    arrays: dict[str, jax.Array] = {}
    stacked: dict[str, jax.Array] = {}
    in_flight: deque[tuple[Rule, Future, int]] = deque()
    bytes_in_flight = 0

    def on_host(r: Rule) -> bool:
        if r.target_index is None:
            return stored[r.source] < DEVICE_MIN_BYTES
        return _nbytes(specs[r.target_path]) <= HOST_STACK_MAX_BYTES

    # Small tensors and small stacked targets: converted here on the host (the layout change a small
    # tensor would get in `to_device` anyway) and copied in batches, one device_put per batch: no
    # thread hand-off, no program, no per-tensor dispatch. Stacked ones fill one host buffer each.
    batch: list[tuple[str, np.ndarray]] = []
    batch_bytes = 0
    buffers: dict[str, np.ndarray] = {}

    def put_batch() -> None:
        nonlocal batch_bytes
        if batch:
            # may_alias=False: a CPU "device" array must never alias the file mapping or our buffers
            values = jax.device_put([v for _, v in batch], device_memory, may_alias=False)
            arrays.update(zip((p for p, _ in batch), jax.block_until_ready(values)))
            batch.clear()
            batch_bytes = 0

    for r in rules:
        if not on_host(r):
            continue
        dtype = np.dtype(specs[r.target_path].dtype)
        value = _on_host(r, read(r.source), dtype)
        if r.target_index is None:
            batch.append((r.target_path, value if value.flags.c_contiguous else value.copy(order="C")))
            batch_bytes += value.nbytes
        else:
            if r.target_path not in buffers:
                buffers[r.target_path] = np.zeros(tuple(specs[r.target_path].shape), dtype)
            buffers[r.target_path][r.target_index] = value
        bar.update(stored[r.source])
        if batch_bytes >= HOST_BATCH_BYTES:
            put_batch()
    for path in list(buffers):  # every slice is in (check_rules): each buffer is whole
        batch.append((path, buffers.pop(path)))
        batch_bytes += batch[-1][1].nbytes
        if batch_bytes >= HOST_BATCH_BYTES:
            put_batch()
    put_batch()

    def place_oldest() -> None:
        nonlocal bytes_in_flight
        r, fut, cost = in_flight.popleft()
        value = fut.result()
        bytes_in_flight -= cost
        path, index = r.target_path, r.target_index
        if index is None:
            arrays[path] = value
            return
        if path not in stacked:
            spec = specs[path]
            stacked[path] = jax.device_put(jnp.zeros(tuple(spec.shape), spec.dtype), device_memory)
        # written before the next one is placed, so no slices wait beside the buffer unbounded
        stacked[path] = jax.block_until_ready(_set_slice(stacked[path], value, np.int32(index)))

    large = [r for r in rules if not on_host(r)]
    if large:  # the threads start only when there is something to overlap
        with ThreadPoolExecutor(max_workers=LOAD_THREADS) as pool:
            for r in large:
                spec = specs[r.target_path]
                n = int(np.prod(tuple(spec.shape)[1:] if r.target_index is not None else tuple(spec.shape),
                                dtype=np.int64))
                cost = stored[r.source] + n * np.dtype(spec.dtype).itemsize
                while in_flight and (len(in_flight) >= max_in_flight or bytes_in_flight + cost > max_bytes_in_flight):
                    place_oldest()
                in_flight.append((r, pool.submit(to_device, r, read(r.source)), cost))
                bytes_in_flight += cost
            while in_flight:
                place_oldest()
    arrays.update(stacked)
    jax.block_until_ready(list(arrays.values()))
    bar.close()
    seconds = time.perf_counter() - t_start
    log.info("%s: %d tensors, %.2f GB in %.2f s (%.2f GB/s)", desc, len(rules), total / 1e9, seconds,
             total / 1e9 / max(seconds, 1e-9))
    return arrays


HOST_MEMORY_KIND = "pinned_host"


def load_arrays_to_host(
    rules: list[Rule],
    source: Any,
    specs: dict[str, Any],
    *,
    device: Any = None,
    progress: bool = True,
    desc: str = "loading",
    threads: int = LOAD_THREADS,
) -> dict[str, jax.Array]:
    """As `load_arrays`, but every array lands in `device`'s pinned host memory (JAX memory kind
    "pinned_host"), never touching device memory: what offloaded components wait in (models.offload).

    Each tensor is read (memory-mapped where the source can), transformed and cast on the host one
    at a time, and copied into pinned memory; the cast copy is dropped as soon as it is copied (no
    second copy of a weight in any dtype survives its own copy). A stacked target ([L, ...] from L
    per-layer tensors) is assembled in one host buffer, filled slice by slice, moved to pinned
    memory and dropped before the next stacked target starts (rules are taken target by target),
    so the extra host memory is at most one stacked target. Exact: the same layout steps and
    numpy's round-to-nearest-even casts as the device path.
    """
    from concurrent.futures import ThreadPoolExecutor
    from itertools import groupby

    from tqdm.auto import tqdm

    target = device if device is not None else jax.devices()[0]
    if HOST_MEMORY_KIND not in {m.kind for m in _memories(target)}:
        raise ValueError(f"device {target} has no {HOST_MEMORY_KIND} memory (jax {jax.__version__}); "
                         "load to the device instead")
    host_memory = jax.sharding.SingleDeviceSharding(target, memory_kind=HOST_MEMORY_KIND)
    read = getattr(source, "read_mapped", None) or source.read
    bar = tqdm(total=sum(_stored_nbytes(source, r.source) for r in rules), unit="B", unit_scale=True,
               unit_divisor=1000, desc=desc, disable=not progress, leave=False)

    def converted(r: Rule) -> np.ndarray:
        """The rule's tensor in its target layout and dtype (a view of the mapped file when nothing changes)."""
        return _on_host(r, read(r.source), np.dtype(specs[r.target_path].dtype))

    via_device: list[str] = []  # set once a backend refused numpy -> pinned memory (then said once)

    def put(value: np.ndarray) -> jax.Array:
        # may_alias=False: the pinned array must never alias the file mapping or a buffer we drop
        if not via_device:
            try:
                return jax.block_until_ready(jax.device_put(value, host_memory, may_alias=False))
            except (ValueError, RuntimeError, NotImplementedError, TypeError) as e:
                via_device.append(str(e))
                log.warning("jax %s cannot copy host arrays into %s memory directly (%s); each tensor passes "
                            "through the device on its way there, one at a time", jax.__version__, HOST_MEMORY_KIND,
                            " ".join(str(e).split())[:200])
        on_device = jax.device_put(value, jax.sharding.SingleDeviceSharding(target, memory_kind="device"))
        out = jax.block_until_ready(jax.device_put(on_device, host_memory))
        on_device.delete()
        return out

    def one(r: Rule) -> jax.Array:
        out = put(converted(r))
        bar.update(_stored_nbytes(source, r.source))
        return out

    arrays: dict[str, jax.Array] = {}
    by_target = sorted(rules, key=lambda r: r.target_path)  # stable: per-layer order within a target kept
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        singles = [r for r in by_target if r.target_index is None]
        for r, value in zip(singles, pool.map(one, singles)):
            arrays[r.target_path] = value
        for path, group in groupby((r for r in by_target if r.target_index is not None), key=lambda r: r.target_path):
            spec = specs[path]
            buffer = np.zeros(tuple(spec.shape), np.dtype(spec.dtype))

            def fill(r: Rule, buffer: np.ndarray = buffer) -> None:
                buffer[r.target_index] = converted(r)
                bar.update(_stored_nbytes(source, r.source))

            list(pool.map(fill, list(group)))
            arrays[path] = put(buffer)
            del buffer
    bar.close()
    return arrays


def _memories(device: Any) -> list[Any]:
    try:
        return list(device.addressable_memories())
    except (AttributeError, NotImplementedError, RuntimeError):
        return []


def _build_abstract(model_cls: Callable[..., nnx.Module], cfg: Any, fp8: bool) -> nnx.Module:
    """The abstract model to fill (jaxvid.models.abstract), with fp8 linears when `fp8`."""
    model = abstract_model(model_cls, cfg)
    return quantize_model_fp8(model) if fp8 else model


class OnDemandModel:
    """A model checkpoint that has been checked but not read. It is read to the device only when
    `load()` is called.

    `check_model` builds one: the config is parsed and every key, shape and dtype of the checkpoint
    is checked against the abstract model (`check_rules`), so a bad file fails there with the
    errors `load_model` gives. No weight is read. `load()` reads every weight from the memory-mapped
    safetensors (or the converted checkpoint) straight to the device (`load_arrays`) and returns a
    new filled module each call. The caller drops it when done. Between calls nothing of the model
    is held in device or host memory: file maps and restored checkpoint groups are released after
    each read. The pipelines use it for the text encoder (see models.offload.Offload.on_demand).

    `graphdef` is the graph definition of `nnx.split(load())`. It is equal and hash-equal, so
    jitted stages keyed on it compile once. `cfg`, `nbytes` (the loaded size) and `specs` describe
    the weights without reading them. `files` is the checkpoint folder. If its files change size
    or modification time after the check, `load()` raises ValueError: load the pipeline again.
    """

    def __init__(self, model_cls: Callable[..., nnx.Module], cfg: Any, rules: Iterable[Rule], source: Any, *,
                 ignore: Iterable[str] = (), what: str = "checkpoint", fp8: bool = False,
                 files: str | os.PathLike | None = None, class_name: str = ""):
        self.model_cls, self.cfg, self.source, self.what, self.fp8 = model_cls, cfg, source, what, fp8
        self.class_name = class_name or getattr(model_cls, "__name__", "model")
        abstract = _build_abstract(model_cls, cfg, fp8)
        self._param_graphdef, self.specs, self._flat, self._rest = abstract_params(abstract)
        self.graphdef = self._param_graphdef  # a split's graphdef is the same whatever it filters
        self.rules = check_rules(rules, source, self.specs, ignore=ignore, what=what)
        self._files = Path(files) if files is not None else None
        self._fingerprint = _fingerprint(self._files) if self._files is not None else None

    @property
    def nbytes(self) -> int:
        """Bytes of the loaded weights (in the model's dtypes)."""
        return int(sum(np.prod(tuple(s.shape), dtype=np.int64) * np.dtype(s.dtype).itemsize
                       for s in self.specs.values()))

    def load(self, *, host: Callable[[str], bool] | None = None, progress: bool = True,
             desc: str | None = None) -> nnx.Module:
        """The module with every Param read from the checkpoint: on the device, or for the paths
        `host` selects straight into pinned host memory (`load_arrays_to_host`)."""
        if self._fingerprint is not None and _fingerprint(self._files) != self._fingerprint:
            raise ValueError(f"{self._files}: its files changed after the pipeline checked them; "
                             "load the pipeline again")
        desc = desc or f"loading {Path(self.what).name or self.what}"
        to_host = [r for r in self.rules if host is not None and host(r.target_path)]
        to_device = [r for r in self.rules if host is None or not host(r.target_path)]
        try:
            arrays = load_arrays(to_device, self.source, self.specs, progress=progress, desc=desc) if to_device else {}
            if to_host:
                arrays.update(load_arrays_to_host(to_host, self.source, self.specs, progress=progress,
                                                  desc=desc + " to host memory"))
        finally:
            release = getattr(self.source, "release", None)
            if release is not None:
                release()  # no file map or restored group outlives the read
        filled = []
        for path, v in self._flat:
            key = ".".join(str(p) for p in path)
            filled.append((path, v.replace(arrays.pop(key))))
        return nnx.merge(self._param_graphdef, nnx.from_flat_state(filled), self._rest)


def _fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """(relative path, size, mtime_ns) of every file under `folder`, sorted: a cheap 'unchanged' check."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            st = os.stat(os.path.join(root, name))
            out.append((os.path.relpath(os.path.join(root, name), folder), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def fill_model(
    model_cls: Callable[..., nnx.Module],
    cfg: Any,
    rules: Iterable[Rule],
    source: Any,
    *,
    ignore: Iterable[str] = (),
    what: str = "checkpoint",
    fp8: bool = False,
    progress: bool = True,
    host: Callable[[str], bool] | None = None,
) -> nnx.Module:
    """Build `model_cls(cfg)` abstractly and fill every Param from `source` through `rules`.

    fp8: the abstract model has fp8 linears (jaxvid.models.fp8), as a converted `--weights fp8`
    checkpoint stores them. host: which Params ('.'-joined paths) load straight into pinned host
    memory (`load_arrays_to_host`; offloaded weights never pass through the device); None: none.

    Tensors go to the device in their stored layout and are transformed there (`load_arrays`), so
    host memory holds no copy of any weight, and device memory holds the model plus the few
    tensors in flight.
    """
    checked = OnDemandModel(model_cls, cfg, rules, source, ignore=ignore, what=what, fp8=fp8)
    return checked.load(host=host, progress=progress)


def config_for(entry: ModelEntry, hf_config: dict[str, Any], dtype: Any | None,
               where: str | os.PathLike = "config.json") -> Any:
    """The entry's config from a config.json dict; `dtype` (if given) sets param and compute dtype.
    Bad values raise one ValueError naming `where`."""
    cfg = parse_config(resolve(entry.config), hf_config, where)
    dtype = resolve_dtype(dtype)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    return cfg


def check_model(
    path: str | os.PathLike,
    *,
    dtype: Any | None = None,
    expect: Iterable[str] | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> OnDemandModel:
    """The model in `path` (a jaxvid checkpoint or a diffusers/transformers folder), checked and not
    read: its config parsed and every stored key, shape and dtype checked against the model (the
    errors `load_model` gives for a bad file come from here). `.load()` reads the weights.
    `dtype`, `expect` and `config_overrides` as in `load_model`.
    """
    path = Path(path)
    dtype = resolve_dtype(dtype)  # "bf16", "bfloat16", jnp.bfloat16, ...: the spellings load_pipeline takes
    hf_config = read_config(path)
    if config_overrides:
        unknown = sorted(set(config_overrides) - set(hf_config))
        if unknown:
            raise ValueError(f"config_overrides: keys {unknown} are not in {path / 'config.json'}; "
                             f"known keys: {sorted(k for k in hf_config if not k.startswith('_'))}")
        hf_config = {**hf_config, **config_overrides}
    if is_checkpoint(path):
        source = CheckpointReader(path)
        class_name = source.class_name
    else:
        source = SafetensorsReader(path)
        class_name = class_name_of(hf_config)
        if has_int8_weights(source.keys()):
            # LongCat-Video's INT8 weight-only layout: dequantized on read, in the load dtype
            # (upstream's formula, in the dtype the float tensors beside the pairs are stored in
            # when none is given)
            int8_dtype = dtype or dominant_float_dtype(_WithoutInt8Pairs(source)) or np.dtype(np.float32)
            source = Int8WeightOnlySource(source, int8_dtype, where=path)
            log.info("%s: %d INT8 weight-only linears, dequantized to %s", path, len(source.quantized_keys),
                     np.dtype(int8_dtype).name)
    if expect is not None and class_name not in set(expect):
        raise ValueError(f"{path} holds a {class_name}; expected one of {sorted(expect)}")
    entry = entry_for(class_name)
    stored_fp8 = isinstance(source, CheckpointReader) and is_fp8_state([Rule(k, k).target_path for k in source.keys()])
    if dtype is None:
        dtype = dominant_float_dtype(_WithoutScales(source) if stored_fp8 else source)
    cfg = config_for(entry, hf_config, dtype, where=path / "config.json")
    if isinstance(source, CheckpointReader):
        rules = [Rule(k, k) for k in source.keys()]  # converted: keys are target names already
        ignore: tuple[str, ...] = ()
    else:
        rules, ignore = rules_for(entry, cfg, source), entry.ignore
    checked = OnDemandModel(resolve(entry.model), cfg, rules, source, ignore=ignore, what=str(path),
                            fp8=stored_fp8, files=path, class_name=class_name)
    return checked


def load_model(
    path: str | os.PathLike,
    *,
    dtype: Any | None = None,
    expect: Iterable[str] | None = None,
    config_overrides: dict[str, Any] | None = None,
    weights: str | None = None,
    host: Callable[[str], bool] | None = None,
) -> nnx.Module:
    """Load a model from a jaxvid checkpoint or a diffusers/transformers folder (config.json + safetensors).

    `dtype` ("bf16" / "fp32" / "fp16", their long names, or a jnp dtype) sets both parameter and compute
    dtype; None uses the dtype that
    holds most of the stored weights (a bf16 checkpoint loads as bf16, an fp32 one as fp32).
    `expect` restricts the accepted model classes (clear error otherwise).
    `config_overrides` replaces config.json entries before the config is built (same keys and
    value formats as config.json, e.g. {"enable_bsa": True, "bsa_params": {...}} for LongCat);
    only run-time switches make sense here, since the weights must still fit the model.
    `weights="fp8"` quantizes the DiT's linear layers to e4m3 with per-channel scales after loading
    (jaxvid.models.fp8; CogVideoX and LongCat transformers); a checkpoint converted with
    `jaxvid-convert --weights fp8` loads as fp8 whatever `weights` says.
    A folder in LongCat-Video's INT8 weight-only layout (`<linear>.weight_int8` + `.weight_scale`,
    upstream's `base_model_int8/`) loads dequantized to `dtype` (convert.int8_weights).
    `host(path)`: True for the Params ('.'-joined paths, e.g. "transformer_blocks.ff.proj_in.kernel")
    that load straight into pinned host memory (an offload policy's parked weights: see
    models.offload.Offload.host_paths); None loads everything to the device. Quantizing to fp8
    after loading runs on the device, so with `weights="fp8"` on an unquantized checkpoint every
    Param loads to the device first (the caller parks them after).
    `check_model` does the checks without reading the weights (the pipelines' on-demand text encoder).
    """
    weights = resolve_weights(weights)
    checked = check_model(path, dtype=dtype, expect=expect, config_overrides=config_overrides)
    quantize = weights == "fp8" and not checked.fp8
    model = checked.load(host=None if quantize else host)  # quantized on the device below
    if quantize:
        quantize_model_fp8(model)
    log.info("loaded %s from %s%s", checked.class_name, path, " (fp8 linears)" if checked.fp8 or quantize else "")
    return model


def open_text_encoder(path: str | os.PathLike, dtype: Any, expect: Iterable[str], offload: Any
                      ) -> nnx.Module | OnDemandModel:
    """A pipeline's text encoder as `offload` (models.offload.Offload) wants it: checked and not
    read (an OnDemandModel) where the policy reads it on demand, else loaded (and parked if the
    policy parks it)."""
    if offload.on_demand("text_encoder"):
        return check_model(path, dtype=dtype, expect=expect)
    model = load_model(path, dtype=dtype, expect=expect, host=offload.host_paths("text_encoder"))
    offload.park_module("text_encoder", model)
    return model


class _WithoutInt8Pairs:
    """A tensor source minus the int8 weights and their scales (they must not pick the model dtype)."""

    def __init__(self, source: Any):
        self._source = source

    def keys(self) -> list[str]:
        return [k for k in self._source.keys() if not k.endswith((INT8_SUFFIX, INT8_SCALE_SUFFIX))]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(key)

    def dtype(self, key: str) -> Any:
        return self._source.dtype(key)


class _WithoutScales:
    """A tensor source minus its fp8 scale tensors (float32), so they do not pick the model dtype."""

    def __init__(self, source: Any):
        self._source = source

    def keys(self) -> list[str]:
        return [k for k in self._source.keys() if not Rule(k, k).target_path.endswith("." + SCALE_SUFFIX)]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(key)

    def dtype(self, key: str) -> Any:
        return self._source.dtype(key)


def count_params(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
