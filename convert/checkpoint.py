"""jaxvid checkpoints: orbax-saved tensor groups plus a manifest, written atomically.

Layout of a checkpoint folder:
    jaxvid.json      manifest: format version, model class, every tensor's group / shape / dtype
    config.json      the model's own config (as in the source checkpoint)
    params/g00000/   one orbax PyTree checkpoint per group of tensors (~256 MB each)

Tensors are written in groups so that conversion streams: peak memory is one group, not the model.
Keys are concrete target names from a key table (`blocks.attn.kernel[3]` = slice 3 of a stacked
parameter), so a converted checkpoint is itself a tensor source for `convert.apply`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

FORMAT = "jaxvid-checkpoint"
VERSION = 1
MANIFEST = "jaxvid.json"
_GROUP_BYTES = 256 * 1024 * 1024

log = logging.getLogger(__name__)


def _dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype).name


def _dtype_from_name(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _checkpointer():
    import orbax.checkpoint as ocp  # heavy import, only when writing or reading

    return ocp.PyTreeCheckpointer()


class CheckpointWriter:
    """Write tensors group by group into a temp folder; `commit()` renames it to `dst`.

    Use as a context manager: on any exception, or when the block ends without `commit()`, the
    temp folder is removed and `dst` is untouched.
    """

    def __init__(
        self,
        dst: str | os.PathLike,
        *,
        class_name: str,
        config: dict[str, Any],
        extra: dict[str, Any] | None = None,
        group_bytes: int = _GROUP_BYTES,
        overwrite: bool = False,
    ):
        self.dst = Path(dst).absolute()
        if self.dst.exists() and not overwrite:
            raise FileExistsError(f"output {self.dst} already exists; remove it or pass overwrite")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        try:
            self.tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the checkpoint should read like any folder
            (self.tmp / "params").mkdir()
            self._ckpt = _checkpointer()
        except BaseException:
            self.abort()
            raise
        self.class_name, self.config, self.extra = class_name, config, extra or {}
        self.group_bytes, self.overwrite = group_bytes, overwrite
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._groups = 0
        self._tensors: dict[str, dict[str, Any]] = {}

    def add(self, key: str, array: np.ndarray) -> None:
        if key in self._tensors or key in self._pending:
            raise ValueError(f"tensor {key!r} written twice")
        self._pending[key] = array
        self._pending_bytes += array.nbytes
        if self._pending_bytes >= self.group_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"g{self._groups:05d}"
        # orbax treats '.' in dict keys as plain characters, but keep names simple and unique.
        tree = {f"t{i}": a for i, a in enumerate(self._pending.values())}
        self._ckpt.save(self.tmp / "params" / name, tree)
        for i, (key, a) in enumerate(self._pending.items()):
            self._tensors[key] = {"group": name, "item": f"t{i}", "shape": list(a.shape), "dtype": _dtype_name(a.dtype)}
        self._groups += 1
        self._pending, self._pending_bytes = {}, 0

    def copy_file(self, src: str | os.PathLike, name: str | None = None) -> None:
        """Copy a side file (tokenizer model, scheduler config) into the checkpoint."""
        src = Path(src)
        dst = self.tmp / (name or src.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)

    def commit(self) -> Path:
        self._flush()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "class_name": self.class_name,
            "extra": self.extra,
            "tensors": self._tensors,
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (self.tmp / "config.json").write_text(json.dumps(self.config, indent=2))
        if self.dst.exists() and self.overwrite:
            shutil.rmtree(self.dst)
        os.rename(self.tmp, self.dst)
        log.info("wrote %s (%d tensors, %d groups)", self.dst, len(self._tensors), self._groups)
        return self.dst

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()  # after a successful commit() the temp folder is already renamed away: a no-op


class CheckpointReader:
    """A converted checkpoint as a tensor source (`keys`, `shape`, `read`); loads one group at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise ValueError(f"{self.path} is not a jaxvid checkpoint (no {MANIFEST})")
        self.manifest = json.loads(manifest_file.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{manifest_file}: unsupported checkpoint format {self.manifest.get('format')} v{self.manifest.get('version')}")
        self.config: dict[str, Any] = json.loads((self.path / "config.json").read_text())
        self.class_name: str = self.manifest["class_name"]
        self._tensors: dict[str, dict[str, Any]] = self.manifest["tensors"]
        self._group_name: str | None = None
        self._group: dict[str, np.ndarray] = {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return _dtype_from_name(self._tensors[key]["dtype"])

    def read(self, key: str) -> np.ndarray:
        meta = self._tensors[key]
        if meta["group"] != self._group_name:
            self._group = {}  # drop the previous group before loading the next
            self._group = _checkpointer().restore(self.path / "params" / meta["group"])
            self._group_name = meta["group"]
        return np.asarray(self._group[meta["item"]])
