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
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{file}: corrupt safetensors header: {e}") from e
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{file}: tensor {key!r} has unsupported dtype {meta['dtype']}")
        dtype = _DTYPES[meta["dtype"]]
        shape = tuple(int(s) for s in meta["shape"])
        start, end = (int(o) for o in meta["data_offsets"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise SafetensorsError(f"{file}: tensor {key!r} byte range does not match shape {shape} {dtype}")
        if base + end > size:
            raise SafetensorsError(
                f"{file}: truncated safetensors file: tensor {key!r} needs bytes up to {base + end}, file has {size}"
            )
        out[key] = TensorInfo(file, dtype, shape, base + start, base + end)
    return out


class SafetensorsReader:
    """Index of every tensor in a .safetensors file or a folder of them; reads one at a time.

    `path` may be a .safetensors file, a folder with `*.safetensors.index.json` (sharded), or a
    folder with exactly the .safetensors files of one model.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        self._index: dict[str, TensorInfo] = {}
        if path.is_file():
            files = [path]
        elif path.is_dir():
            indices = sorted(path.glob("*.safetensors.index.json"))
            if len(indices) > 1:
                raise SafetensorsError(f"{path}: several index files {[p.name for p in indices]}; expected one")
            if indices:
                weight_map = json.loads(indices[0].read_text())["weight_map"]
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
            for key, info in read_header(f).items():
                if key in self._index:
                    raise SafetensorsError(f"{path}: tensor {key!r} appears in both {self._index[key].file.name} and {f.name}")
                self._index[key] = info
        if indices := (sorted(path.glob("*.safetensors.index.json")) if path.is_dir() else []):
            weight_map = json.loads(indices[0].read_text())["weight_map"]
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

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._index:
            yield key, self.read(key)


def write_safetensors_streaming(
    path: str | os.PathLike,
    specs: dict[str, tuple[tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a .safetensors file whose tensors are made one at a time by `produce(key)`.

    `specs` maps key -> (shape, dtype) so the header is written first; peak memory is one tensor.
    """
    inverse = {v: k for k, v in _DTYPES.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": inverse[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, (shape, dtype) in specs.items():
            arr = np.ascontiguousarray(produce(key))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"produce({key!r}) gave {arr.shape} {arr.dtype}; expected {tuple(shape)} {np.dtype(dtype)}")
            f.write(arr.tobytes())


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file from numpy arrays (bfloat16 included). Used by tests and bench."""
    inverse = {v: k for k, v in _DTYPES.items()}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    arrays = []
    for key, arr in tensors.items():
        arr = np.asarray(arr, order="C")  # ascontiguousarray would turn 0-d scalars into shape (1,)
        nbytes = arr.nbytes
        header[key] = {"dtype": inverse[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())
