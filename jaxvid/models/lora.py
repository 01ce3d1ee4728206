"""LongCat-Video LoRAs (`cfg_step_lora`, `refinement_lora`, ...) in upstream's file layout.

Upstream (`longcat_video/modules/lora_utils.py`, `LongCatVideoTransformer3DModel.enable_loras`)
adds to a Linear layer's output, for every enabled LoRA that targets it:

    y += lora_up(lora_down(x)) * multiplier * alpha_scale

File layout, per target Linear named `M` (dots in M spelled `___lorahyphen___`, with a leading
`lora___lorahyphen___`):
    {name}.lora_down.weight          [n * r, in]
    {name}.lora_up.weight            [out, r]          (n = 1)
    {name}.lora_up.blocks.{j}.weight [out / n, r]      (n > 1: output slice j uses down rows j*r:(j+1)*r)
    {name}.alpha_scale               scalar            (upstream loads it strictly; else alpha / r)

Here a LoRA is either applied at run time (`model(..., lora=library.runtime())`: the base weights
stay untouched, the low-rank path is added inside each Linear) or merged into a copy of the
weights (`library.merged(model)`: W + multiplier * alpha_scale * up @ down, no run-time cost).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.keymap import Rule
from convert.safetensors_io import SafetensorsReader
from convert.transforms import linear_T
from jaxvid.models.abstract import abstract_model
from jaxvid.models.longcat import LongCatConfig, LongCatVideoTransformer3D, LoRAFactors

log = logging.getLogger(__name__)

__all__ = ["LoRA", "LoRALayer", "LoRALibrary", "load_lora", "runtime_factors", "merge_loras", "merge_into_state",
           "FusedLoRA", "fuse_lora", "unfuse_lora"]

_PREFIX = "lora___lorahyphen___"
_HYPHEN = "___lorahyphen___"
_KEY = re.compile(r"^(?P<name>.+?)\.(?P<part>lora_down\.weight|lora_up\.weight|lora_up\.blocks\.(?P<j>\d+)\.weight|alpha_scale)$")


@dataclasses.dataclass(frozen=True, slots=True)
class LoRALayer:
    """The low-rank update of one upstream Linear, in jaxvid's layout.

    module: upstream module name ('blocks.3.attn.qkv'); target: jaxvid module path ('blocks.attn.qkv');
    index: layer of a stacked target (None if not stacked); down [in, r_total]; up [r_total, out]
    (block-diagonal when upstream splits the output in n parts); alpha_scale: upstream's buffer.
    """

    module: str
    target: str
    index: int | None
    down: np.ndarray
    up: np.ndarray
    alpha_scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[1]


@dataclasses.dataclass(frozen=True, slots=True)
class LoRA:
    """One loaded LoRA file with its strength (`multiplier`, upstream's load_lora argument)."""

    name: str
    layers: tuple[LoRALayer, ...]
    multiplier: float = 1.0


def _module_name(lora_name: str) -> str:
    return lora_name.replace(_PREFIX, "").replace(_HYPHEN, ".")


def _linear_targets(cfg: LongCatConfig) -> dict[str, Rule]:
    """Upstream Linear module name -> the key-table rule of its weight."""
    from convert.keymaps.longcat import transformer_rules

    return {r.source[: -len(".weight")]: r for r in transformer_rules(cfg)
            if r.source.endswith(".weight") and r.transform.name == linear_T.name}


def _param_shapes(cfg: LongCatConfig) -> dict[str, tuple[int, ...]]:
    flat = nnx.to_flat_state(nnx.state(abstract_model(LongCatVideoTransformer3D, cfg), nnx.Param))
    return {".".join(str(p) for p in path): tuple(v.get_value().shape) for path, v in flat}


def load_lora(path: str | os.PathLike, cfg: LongCatConfig, name: str | None = None, *, multiplier: float = 1.0,
              alpha: float | None = 64.0) -> LoRA:
    """Read an upstream LoRA safetensors file and check it against the model of `cfg`.

    `alpha` is only used for layers whose file has no `alpha_scale` (then scale = alpha / rank, or 1
    when alpha is None or 0, as upstream). Raises ValueError naming every key that matches no
    Linear layer of the model, malformed keys and shape mismatches.
    """
    path = Path(path)
    reader = SafetensorsReader(path)
    groups: dict[str, dict[str, np.ndarray]] = {}
    malformed = []
    for key in reader.keys():
        m = _KEY.match(key)
        if not m:
            malformed.append(key)
            continue
        part = "up_block" if m["j"] is not None else m["part"]
        slot = groups.setdefault(m["name"], {})
        slot[part if part != "up_block" else f"up_block.{int(m['j'])}"] = reader.read(key).astype(np.float32)
    targets = _linear_targets(cfg)
    shapes = _param_shapes(cfg)
    unknown = sorted(f"{k} (module {_module_name(k)!r})" for k in groups if _module_name(k) not in targets)
    problems = []
    if malformed:
        problems.append(f"keys not in upstream's LoRA layout ({len(malformed)}): {sorted(malformed)[:20]}")
    if unknown:
        problems.append(f"LoRA modules that match no Linear layer of the model ({len(unknown)}): {unknown[:20]}")
    layers = []
    for lora_name, parts in sorted(groups.items()):
        module = _module_name(lora_name)
        if module not in targets:
            continue
        try:
            layers.append(_layer(module, targets[module], parts, shapes, alpha))
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError(f"{path}: LoRA does not fit the LongCat model:\n  " + "\n  ".join(problems))
    if not layers:
        raise ValueError(f"{path}: no LoRA layers found (expected keys like '{_PREFIX}blocks{_HYPHEN}0{_HYPHEN}"
                         f"attn{_HYPHEN}qkv.lora_down.weight')")
    lora = LoRA(name=name or path.stem, layers=tuple(layers), multiplier=float(multiplier))
    log.info("loaded LoRA %r from %s: %d layers", lora.name, path, len(layers))
    return lora


def _layer(module: str, rule: Rule, parts: dict[str, np.ndarray], shapes, alpha) -> LoRALayer:
    if "lora_down.weight" not in parts:
        raise ValueError(f"{module}: no lora_down.weight")
    down = parts["lora_down.weight"]  # [n * r, in]
    blocks = sorted((int(k.split(".")[1]), v) for k, v in parts.items() if k.startswith("up_block."))
    if blocks and "lora_up.weight" in parts:
        raise ValueError(f"{module}: both lora_up.weight and lora_up.blocks.* present")
    ups = [v for _, v in blocks] if blocks else [parts.get("lora_up.weight")]
    if ups[0] is None:
        raise ValueError(f"{module}: no lora_up weight")
    if blocks and [j for j, _ in blocks] != list(range(len(blocks))):
        raise ValueError(f"{module}: lora_up.blocks indices {[j for j, _ in blocks]} are not 0..{len(blocks) - 1}")
    n = len(ups)
    r = ups[0].shape[1]
    kernel_shape = shapes[rule.target_path]
    d_in, d_out = kernel_shape[-2:]
    if down.shape != (n * r, d_in) or any(u.shape != (d_out // n, r) for u in ups) or d_out % n:
        raise ValueError(f"{module}: lora_down {down.shape}, lora_up {[u.shape for u in ups]} do not fit the "
                         f"layer's [out={d_out}, in={d_in}] weight with rank {r} and {n} output parts")
    up = np.zeros((n * r, d_out), np.float32)  # block-diagonal: output part j reads rank block j
    for j, u in enumerate(ups):
        up[j * r:(j + 1) * r, j * (d_out // n):(j + 1) * (d_out // n)] = u.T
    if "alpha_scale" in parts:
        if parts["alpha_scale"].size != 1:
            raise ValueError(f"{module}: alpha_scale has shape {parts['alpha_scale'].shape}; expected a scalar")
        alpha_scale = float(parts["alpha_scale"].reshape(()))
    else:
        alpha_scale = (alpha / r) if alpha else 1.0
    return LoRALayer(module=module, target=rule.target_path.removesuffix(".kernel"), index=rule.target_index,
                     down=np.ascontiguousarray(down.T), up=up, alpha_scale=alpha_scale)


def runtime_factors(cfg: LongCatConfig, loras: Sequence[LoRA], dtype: Any = None) -> dict[str, LoRAFactors]:
    """Run-time updates for `model(..., lora=...)`: jaxvid module path -> LoRAFactors.

    Several LoRAs on one layer are concatenated along the rank axis (their updates add up); for
    stacked block layers every layer gets a slot, zero where a LoRA does not touch it.
    """
    dtype = jnp.dtype(dtype or cfg.dtype)
    by_target: dict[str, list[tuple[int, LoRALayer, float]]] = {}
    for li, lora in enumerate(loras):
        for layer in lora.layers:
            by_target.setdefault(layer.target, []).append((li, layer, lora.multiplier))
    out: dict[str, LoRAFactors] = {}
    for target, entries in by_target.items():
        stacked = entries[0][1].index is not None
        downs, ups, scales = [], [], []
        for li in sorted({e[0] for e in entries}):
            mine = [(layer, mult) for i, layer, mult in entries if i == li]
            r = max(layer.rank for layer, _ in mine)
            d_in, d_out = mine[0][0].down.shape[0], mine[0][0].up.shape[1]
            n_layers = cfg.depth if stacked else 1
            down = np.zeros((n_layers, d_in, r), np.float32)
            up = np.zeros((n_layers, r, d_out), np.float32)
            scale = np.zeros((n_layers, r), np.float32)
            for layer, mult in mine:
                i = layer.index or 0
                down[i, :, :layer.rank] = layer.down
                up[i, :layer.rank] = layer.up
                scale[i, :layer.rank] = mult * layer.alpha_scale
            downs.append(down), ups.append(up), scales.append(scale)
        down, up, scale = (np.concatenate(a, axis=-1 if k != 1 else -2) for k, a in enumerate((downs, ups, scales)))
        if not stacked:
            down, up, scale = down[0], up[0], scale[0]
        out[target] = LoRAFactors(jnp.asarray(down, dtype), jnp.asarray(up, dtype), jnp.asarray(scale, jnp.float32))
    return out


# ---------------------------------------------------------------------------------------------
# Merging into a state (every model's LoRAs: LongCat's and CogVideoX's)
# ---------------------------------------------------------------------------------------------


def _flat(state: nnx.State) -> dict[str, tuple[tuple, Any]]:
    return {".".join(str(p) for p in path): (path, var) for path, var in nnx.to_flat_state(state)}


@jax.jit
def _add_low_rank(kernel: jax.Array, down: jax.Array, up: jax.Array) -> jax.Array:
    """kernel + down @ up in fp32, cast back; stacked kernels [L, in, out] one layer at a time
    (lax.map), so only one layer's fp32 update is alive at once."""

    def one(args):
        w, d, u = args
        delta = jnp.matmul(d, u, precision=jax.lax.Precision.HIGHEST)
        return (w.astype(jnp.float32) + delta).astype(w.dtype)

    return jax.lax.map(one, (kernel, down, up)) if kernel.ndim == 3 else one((kernel, down, up))


def _factors(entries: list[tuple[LoRALayer, float]], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Several LoRAs on one kernel side by side along the rank axis, scales folded into `down`;
    layers of a stacked kernel that a LoRA does not touch get zeros (an exact no-op)."""
    stacked = len(shape) == 3
    d_in, d_out = shape[-2:]
    total = sum(layer.rank for layer, _ in entries)
    lead = (shape[0],) if stacked else ()
    down = np.zeros(lead + (d_in, total), np.float32)
    up = np.zeros(lead + (total, d_out), np.float32)
    off = 0
    for layer, weight in entries:
        if layer.down.shape[0] != d_in or layer.up.shape[1] != d_out:
            raise ValueError(f"LoRA layer {layer.module}: down {layer.down.shape} / up {layer.up.shape} do not fit "
                             f"the kernel [in={d_in}, out={d_out}]")
        sl = (layer.index,) if stacked else ()
        down[sl + (slice(None), slice(off, off + layer.rank))] = layer.down * np.float32(weight * layer.alpha_scale)
        up[sl + (slice(off, off + layer.rank), slice(None))] = layer.up
        off += layer.rank
    return down, up


def _updates(flat: Mapping[str, tuple[tuple, Any]], loras: Sequence[tuple[LoRA, float]]) -> dict[str, jax.Array]:
    by_path: dict[str, list[tuple[LoRALayer, float]]] = {}
    for lora, weight in loras:
        for layer in lora.layers:
            path = layer.target + ".kernel"
            if path not in flat:
                raise ValueError(f"LoRA {lora.name!r}: the model has no parameter {path}")
            by_path.setdefault(path, []).append((layer, float(weight) * lora.multiplier))
    out = {}
    for path, entries in by_path.items():
        kernel = flat[path][1].get_value()
        down, up = _factors(entries, tuple(kernel.shape))
        out[path] = _add_low_rank(kernel, jnp.asarray(down), jnp.asarray(up))
    return out


def _replace(state: nnx.State, flat, new_values: Mapping[str, Any]) -> nnx.State:
    items = []
    for key, (path, var) in flat.items():
        items.append((path, var.replace(new_values[key]) if key in new_values else var))
    return nnx.from_flat_state(items)


def merge_into_state(state: nnx.State, loras: Sequence[tuple[LoRA, float]]) -> nnx.State:
    """A new state whose kernels include the LoRAs: kernel + weight * scale * down @ up per adapter.

    `state`: the transformer's state (`nnx.split(model)[1]`); `loras`: (LoRA, weight) pairs.
    Untouched parameters are shared with `state`, which is not changed.
    """
    if not loras:
        return state
    flat = _flat(state)
    return _replace(state, flat, _updates(flat, loras))


@dataclasses.dataclass(frozen=True)
class FusedLoRA:
    """What `fuse_lora` changed: the adapters and weights fused, and the original kernels (on the
    host, with their device placement) so `unfuse_lora` restores them bit for bit."""

    adapters: tuple[tuple[str, float], ...]
    originals: Mapping[str, tuple[np.ndarray, Any]]


def fuse_lora(state: nnx.State, loras: Sequence[tuple[LoRA, float]]) -> tuple[nnx.State, FusedLoRA]:
    """Fuse (LoRA, weight) pairs into the weights: (fused state, record for `unfuse_lora`)."""
    flat = _flat(state)
    updates = _updates(flat, loras)
    originals = {}
    for key in updates:
        w = flat[key][1].get_value()
        originals[key] = (np.asarray(jax.device_get(w)), getattr(w, "sharding", None))
    record = FusedLoRA(tuple((lora.name, float(w)) for lora, w in loras), originals)
    return _replace(state, flat, updates), record


def unfuse_lora(state: nnx.State, fused: FusedLoRA) -> nnx.State:
    """The state with the kernels `fuse_lora` changed put back exactly as they were."""
    flat = _flat(state)
    missing = sorted(set(fused.originals) - set(flat))
    if missing:
        raise ValueError(f"unfuse_lora: the state has no parameters {missing[:5]}; is it the fused transformer's state?")
    restored = {k: jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)
                for k, (host, sharding) in fused.originals.items()}
    return _replace(state, flat, restored)


def merge_loras(model: LongCatVideoTransformer3D, loras: Iterable[LoRA]) -> LongCatVideoTransformer3D:
    """A new model whose Linear kernels include the LoRAs: W + multiplier * alpha_scale * down @ up.

    The update is formed in fp32 and cast to the parameter dtype; `model` itself is not changed.
    """
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, merge_into_state(state, [(lora, 1.0) for lora in loras]))


class LoRALibrary:
    """Loaded LoRAs by name and the enabled set (upstream's `lora_dict` / `enable_loras`).

    lib = LoRALibrary(model.cfg)
    lib.load("cfg_step_lora", ".../lora/cfg_step_lora.safetensors")
    lib.enable(["cfg_step_lora"])
    out = model(..., lora=lib.runtime())      # at run time, or:
    fast = lib.merged(model)                   # merged into a copy of the weights
    lib.disable_all()
    """

    def __init__(self, cfg: LongCatConfig):
        self.cfg = cfg
        self._loras: dict[str, LoRA] = {}
        self._enabled: list[str] = []

    def load(self, name: str, path: str | os.PathLike, *, multiplier: float = 1.0, alpha: float | None = 64.0) -> LoRA:
        self._loras[name] = load_lora(path, self.cfg, name, multiplier=multiplier, alpha=alpha)
        return self._loras[name]

    def add(self, lora: LoRA) -> None:
        self._loras[lora.name] = lora

    @property
    def names(self) -> list[str]:
        return list(self._loras)

    @property
    def enabled(self) -> list[str]:
        return list(self._enabled)

    def enable(self, names: Sequence[str]) -> None:
        """Enable exactly these LoRAs (replacing the previous set, like upstream's enable_loras)."""
        if isinstance(names, str):
            names = [names]
        missing = [n for n in names if n not in self._loras]
        if missing:
            raise ValueError(f"LoRA names {missing} are not loaded; loaded: {self.names}")
        self._enabled = list(dict.fromkeys(names))
        log.info("LoRAs enabled: %s", self._enabled)

    def disable_all(self) -> None:
        self._enabled = []

    def runtime(self, dtype: Any = None) -> dict[str, LoRAFactors] | None:
        """Factors of the enabled LoRAs for `model(..., lora=...)`, or None when none is enabled."""
        if not self._enabled:
            return None
        return runtime_factors(self.cfg, [self._loras[n] for n in self._enabled], dtype)

    def merged(self, model: LongCatVideoTransformer3D) -> LongCatVideoTransformer3D:
        """A copy of `model` with the enabled LoRAs merged into its weights."""
        return merge_loras(model, [self._loras[n] for n in self._enabled])
