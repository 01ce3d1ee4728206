"""Streaming safetensors reader: one tensor at a time, from a file, a sharded folder or a HF folder.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each key to
{dtype, shape, data_offsets}, then the raw bytes. We parse it ourselves (instead of
`safetensors.numpy`) because numpy cannot name bfloat16 and because reading one tensor with one
`pread` keeps peak memory at the size of that tensor.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.paths import UnsafePathError, allowed_root, inside, plain_name

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file or folder is malformed, truncated or inconsistent."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse one .safetensors header and check every tensor's bytes lie inside the file."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{file}: truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(f"{file}: truncated or corrupt safetensors header (length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{file}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{file}: corrupt safetensors header: a JSON {type(header).__name__}, expected an object")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name = meta["dtype"]
            shape = tuple(int(s) for s in meta["shape"])
            start, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(
                f"{file}: tensor {key!r} has a malformed header entry {meta!r}; expected dtype, shape and "
                "data_offsets [start, end]"
            ) from e
        if dtype_name not in _DTYPES:
            raise SafetensorsError(f"{file}: tensor {key!r} has unsupported dtype {dtype_name}")
        dtype = _DTYPES[dtype_name]
        if start < 0 or min(shape, default=0) < 0:
            raise SafetensorsError(f"{file}: tensor {key!r} has negative offsets or dims ({start}, {shape})")
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise SafetensorsError(f"{file}: tensor {key!r} byte range does not match shape {shape} {dtype}")
        if base + end > size:
            raise SafetensorsError(
                f"{file}: truncated safetensors file: tensor {key!r} needs bytes up to {base + end}, file has {size}"
            )
        out[key] = TensorInfo(file, dtype, shape, base + start, base + end)
    return out


def _weight_map(index_file: Path) -> dict[str, str]:
    """The `weight_map` (tensor key -> shard file name) of a sharded checkpoint's index.json."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SafetensorsError(f"{index_file}: not a safetensors index (expected JSON with a 'weight_map'): {e}") from e
    if not isinstance(weight_map, dict):
        raise SafetensorsError(f"{index_file}: weight_map is a {type(weight_map).__name__}; expected an object")
    for name in set(weight_map.values()):  # '../y' or '/etc/x' would open files outside the folder
        plain_name(name, what=f"{index_file}: shard")
    return weight_map


class SafetensorsReader:
    """Index of every tensor in a .safetensors file or a folder of them; reads one at a time.

    `path` may be a .safetensors file, a folder with `*.safetensors.index.json` (sharded), or a
    folder with exactly the .safetensors files of one model. Shard names must be plain names and
    every file must resolve inside the folder (or its Hugging Face cache repo, see convert.paths).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        # a file named by the caller is trusted wherever it links; files found by name in a folder are not
        root = allowed_root(path) if path.is_dir() else path.resolve().parent
        self.path = path
        self._index: dict[str, TensorInfo] = {}
        if path.is_file():
            files = [path]
        elif path.is_dir():
            indices = sorted(path.glob("*.safetensors.index.json"))
            if len(indices) > 1:
                raise SafetensorsError(f"{path}: several index files {[p.name for p in indices]}; expected one")
            if indices:
                weight_map = _weight_map(indices[0])
                files = sorted({path / name for name in weight_map.values()})
                missing = [f.name for f in files if not f.exists()]
                if missing:
                    raise SafetensorsError(f"{indices[0]}: shard files missing: {missing}")
            else:
                files = sorted(path.glob("*.safetensors"))
            if not files:
                raise SafetensorsError(f"{path}: no .safetensors files found")
        else:
            raise SafetensorsError(f"{path}: no such file or folder")
        for f in files:
            try:
                inside(f, root, what=str(path))
            except UnsafePathError as e:
                raise SafetensorsError(str(e)) from None
            for key, info in read_header(f).items():
                if key in self._index:
                    raise SafetensorsError(f"{path}: tensor {key!r} appears in both {self._index[key].file.name} and {f.name}")
                self._index[key] = info
        if path.is_dir() and indices:
            listed, found = set(weight_map), set(self._index)
            if listed != found:
                raise SafetensorsError(
                    f"{indices[0]}: index and shards disagree: only in index {sorted(listed - found)[:10]}, "
                    f"only in shards {sorted(found - listed)[:10]}"
                )

    def keys(self) -> list[str]:
        return list(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def info(self, key: str) -> TensorInfo:
        if key not in self._index:
            raise KeyError(f"{self.path}: no tensor named {key!r}")
        return self._index[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> np.dtype:
        return self.info(key).dtype

    def read(self, key: str) -> np.ndarray:
        """Read one tensor into a fresh numpy array (bfloat16 as ml_dtypes.bfloat16)."""
        info = self.info(key)
        buf = bytearray(info.end - info.start)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(buf)
        if got != len(buf):
            raise SafetensorsError(f"{info.file}: truncated while reading {key!r}")
        return np.frombuffer(buf, dtype=info.dtype).reshape(info.shape)

    def read_mapped(self, key: str) -> np.ndarray:
        """A read-only view of one tensor's bytes in a memory map of its file (no copy; pages are
        read when the view is touched). The loader hands it straight to a host->device copy, so
        bytes go from the page cache to the device without a per-tensor host copy. The view is
        only valid while the file is unchanged (as any mmap): it must not outlive the load.
        """
        info = self.info(key)
        count = int(np.prod(info.shape, dtype=np.int64))
        if count == 0:
            return np.zeros(info.shape, info.dtype)
        maps = self.__dict__.setdefault("_maps", {})
        if info.file not in maps:
            import mmap

            with open(info.file, "rb") as f:
                maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(maps[info.file], dtype=info.dtype, count=count, offset=info.start).reshape(info.shape)

    def release(self) -> None:
        """Forget the file maps `read_mapped` opened (each closes once no view of it is left); the
        next read maps the file again. A reader kept for later reads (an on-demand model) calls
        this after each load, so no map of a file outlives the load that used it."""
        self.__dict__.pop("_maps", None)

    def nbytes(self, key: str) -> int:
        """Stored size of one tensor in bytes."""
        info = self.info(key)
        return info.end - info.start

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._index:
            yield key, self.read(key)


def _header_bytes(specs: dict[str, tuple[tuple[int, ...], np.dtype]], metadata: dict[str, str] | None) -> bytes:
    """Header length (8 bytes, little-endian) + JSON header, padded to 8 bytes, for tensors laid out in order."""
    names = {v: k for k, v in _DTYPES.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, (shape, dtype) in specs.items():
        dtype = np.dtype(dtype)
        if dtype not in names:
            raise ValueError(f"tensor {key!r} has dtype {dtype}; expected one of {sorted(str(d) for d in names)}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors_streaming(
    path: str | os.PathLike,
    specs: dict[str, tuple[tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a .safetensors file whose tensors are made one at a time by `produce(key)`.

    `specs` maps key -> (shape, dtype) so the header is written first; peak memory is one tensor.
    On any error the partly written file is removed (a truncated file would look like a checkpoint).
    """
    header = _header_bytes(specs, metadata)
    try:
        with open(path, "wb") as f:
            f.write(header)
            for key, (shape, dtype) in specs.items():
                arr = np.ascontiguousarray(produce(key))
                if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                    raise ValueError(
                        f"produce({key!r}) gave {arr.shape} {arr.dtype}; expected {tuple(shape)} {np.dtype(dtype)}"
                    )
                f.write(arr.tobytes())
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file from numpy arrays (bfloat16 included). Used by tests and bench."""
    # asarray, not ascontiguousarray, which would turn 0-d scalars into shape (1,)
    arrays = {key: np.asarray(arr, order="C") for key, arr in tensors.items()}
    with open(path, "wb") as f:
        f.write(_header_bytes({k: (a.shape, a.dtype) for k, a in arrays.items()}, metadata))
        for arr in arrays.values():
            f.write(arr.tobytes())
