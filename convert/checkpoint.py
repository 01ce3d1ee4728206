"""jaxvid checkpoints: orbax-saved tensor groups plus a manifest, written atomically.

Layout of a checkpoint folder:
    jaxvid.json      manifest: format version, model class, every tensor's group / shape / dtype /
                     crc32 of its bytes, and every group's files with their sizes
    config.json      the model's own config (as in the source checkpoint)
    params/g00000/   one orbax PyTree checkpoint per group of tensors (~256 MB each)

Tensors are written in groups so that conversion streams: peak memory is one group, not the model.
Keys are concrete target names from a key table (`blocks.attn.kernel[3]` = slice 3 of a stacked
parameter), so a converted checkpoint is itself a tensor source for `convert.apply`.

Integrity: every read checks the tensor's shape and dtype against the manifest and the group's
file sizes before orbax opens them (a truncated or missing file is named, not a storm of orbax
errors). The crc32 of each tensor's bytes is checked when asked: `verify_checksums=True`, or the
environment variable JAXVID_VERIFY_CHECKSUMS=1 for every load (load_model, load_pipeline, ...).
Not by default: crc32 added 29-35% to reading a 0.54 GB checkpoint on our 2-core CPU
(bench/checksum_cost.py), over the 10% we allow. `verify_checkpoint` (`jaxvid-convert --verify`)
always checks everything. Checkpoints written before checksums were recorded still load.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

FORMAT = "jaxvid-checkpoint"
VERSION = 1
MANIFEST = "jaxvid.json"
VERIFY_ENV = "JAXVID_VERIFY_CHECKSUMS"
_GROUP_BYTES = 256 * 1024 * 1024

log = logging.getLogger(__name__)


def _dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype).name


def _dtype_from_name(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class CheckpointError(ValueError):
    """A converted checkpoint is malformed, truncated or corrupt; the message names the file or tensors."""


def tensor_crc32(array: np.ndarray) -> int:
    """crc32 of an array's bytes in C order (bfloat16 included)."""
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def read_json_object(path: Path, *, what: str = "") -> dict[str, Any]:
    """A JSON file holding an object; one-line CheckpointError naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing{what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}){what}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}; expected an object{what}")
    return data


def _quiet_closed_loop(unraisable) -> None:
    """After a failed orbax restore, tensorstore's pending reads call back into the closed event
    loop, each printing 'RuntimeError: Event loop is closed'; those say nothing, drop them.

    They arrive through `sys.unraisablehook` (with no object, so the default hook prints a bare
    traceback) from tensorstore's own threads, whenever each pending read completes: often while
    orbax is still unwinding its failed `asyncio.run`, before our `except` runs, sometimes at exit.
    So the hook must be in place before the restore starts, not installed after the failure."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    _previous_hook(unraisable)


_previous_hook = sys.unraisablehook
_TENSORSTORE_STATUS = re.compile(r"^[A-Z][A-Z_]+: ")  # tensorstore's errors start with an absl status code


def _is_abandoned_read(exc: BaseException | None) -> bool:
    """The closed-loop RuntimeError, or a tensorstore read error, anywhere in an exception's chain."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return True
        if isinstance(exc, ValueError) and _TENSORSTORE_STATUS.match(str(exc)):
            return True
        exc, seen = exc.__context__, seen + 1
    return False


class _AbandonedReadsFilter(logging.Filter):
    """The second path of the same noise: orbax closes its event loop with the other reads' tasks still
    holding their errors, and when those tasks are garbage collected asyncio logs "Task exception was
    never retrieved" (logger 'asyncio', with the traceback) once per read. Drop exactly those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _is_abandoned_read(record.exc_info[1]))


_ABANDONED_READS = _AbandonedReadsFilter()


def _install_closed_loop_filter() -> None:
    global _previous_hook
    if sys.unraisablehook is not _quiet_closed_loop:
        _previous_hook = sys.unraisablehook
        sys.unraisablehook = _quiet_closed_loop
    logging.getLogger("asyncio").addFilter(_ABANDONED_READS)  # a no-op when already there


def _group_files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


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
        self._group_sizes: dict[str, dict[str, int]] = {}

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
            self._tensors[key] = {"group": name, "item": f"t{i}", "shape": list(a.shape), "dtype": _dtype_name(a.dtype),
                                  "crc32": tensor_crc32(a)}
        self._group_sizes[name] = _group_files(self.tmp / "params" / name)
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
            "groups": self._group_sizes,
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
    """A converted checkpoint as a tensor source (`keys`, `shape`, `read`); loads one group at a time.

    Every `read` checks shape and dtype against the manifest; `verify_checksums` also checks each
    tensor's crc32 (when the checkpoint recorded one); None: on when JAXVID_VERIFY_CHECKSUMS=1.
    Raises CheckpointError naming what is wrong.
    """

    def __init__(self, path: str | os.PathLike, *, verify_checksums: bool | None = None):
        if verify_checksums is None:
            verify_checksums = os.environ.get(VERIFY_ENV, "") not in ("", "0")
        # orbax refuses relative paths ("Checkpoint path should be absolute"): resolve once here.
        self.path = Path(path).absolute()
        self.verify_checksums = verify_checksums
        manifest_file = self.path / MANIFEST
        if not manifest_file.is_file():
            raise ValueError(f"{self.path} is not a jaxvid checkpoint (no {MANIFEST})")
        self.manifest = read_json_object(manifest_file)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise CheckpointError(f"{manifest_file}: unsupported checkpoint format {self.manifest.get('format')} v{self.manifest.get('version')}")
        self.config: dict[str, Any] = read_json_object(self.path / "config.json")
        self.class_name: str = self.manifest.get("class_name")
        self._tensors: dict[str, dict[str, Any]] = self.manifest.get("tensors")
        if not isinstance(self.class_name, str) or not isinstance(self._tensors, dict):
            raise CheckpointError(f"{manifest_file}: malformed manifest (expected 'class_name' and a 'tensors' object)")
        self._groups: dict[str, dict[str, int]] = self.manifest.get("groups") or {}
        self._group_name: str | None = None
        self._group: dict[str, np.ndarray] = {}

    @property
    def has_checksums(self) -> bool:
        return all("crc32" in meta for meta in self._tensors.values())

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return _dtype_from_name(self._tensors[key]["dtype"])

    def group_keys(self, group: str) -> list[str]:
        return [k for k, m in self._tensors.items() if m["group"] == group]

    def _check_group_files(self, group: str) -> None:
        folder = self.path / "params" / group
        if group != Path(group).name or not folder.resolve().is_relative_to(self.path.resolve()):
            raise CheckpointError(f"{self.path / MANIFEST}: group name {group!r} is not a plain folder name")
        for rel, size in self._groups.get(group, {}).items():
            f = folder / rel
            if not f.is_file():
                raise CheckpointError(f"{f}: missing (group {group} of {self.path})")
            if f.stat().st_size != size:
                raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {size} when written (truncated or replaced)")

    def _load_group(self, group: str) -> dict[str, np.ndarray]:
        self._check_group_files(group)
        _install_closed_loop_filter()  # before the restore: its noise can come before the except below runs
        try:
            return _checkpointer().restore(self.path / "params" / group)
        except Exception as e:  # orbax/tensorstore raise many types; say which group and why, in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path / 'params' / group}: cannot be read ({first}); "
                                  f"run `jaxvid-convert --verify {self.path}`") from None

    def release(self) -> None:
        """Drop the restored group `read` keeps for the next key (host memory of up to a group's
        size); the next read restores it again."""
        self._group, self._group_name = {}, None

    def read(self, key: str) -> np.ndarray:
        meta = self._tensors[key]
        if meta["group"] != self._group_name:
            self._group, self._group_name = {}, None  # drop the previous group before loading the next
            self._group = self._load_group(meta["group"])
            self._group_name = meta["group"]
        array = np.asarray(self._group[meta["item"]])
        if array.shape != tuple(meta["shape"]) or _dtype_name(array.dtype) != meta["dtype"]:
            raise CheckpointError(f"{self.path}: tensor {key!r} is {array.shape} {_dtype_name(array.dtype)}; "
                                  f"the manifest says {tuple(meta['shape'])} {meta['dtype']}")
        if self.verify_checksums and "crc32" in meta and tensor_crc32(array) != meta["crc32"]:
            raise CheckpointError(f"{self.path}: tensor {key!r} fails its checksum (crc32 {tensor_crc32(array):#010x}, "
                                  f"{meta['crc32']:#010x} when written): the file is corrupt; convert again")
        return array


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Read every tensor of a converted checkpoint; return one line per problem (empty: all good).

    Checks file sizes, that orbax can read every group, shapes, dtypes and crc32 checksums.
    """
    reader = CheckpointReader(path, verify_checksums=True)
    problems: list[str] = []
    if not reader.has_checksums:
        log.warning("%s: no checksums recorded (converted before jaxvid recorded them); shapes and dtypes "
                    "checked only", reader.path)
    by_group: dict[str, list[str]] = {}
    for key, meta in reader._tensors.items():
        by_group.setdefault(meta["group"], []).append(key)
    for group, keys in by_group.items():
        try:
            data = reader._load_group(group)
        except CheckpointError as e:
            problems.append(f"{e} (tensors: {', '.join(keys)})")
            continue
        for key in keys:
            meta = reader._tensors[key]
            if meta["item"] not in data:
                problems.append(f"{reader.path}: tensor {key!r} missing from group {group}")
                continue
            array = np.asarray(data[meta["item"]])
            if array.shape != tuple(meta["shape"]) or _dtype_name(array.dtype) != meta["dtype"]:
                problems.append(f"{reader.path}: tensor {key!r} is {array.shape} {_dtype_name(array.dtype)}; "
                                f"manifest {tuple(meta['shape'])} {meta['dtype']}")
            elif "crc32" in meta and tensor_crc32(array) != meta["crc32"]:
                problems.append(f"{reader.path}: tensor {key!r} fails its crc32 checksum (corrupt)")
        del data
    return problems
