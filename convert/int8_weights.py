"""LongCat-Video's upstream INT8 weight-only checkpoints, read as ordinary float weights.

Upstream's format (LongCat-Video, `longcat_video/modules/quantization.py`, published for
avatar-v1.5 as `base_model_int8/`): every torch `nn.Linear` of the DiT except those whose name
contains a skip pattern (`final_layer.linear`) is stored as

    <module>.weight_int8   int8    [out, in]   round(w / scale) clamped to [-128, 127]
    <module>.weight_scale  float32 [out]       max_j |w[o, j]| / 127 (at least 1e-8 / 127)
    <module>.bias          as stored (bf16 upstream)

in shards `quantized_model-0000i-of-0000n.safetensors` listed by
`quantized_model.safetensors.index.json`, beside `config.json` and `quantization_config.json`
({"quantization_method": "int8_per_channel_symmetric", "skip_patterns": [...]}). Upstream
dequantizes in the compute dtype at every call: `weight_int8.to(dt) * weight_scale.to(dt)[:, None]`.

`Int8WeightOnlySource` wraps a tensor source (SafetensorsReader) and shows each pair as the float
`<module>.weight` it stands for, dequantized once, on read, by that same formula in the load dtype
(`dequantize_int8`), so the key tables and loaders see an ordinary checkpoint. Reading checks the
pairs are whole and consistent and that no linear outside the skip patterns is left in float
(a partially quantized file), with one ValueError naming the file and the keys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["INT8_SUFFIX", "SCALE_SUFFIX", "DEFAULT_SKIP_PATTERNS", "Int8WeightOnlySource", "dequantize_int8",
           "has_int8_weights"]

INT8_SUFFIX = ".weight_int8"
SCALE_SUFFIX = ".weight_scale"
DEFAULT_SKIP_PATTERNS = ("final_layer.linear",)  # upstream keeps these linears in float
QUANTIZATION_CONFIG = "quantization_config.json"
_METHOD = "int8_per_channel_symmetric"


def has_int8_weights(keys: Any) -> bool:
    """Whether a checkpoint's keys hold any upstream INT8 weight-only pair member."""
    return any(k.endswith(INT8_SUFFIX) or k.endswith(SCALE_SUFFIX) for k in keys)


def dequantize_int8(weight_int8: np.ndarray, weight_scale: np.ndarray, dtype: Any) -> np.ndarray:
    """Upstream's `weight_int8.to(dtype) * weight_scale.to(dtype).unsqueeze(1)`, bit for bit.

    weight_int8 int8 [out, in], weight_scale float [out] -> `dtype` [out, in]. Both operands are
    cast to `dtype` first (int8 is exact in every float type; the scale rounds once), and the
    product is rounded once to `dtype`: for bf16 and fp16 the float32 product of an int8 and a
    <= 11-bit significand is exact, so one rounding of it is what torch's 16-bit multiply gives.
    """
    dtype = np.dtype(dtype)
    w = np.asarray(weight_int8)
    s = np.asarray(weight_scale).astype(dtype)
    if dtype.itemsize >= 4:
        return w.astype(dtype) * s[:, None]
    return (w.astype(np.float32) * s.astype(np.float32)[:, None]).astype(dtype)


class Int8WeightOnlySource:
    """A tensor source (keys / shape / dtype / read / read_mapped / nbytes) showing every
    `<m>.weight_int8` + `<m>.weight_scale` pair of `source` as `<m>.weight` in `dtype`.

    `where`: the checkpoint folder (for messages and its quantization_config.json, if any).
    Raises ValueError for an incomplete pair, a pair beside a float `<m>.weight`, wrong dtypes or
    shapes, an unknown quantization method, or a 2-D float `<m>.weight` outside the skip patterns
    (a partially quantized file; upstream's own loader refuses it too).
    """

    def __init__(self, source: Any, dtype: Any, where: str | Path = "checkpoint"):
        self._source = source
        self._dtype = np.dtype(dtype)
        self._where = Path(where)
        skip = self._read_skip_patterns()
        keys = list(source.keys())
        key_set = set(keys)
        modules = sorted({k[: -len(INT8_SUFFIX)] for k in keys if k.endswith(INT8_SUFFIX)}
                         | {k[: -len(SCALE_SUFFIX)] for k in keys if k.endswith(SCALE_SUFFIX)})
        problems: list[str] = []
        self._pairs: dict[str, str] = {}  # "<m>.weight" -> "<m>"
        for m in modules:
            q, s, w = m + INT8_SUFFIX, m + SCALE_SUFFIX, m + ".weight"
            if q not in key_set or s not in key_set:
                problems.append(f"{m}: has {q if q in key_set else s} but not {s if q in key_set else q}")
                continue
            if w in key_set:
                problems.append(f"{m}: both a float {w} and an int8 pair")
                continue
            q_shape, s_shape = tuple(source.shape(q)), tuple(source.shape(s))
            if np.dtype(source.dtype(q)) != np.int8:
                problems.append(f"{q}: dtype {np.dtype(source.dtype(q))}; expected int8")
            elif len(q_shape) != 2:
                problems.append(f"{q}: shape {q_shape}; expected [out, in]")
            elif s_shape != q_shape[:1]:
                problems.append(f"{s}: shape {s_shape}; expected ({q_shape[0]},) (one scale per output row of {q})")
            elif np.dtype(source.dtype(s)).kind != "f" and np.dtype(source.dtype(s)).name != "bfloat16":
                problems.append(f"{s}: dtype {np.dtype(source.dtype(s))}; expected a float type")
            else:
                self._pairs[w] = m
        floats = sorted(k for k in keys if k.endswith(".weight") and len(source.shape(k)) == 2
                        and not any(p in k[: -len(".weight")] for p in skip))
        if floats and self._pairs:
            problems.append(f"partially quantized: {len(floats)} linear weight(s) outside the skip patterns {list(skip)} "
                            f"are float, e.g. {floats[:3]}; expected every one as {INT8_SUFFIX} + {SCALE_SUFFIX}")
        if problems:
            raise ValueError(f"{self._where}: not a valid INT8 weight-only checkpoint (LongCat-Video's "
                             f"{INT8_SUFFIX} + {SCALE_SUFFIX} layout): " + "; ".join(problems[:10])
                             + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
        paired = {m + sfx for m in self._pairs.values() for sfx in (INT8_SUFFIX, SCALE_SUFFIX)}
        self._keys = [k for k in keys if k not in paired] + list(self._pairs)

    def release(self) -> None:
        """The wrapped source's `release` (file maps / restored groups), if it has one."""
        release = getattr(self._source, "release", None)
        if release is not None:
            release()

    def _read_skip_patterns(self) -> tuple[str, ...]:
        file = self._where / QUANTIZATION_CONFIG
        if not file.is_file():
            return DEFAULT_SKIP_PATTERNS
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: cannot read it as JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{file}: expected a JSON object, got a {type(config).__name__}")
        method = config.get("quantization_method", _METHOD)
        if method != _METHOD:
            raise ValueError(f"{file}: quantization_method={method!r}; only {_METHOD!r} (LongCat-Video's INT8 "
                             "weight-only format) is supported")
        skip = config.get("skip_patterns", list(DEFAULT_SKIP_PATTERNS))
        if not isinstance(skip, list) or not all(isinstance(p, str) and p for p in skip):
            raise ValueError(f"{file}: skip_patterns={skip!r}; expected a list of module-name substrings")
        return tuple(skip)

    @property
    def quantized_keys(self) -> list[str]:
        """The `<m>.weight` keys that come from int8 pairs."""
        return list(self._pairs)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._pairs or (key in self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        m = self._pairs.get(key)
        return tuple(self._source.shape(m + INT8_SUFFIX if m else key))

    def dtype(self, key: str) -> np.dtype:
        return self._dtype if key in self._pairs else np.dtype(self._source.dtype(key))

    def nbytes(self, key: str) -> int:
        """Stored bytes (the pair's, for a dequantized weight)."""
        m = self._pairs.get(key)
        if m is None:
            return _nbytes(self._source, key)
        return _nbytes(self._source, m + INT8_SUFFIX) + _nbytes(self._source, m + SCALE_SUFFIX)

    def read(self, key: str) -> np.ndarray:
        m = self._pairs.get(key)
        if m is None:
            return self._source.read(key)
        return dequantize_int8(self._source.read(m + INT8_SUFFIX), self._source.read(m + SCALE_SUFFIX), self._dtype)

    def read_mapped(self, key: str) -> np.ndarray:
        """A memory-mapped view for stored tensors (as the wrapped source gives), a fresh array for
        dequantized ones."""
        m = self._pairs.get(key)
        mapped = getattr(self._source, "read_mapped", None) or self._source.read
        if m is None:
            return mapped(key)
        return dequantize_int8(mapped(m + INT8_SUFFIX), mapped(m + SCALE_SUFFIX), self._dtype)


def _nbytes(source: Any, key: str) -> int:
    if hasattr(source, "nbytes"):
        return int(source.nbytes(key))
    return int(np.prod(source.shape(key), dtype=np.int64)) * np.dtype(source.dtype(key)).itemsize
