"""Apply a key table to a tensor source, checked both ways against an abstract target.

The target is a flat mapping `path -> (shape, dtype)` (anything with `.shape` and `.dtype`, e.g.
`jax.ShapeDtypeStruct`), so this module knows nothing about Flax or jaxvid.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from convert.keymap import Rule

_MAX_LISTED = 40


class ConversionError(ValueError):
    """The key table, the source tensors and the target disagree; the message lists every difference."""


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def read(self, key: str) -> np.ndarray: ...


def _listing(title: str, items: list[str]) -> str:
    shown = "\n".join(f"    {x}" for x in items[:_MAX_LISTED])
    more = f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _is_float(dtype: Any) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name == "bfloat16"


def dtype_error(key: str, source_dtype: Any, target_dtype: Any) -> str | None:
    """Why a source tensor cannot be cast to its target (int8/bool into a float parameter would be
    silently reinterpreted as numbers: quantized or mask tensors are not weights); None if fine."""
    src, dst = np.dtype(source_dtype), np.dtype(target_dtype)
    if _is_float(src) != _is_float(dst) or (src.kind == "b") != (dst.kind == "b"):
        return f"{key}: stored as {src.name}, the parameter is {dst.name} (quantized or non-float tensors are not supported)"
    return None


def check_rules(
    rules: Iterable[Rule],
    source: TensorSource,
    target: Mapping[str, Any],
    *,
    ignore: Iterable[str] = (),
    what: str = "checkpoint",
) -> list[Rule]:
    """Check a key table both ways; return the rules in order, or raise one ConversionError.

    Checks: every rule's source key exists, every source key is used once (or matches an `ignore`
    regex), every target path is known and filled exactly once (every slice of a stacked one), and
    every transformed shape equals the target's, and no integer/bool tensor fills a float parameter.
    """
    rules = list(rules)
    ignore_res = [re.compile(p) for p in ignore]
    source_keys = set(source.keys())
    problems: list[str] = []

    missing = sorted({r.source for r in rules if r.source not in source_keys})
    used: dict[str, int] = {}
    for r in rules:
        used[r.source] = used.get(r.source, 0) + 1
    dup_sources = sorted(k for k, n in used.items() if n > 1)
    unused = sorted(k for k in source_keys - set(used) if not any(p.fullmatch(k) for p in ignore_res))

    filled: dict[str, set[int | None]] = {}
    unknown_targets: list[str] = []
    dup_targets: list[str] = []
    shape_errors: list[str] = []
    dtype_errors: list[str] = []
    source_dtype = getattr(source, "dtype", None)
    for r in rules:
        path, index = r.target_path, r.target_index
        if path not in target:
            unknown_targets.append(f"{r.target}  (from {r.source})")
            continue
        slots = filled.setdefault(path, set())
        if index in slots:
            dup_targets.append(r.target)
        slots.add(index)
        tshape = tuple(target[path].shape)
        if index is not None:
            if not tshape or index >= tshape[0]:
                shape_errors.append(f"{r.target}: index {index} outside stacked shape {tshape}")
                continue
            tshape = tshape[1:]
        if r.source in source_keys:
            try:
                got = tuple(r.transform.shape_fn(tuple(source.shape(r.source))))
            except ValueError as e:
                shape_errors.append(f"{r.source} -> {r.target}: {r.transform.name}: {e}")
                continue
            if source_dtype is not None and hasattr(target[path], "dtype"):
                err = dtype_error(r.source, source_dtype(r.source), target[path].dtype)
                if err:
                    dtype_errors.append(err)
            if got != tshape:
                shape_errors.append(
                    f"{r.source} {tuple(source.shape(r.source))} -{r.transform.name}-> {got} != {r.target} {tshape}"
                )

    unfilled: list[str] = []
    for path, spec in target.items():
        slots = filled.get(path)
        if not slots:
            unfilled.append(f"{path} {tuple(spec.shape)}")
        elif None not in slots:
            n = tuple(spec.shape)[0]
            absent = sorted(set(range(n)) - slots)
            if absent:
                unfilled.append(f"{path} slices {absent}")

    for title, items in (
        ("source keys the table expects but the checkpoint lacks", missing),
        ("checkpoint keys nothing uses (unexpected)", unused),
        ("source keys used twice", dup_sources),
        ("target parameters never filled", unfilled),
        ("target paths the model does not have", unknown_targets),
        ("target parameters filled twice", dup_targets),
        ("shape mismatches", shape_errors),
        ("dtype mismatches", dtype_errors),
    ):
        if items:
            problems.append(_listing(title, items))
    if problems:
        raise ConversionError(f"{what} does not match the model:\n" + "\n".join(problems))
    return rules


def dominant_float_dtype(source: Any) -> np.dtype | None:
    """The floating dtype holding most of a source's bytes (None if it has no float tensors).

    `source` needs `keys()`, `shape(key)` and `dtype(key)` (SafetensorsReader, CheckpointReader).
    """
    nbytes: dict[np.dtype, int] = {}
    for key in source.keys():
        dt = np.dtype(source.dtype(key))
        if dt.kind == "f" or dt.name == "bfloat16":
            nbytes[dt] = nbytes.get(dt, 0) + int(np.prod(source.shape(key), dtype=np.int64)) * dt.itemsize
    return max(nbytes, key=nbytes.__getitem__) if nbytes else None


def iter_converted(
    rules: Iterable[Rule], source: TensorSource, target: Mapping[str, Any]
) -> Iterator[tuple[Rule, np.ndarray]]:
    """Yield (rule, array) one tensor at a time: read, transform, cast to the target dtype."""
    for r in rules:
        arr = r.transform(source.read(r.source))
        dtype = np.dtype(target[r.target_path].dtype)
        err = dtype_error(r.source, arr.dtype, dtype)
        if err:
            raise ConversionError(err)
        yield r, np.ascontiguousarray(arr.astype(dtype, copy=False))


def iter_assembled(
    rules: Iterable[Rule], source: TensorSource, target: Mapping[str, Any]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (target path, complete array) as soon as each parameter is complete, in the rules' order.

    `rules` must have passed `check_rules` (every slice filled once). A stacked parameter is
    assembled slice by slice and yielded with its last slice; a plain one is yielded at once, so
    the caller can move each to a device and drop it. Rules are read in their given order (a
    converted checkpoint stores tensors in that order, so reads stay sequential).
    """
    partial: dict[str, tuple[np.ndarray, int]] = {}  # stacked path -> (buffer, slices still missing)
    for r, arr in iter_converted(rules, source, target):
        path, index = r.target_path, r.target_index
        if index is None:
            yield path, arr
            continue
        if path not in partial:
            spec = target[path]
            partial[path] = (np.empty(tuple(spec.shape), dtype=np.dtype(spec.dtype)), tuple(spec.shape)[0])
        buf, missing = partial[path]
        buf[index] = arr
        if missing == 1:
            del partial[path]
            yield path, buf
        else:
            partial[path] = (buf, missing - 1)


def load_flat(
    rules: Iterable[Rule],
    source: TensorSource,
    target: Mapping[str, Any],
    *,
    ignore: Iterable[str] = (),
    what: str = "checkpoint",
) -> dict[str, np.ndarray]:
    """Check the table, then assemble every target array in host memory (stacked ones slice by slice)."""
    rules = check_rules(rules, source, target, ignore=ignore, what=what)
    return dict(iter_assembled(rules, source, target))
