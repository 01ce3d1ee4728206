"""Load any registered model from a converted jaxvid checkpoint or its original HF folder.

Weights go into an abstract model (`nnx.eval_shape` -> `nnx.split` -> fill -> `nnx.merge`), so no
random init of billions of parameters happens and no second copy is kept.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.apply import check_rules, dominant_float_dtype, iter_assembled
from convert.checkpoint import CheckpointReader, is_checkpoint
from convert.keymap import Rule
from convert.safetensors_io import SafetensorsReader
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
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    return abstract_params(abstract)[1]


def fill_model(
    model_cls: Callable[..., nnx.Module],
    cfg: Any,
    rules: Iterable[Rule],
    source: Any,
    *,
    ignore: Iterable[str] = (),
    what: str = "checkpoint",
    fp8: bool = False,
) -> nnx.Module:
    """Build `model_cls(cfg)` abstractly and fill every Param from `source` through `rules`.

    fp8: the abstract model has fp8 linears (jaxvid.models.fp8), as a converted `--weights fp8`
    checkpoint stores them.

    Each parameter moves to the device as soon as it is complete and its host copy is dropped, so
    host memory holds only the stacked parameters still being assembled (with per-layer key tables,
    all stacked ones until the last layer is read) beyond what the device holds.
    """
    def build() -> nnx.Module:
        model = model_cls(cfg, rngs=nnx.Rngs(0))
        return quantize_model_fp8(model) if fp8 else model

    abstract = nnx.eval_shape(build)
    graphdef, specs, flat, rest = abstract_params(abstract)
    rules = check_rules(rules, source, specs, ignore=ignore, what=what)
    arrays = {path: jnp.asarray(host) for path, host in iter_assembled(rules, source, specs)}
    filled = []
    for path, v in flat:
        key = ".".join(str(p) for p in path)
        filled.append((path, v.replace(arrays.pop(key))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled), rest)


def config_for(entry: ModelEntry, hf_config: dict[str, Any], dtype: Any | None,
               where: str | os.PathLike = "config.json") -> Any:
    """The entry's config from a config.json dict; `dtype` (if given) sets param and compute dtype.
    Bad values raise one ValueError naming `where`."""
    cfg = parse_config(resolve(entry.config), hf_config, where)
    dtype = resolve_dtype(dtype)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    return cfg


def load_model(
    path: str | os.PathLike,
    *,
    dtype: Any | None = None,
    expect: Iterable[str] | None = None,
    config_overrides: dict[str, Any] | None = None,
    weights: str | None = None,
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
    """
    path = Path(path)
    weights = resolve_weights(weights)
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
    model = fill_model(resolve(entry.model), cfg, rules, source, ignore=ignore, what=str(path), fp8=stored_fp8)
    if weights == "fp8" and not stored_fp8:
        quantize_model_fp8(model)
    log.info("loaded %s from %s%s", class_name, path, " (fp8 linears)" if stored_fp8 or weights == "fp8" else "")
    return model


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
