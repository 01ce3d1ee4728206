"""CogVideoX LoRAs as diffusers users know them: named adapters with weights, fuse / unfuse.

Two published file layouts are read, for every Linear of the transformer (and the Conv2d patch
embedding of CogVideoX 1.0, which a LoRA sees as a Linear over flattened patches):

  diffusers / PEFT (`CogVideoXPipeline.save_lora_weights`, finetrainers, CogVideo's finetune):
      transformer.{module}.lora_A.weight [r, in]    transformer.{module}.lora_B.weight [out, r]
      scale alpha / r (alpha / sqrt(r) with use_rslora) from the adapter config that diffusers
      stores as JSON in the safetensors metadata (`lora_adapter_metadata`, keys "transformer.r",
      "transformer.lora_alpha", ".rank_pattern", ".alpha_pattern", matched as PEFT matches them);
      a file without it has scale 1 (diffusers' rule: alpha = rank).
  kohya (CogVideoX-Fun's LoRANetwork, ComfyUI-era trainers):
      lora_unet__{module with '.' -> '_'}.lora_down.weight [r, in] / .lora_up.weight [out, r] / .alpha
      (the double '_' is the transformer root's empty name; a single '_' and dotted module names
      are read too); scale alpha / r, alpha missing or 0 -> 1 (kohya's rule).

The update of one Linear is W' = W + sum_a weight_a * scale_a * (up_a @ down_a) in torch's layout,
i.e. kernel' = kernel + sum_a weight_a * scale_a * (down_a^T @ up_a^T) for jaxvid's [in, out]
kernels, formed in fp32 on the device and cast to the parameter dtype. Everything works on the transformer's
NNX state (`graphdef, state = nnx.split(model)`): `merge_into_state` returns a new state with
adapters added (the base untouched), `fuse_lora` / `unfuse_lora` replace the base and give it back
bit for bit (the touched kernels are kept on the host meanwhile). `CogVideoXLoRAAdapters` is the
named set with diffusers' semantics, and `CogVideoXLoraLoaderMixin` its pipeline face.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from convert.keymap import Rule
from convert.safetensors_io import SafetensorsReader
from convert.transforms import linear_T
from jaxvid.models.cogvideox import CogVideoXConfig
from jaxvid.models.lora import (  # the one merge implementation, shared with LongCat
    FusedLoRA,
    LoRA,
    LoRALayer,
    fuse_lora,
    merge_into_state,
    unfuse_lora,
)

log = logging.getLogger(__name__)

__all__ = [
    "LoRATarget", "lora_targets", "load_cogvideox_lora", "merge_into_state", "FusedLoRA", "fuse_lora",
    "unfuse_lora", "CogVideoXLoRAAdapters", "CogVideoXLoraLoaderMixin",
]

# ---------------------------------------------------------------------------------------------
# Key table: which tensors of a LoRA file belong to which module, in each published layout
# ---------------------------------------------------------------------------------------------

# Prefixes in front of the module name (stripped; the first that matches wins).
_PEFT_PREFIXES = ("transformer.", "base_model.model.")
_KOHYA_UNDERSCORED = re.compile(r"^lora_(?:unet|transformer)_+")  # lora_unet__transformer_blocks_0_attn1_to_q
_KOHYA_DOTTED_PREFIXES = ("transformer.", "diffusion_model.", "lora_unet.")
# Text encoder LoRAs: not used by CogVideoX pipelines (diffusers' CogVideoX loader ignores them too).
_TEXT_ENCODER = re.compile(r"^(?:text_encoder\.|lora_te\d*_)")

# layout -> (key pattern, part names in that layout -> our names)
_LAYOUTS: dict[str, tuple[re.Pattern[str], dict[str, str]]] = {
    "peft": (re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                        r"lora_magnitude_vector(?:\.weight)?|dora_scale)$"),
             {"lora_A.weight": "down", "lora_B.weight": "up"}),
    "kohya": (re.compile(r"^(?P<module>.+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|dora_scale)$"),
              {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}),
}


@dataclasses.dataclass(frozen=True, slots=True)
class LoRATarget:
    """A module a LoRA may adapt: its jaxvid parameter (path without '.kernel', slice of a stacked
    one or None) and whether it is the Conv2d patch embedding (its LoRA tensors are 4-D)."""

    module: str
    target: str
    index: int | None
    conv: bool


def lora_targets(cfg: CogVideoXConfig) -> dict[str, LoRATarget]:
    """diffusers module name -> target, for every Linear (and the Conv2d patchifier) of `cfg`'s model.

    Derived from the checkpoint key table (convert/keymaps/cogvideox.py), so the two cannot drift.
    """
    from convert.keymaps.cogvideox import conv_patch_to_linear, transformer_rules

    out = {}
    for r in transformer_rules(cfg):
        r: Rule
        if r.source.endswith(".weight") and r.transform.name in (linear_T.name, conv_patch_to_linear.name):
            module = r.source[: -len(".weight")]
            out[module] = LoRATarget(module, r.target_path.removesuffix(".kernel"), r.target_index,
                                     r.transform.name == conv_patch_to_linear.name)
    return out


# ---------------------------------------------------------------------------------------------
# Reading a file
# ---------------------------------------------------------------------------------------------


def _lora_file(source: str | os.PathLike, weight_name: str | None = None) -> Path:
    """A LoRA file: the path itself, `weight_name` in a folder, or the one .safetensors file of a
    folder (diffusers' default name first). A Hub id ('owner/name') resolves in the local cache."""
    path = Path(source).expanduser()
    if not path.exists():
        from jaxvid.hub import looks_like_repo_id, resolve_model_path

        if looks_like_repo_id(source):
            path = resolve_model_path(source)
    if weight_name is not None:
        if not path.is_dir():
            raise ValueError(f"weight_name={weight_name!r} needs a folder or a model id; {path} is not a folder")
        path = path / weight_name
    if path.is_dir():
        default = path / "pytorch_lora_weights.safetensors"
        if default.is_file():
            return default
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ValueError(f"{path}: expected pytorch_lora_weights.safetensors or exactly one .safetensors file, "
                             f"found {[p.name for p in found]}")
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"LoRA path {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA path {path}: expected a .safetensors file (pickled .bin files are not read)")
    return path


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata() or {})


def _adapter_config(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """PEFT's LoraConfig dict from diffusers' `lora_adapter_metadata` (prefix 'transformer.' removed)."""
    if not metadata:
        return None
    raw = metadata.get("lora_adapter_metadata", metadata)
    cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
    if any(k.startswith("transformer.") for k in cfg):
        cfg = {k.removeprefix("transformer."): v for k, v in cfg.items() if k.startswith("transformer.")}
    return cfg if ("r" in cfg or "lora_alpha" in cfg) else None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT (utils/other.py get_pattern_key): the first pattern p with re.match(rf"(.*\.)?({p})$", module)
    for p, value in patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return value
    return default


def _peft_scale(config: Mapping[str, Any] | None, module: str, rank: int) -> float:
    if config is None:
        return 1.0  # diffusers without metadata: lora_alpha = r
    if config.get("use_dora"):
        raise ValueError("DoRA adapters (use_dora=True) are not supported")
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
    if int(r) != rank:
        raise ValueError(f"{module}: the adapter config says rank {r} but lora_A has {rank} rows")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


def _split_key(key: str, layouts_seen: set[str]) -> tuple[str, str, str] | None:
    """(layout, module name as written, our part name) of one tensor key, or None if it is no LoRA tensor."""
    for layout, (pattern, parts) in _LAYOUTS.items():
        m = pattern.match(key)
        if m:
            part = m["part"]
            if part not in parts:
                what = "DoRA" if "magnitude" in part or "dora" in part else "LoRA bias (lora_bias=True)"
                raise ValueError(f"{key}: {what} adapters are not supported")
            layouts_seen.add(layout)
            return layout, m["module"], parts[part]
    return None


def _module_name(layout: str, written: str, underscored: Mapping[str, str]) -> str | None:
    if layout == "peft":
        for p in _PEFT_PREFIXES:
            if written.startswith(p):
                return written[len(p):]
        return written
    m = _KOHYA_UNDERSCORED.match(written)
    if m:  # dots spelled '_': look the name up instead of guessing where the dots were
        return underscored.get(written[m.end():])
    for p in _KOHYA_DOTTED_PREFIXES:
        if written.startswith(p):
            return written[len(p):]
    return written


def load_cogvideox_lora(
    source: str | os.PathLike | Mapping[str, np.ndarray],
    cfg: CogVideoXConfig,
    name: str | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    weight_name: str | None = None,
) -> LoRA:
    """Read a CogVideoX LoRA: a .safetensors file, a folder holding one (or `weight_name` in it),
    a model id already in the local Hugging Face cache, or a state dict of arrays.

    Checks every tensor against the model of `cfg`: raises ValueError naming keys that match no
    module, tensors of the wrong shape, layouts mixed in one file, DoRA / LoRA-bias adapters.
    Text-encoder tensors are skipped with a warning (CogVideoX pipelines adapt the transformer
    only). `metadata`: the adapter config for a state dict (a file's own metadata is read).
    The returned LoRA has multiplier 1; adapter weights are applied when merging.
    """
    if isinstance(source, Mapping):
        tensors = {k: np.asarray(v) for k, v in source.items()}
        label, default_name = "state dict", "default"
        read = tensors.__getitem__
        keys = list(tensors)
    else:
        path = _lora_file(source, weight_name)
        reader = SafetensorsReader(path)
        metadata = metadata if metadata is not None else _read_metadata(path)
        label, default_name, read, keys = str(path), path.stem, reader.read, reader.keys()
    targets = lora_targets(cfg)
    underscored = {m.replace(".", "_"): m for m in targets}
    config = _adapter_config(metadata)

    layouts: set[str] = set()
    groups: dict[str, dict[str, np.ndarray]] = {}
    unknown, skipped = [], []
    for key in keys:
        if _TEXT_ENCODER.match(key):
            skipped.append(key)
            continue
        split = _split_key(key, layouts)
        if split is None:
            unknown.append(f"{key} (not a LoRA tensor name)")
            continue
        layout, written, part = split
        if len(layouts) > 1:
            raise ValueError(f"{label}: keys mix the diffusers/PEFT (lora_A/lora_B) and kohya (lora_down/lora_up) "
                             f"layouts (e.g. {key})")
        module = _module_name(layout, written, underscored)
        if module not in targets:
            unknown.append(f"{key} (module {module or written!r} is not a Linear of the model)")
            continue
        slot = groups.setdefault(module, {})
        if part in slot:
            raise ValueError(f"{label}: module {module!r} has two {part} tensors (key {key})")
        slot[part] = np.asarray(read(key), dtype=np.float32)
    if skipped:
        log.warning("%s: skipped %d text-encoder LoRA tensors (CogVideoX adapts the transformer only)", label, len(skipped))
    problems = []
    if unknown:
        problems.append(f"keys that match no module of the model ({len(unknown)}): {sorted(unknown)[:20]}")
    layout = next(iter(layouts), None)
    layers = []
    for module, parts in sorted(groups.items()):
        try:
            layers.append(_layer(targets[module], parts, layout, config))
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError(f"{label}: LoRA does not fit the CogVideoX model:\n  " + "\n  ".join(problems))
    if not layers:
        raise ValueError(f"{label}: no transformer LoRA tensors found (expected keys like "
                         "'transformer.transformer_blocks.0.attn1.to_q.lora_A.weight' or "
                         "'lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight')")
    lora = LoRA(name=name or default_name, layers=tuple(layers), multiplier=1.0)
    log.info("loaded CogVideoX LoRA %r (%s layout) from %s: %d layers", lora.name, layout, label, len(layers))
    return lora


def _layer(t: LoRATarget, parts: dict[str, np.ndarray], layout: str, config) -> LoRALayer:
    if "down" not in parts or "up" not in parts:
        raise ValueError(f"{t.module}: has {sorted(parts)}; needs both the down (lora_A / lora_down) and up "
                         "(lora_B / lora_up) weights")
    down, up = parts["down"], parts["up"]
    if t.conv:  # PEFT's Conv2d LoRA: lora_A [r, in, p, p] (stride p), lora_B [out, r, 1, 1]
        if down.ndim != 4 or up.ndim != 4 or up.shape[2:] != (1, 1):
            raise ValueError(f"{t.module}: a Conv2d LoRA needs 4-D tensors (down [r, in, p, p], up [out, r, 1, 1]); "
                             f"got {down.shape}, {up.shape}")
        down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], up.shape[1])
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise ValueError(f"{t.module}: down {down.shape} and up {up.shape} are not [r, in] and [out, r]")
    rank = down.shape[0]
    if layout == "kohya":
        alpha = float(parts["alpha"].reshape(())) if "alpha" in parts else 0.0
        scale = alpha / rank if alpha else 1.0
    else:
        scale = _peft_scale(config, t.module, rank)
    return LoRALayer(module=t.module, target=t.target, index=t.index, down=np.ascontiguousarray(down.T),
                     up=np.ascontiguousarray(up.T), alpha_scale=scale)


# ---------------------------------------------------------------------------------------------
# Named adapters, diffusers' semantics
# ---------------------------------------------------------------------------------------------


class CogVideoXLoRAAdapters:
    """Loaded adapters by name, the active set with weights, and what is fused (diffusers' model).

        adapters = CogVideoXLoRAAdapters(cfg)
        adapters.load("style.safetensors", adapter_name="style")           # active: style (1.0)
        adapters.load("motion.safetensors", adapter_name="motion", scale=0.5)  # active: motion only, as diffusers
        adapters.set_adapters(["style", "motion"], [1.0, 0.5])
        run_state = adapters.apply(base_state)       # base + active adapters, base untouched
        base_state = adapters.fuse(base_state)       # fused into the weights ...
        base_state = adapters.unfuse(base_state)     # ... and back, bit for bit

    As in diffusers, loading an adapter makes it the only active one (its weight = `scale`);
    `set_adapters` activates several. Fused adapters are part of the base state: `apply` adds
    only the active adapters that are not fused.
    """

    def __init__(self, cfg: CogVideoXConfig):
        self.cfg = cfg
        self._loras: dict[str, LoRA] = {}
        self._active: dict[str, float] = {}
        self._enabled = True
        self._fused: FusedLoRA | None = None

    # ---- loading ------------------------------------------------------------------------
    def load(self, source: str | os.PathLike | Mapping[str, np.ndarray], adapter_name: str | None = None,
             scale: float = 1.0, *, metadata: Mapping[str, Any] | None = None, weight_name: str | None = None) -> str:
        """Load an adapter and make it the active one with weight `scale`; returns its name
        (default: 'default_<n>', as diffusers names them)."""
        if adapter_name is None:
            n = 0
            while f"default_{n}" in self._loras:
                n += 1
            adapter_name = f"default_{n}"
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name={adapter_name!r}; expected a non-empty string")
        if adapter_name in self._loras:
            raise ValueError(f"adapter_name={adapter_name!r} is already loaded; pick another name or delete it first")
        self._check_not_fused("load an adapter")
        self._loras[adapter_name] = load_cogvideox_lora(source, self.cfg, adapter_name, metadata=metadata,
                                                        weight_name=weight_name)
        self._active = {adapter_name: _weight("scale", scale)}
        return adapter_name

    # ---- the active set -----------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._loras)

    @property
    def active(self) -> dict[str, float]:
        """Active adapter names -> weights (empty when disabled)."""
        return dict(self._active) if self._enabled else {}

    @property
    def fused(self) -> FusedLoRA | None:
        return self._fused

    def set_adapters(self, adapter_names: str | Sequence[str], weights: float | Sequence[float] | None = None) -> None:
        """Activate exactly these adapters with these weights (default 1.0 each)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if weights is None:
            weights = [1.0] * len(names)
        elif isinstance(weights, (int, float)):
            weights = [weights] * len(names)
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f"weights: {len(weights)} values for {len(names)} adapter_names")
        missing = [n for n in names if n not in self._loras]
        if missing:
            raise ValueError(f"adapter_names {missing} are not loaded; loaded: {self.names}")
        self._check_not_fused("change the active adapters")
        self._active = {n: _weight(f"weights[{i}]", w) for i, (n, w) in enumerate(zip(names, weights))}
        self._enabled = True

    def disable(self) -> None:
        self._check_not_fused("disable the adapters")
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def delete(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self._loras]
        if missing:
            raise ValueError(f"adapter_names {missing} are not loaded; loaded: {self.names}")
        if self._fused and any(n in dict(self._fused.adapters) for n in names):
            raise ValueError(f"adapters {names} are fused into the weights; unfuse first")
        for n in names:
            del self._loras[n]
            self._active.pop(n, None)

    def _check_not_fused(self, what: str) -> None:
        if self._fused is not None:
            raise ValueError(f"cannot {what} while adapters {[n for n, _ in self._fused.adapters]} are fused into the "
                             "weights; call unfuse first")

    # ---- states -------------------------------------------------------------------------
    def _pairs(self, names_weights: Mapping[str, float]) -> list[tuple[LoRA, float]]:
        return [(self._loras[n], w) for n, w in names_weights.items()]

    def apply(self, state: nnx.State) -> nnx.State:
        """`state` plus the active adapters that are not fused (the state to run with)."""
        fused = dict(self._fused.adapters) if self._fused else {}
        todo = {n: w for n, w in self.active.items() if n not in fused}
        return merge_into_state(state, self._pairs(todo))

    def fuse(self, state: nnx.State, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> nnx.State:
        """Fuse the active adapters (or `adapter_names`, at their active weight or 1.0) times
        `lora_scale` into `state`; returns the fused state (diffusers' fuse_lora)."""
        self._check_not_fused("fuse again")
        if adapter_names is None:
            chosen = self.active
        else:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            missing = [n for n in names if n not in self._loras]
            if missing:
                raise ValueError(f"adapter_names {missing} are not loaded; loaded: {self.names}")
            chosen = {n: self._active.get(n, 1.0) for n in names}
        if not chosen:
            raise ValueError("fuse: no active adapters to fuse; load one or call set_adapters first")
        scale = _weight("lora_scale", lora_scale)
        new, self._fused = fuse_lora(state, [(self._loras[n], w * scale) for n, w in chosen.items()])
        log.info("fused LoRA adapters %s (lora_scale %g)", list(chosen), scale)
        return new

    def unfuse(self, state: nnx.State) -> nnx.State:
        """The base state back, exactly; a no-op when nothing is fused."""
        if self._fused is None:
            return state
        out = unfuse_lora(state, self._fused)
        self._fused = None
        return out

    def forget_fused(self) -> None:
        """Keep the fused weights for good (diffusers: fuse_lora then unload_lora_weights)."""
        self._fused = None


def _weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}; expected a finite number")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Pipeline face
# ---------------------------------------------------------------------------------------------


class CogVideoXLoraLoaderMixin:
    """diffusers' LoRA methods for a jaxvid CogVideoX pipeline.

    The pipeline provides `_lora_base_state() -> (CogVideoXConfig, nnx.State)` (the transformer's
    config and current state) and `_lora_set_base_state(state)`, and runs its transformer with
    `self.lora_transformer_state()` instead of its plain state. The defaults below fit a pipeline
    whose `self.transformer` has `.module` (with `.cfg`), `.graphdef` and `.state`.
    """

    _lora_adapters: CogVideoXLoRAAdapters | None = None
    _lora_run_cache: tuple[Any, nnx.State, nnx.State] | None = None  # (adapters key, base, merged)

    # ---- hooks (override if the pipeline keeps its transformer differently) -------------
    def _lora_base_state(self) -> tuple[CogVideoXConfig, nnx.State]:
        t = self.transformer
        return t.module.cfg, t.state

    def _lora_set_base_state(self, state: nnx.State) -> None:
        t = self.transformer
        t.state = state
        t.module = nnx.merge(t.graphdef, state)

    # ---- public API ---------------------------------------------------------------------
    @property
    def lora_adapters(self) -> CogVideoXLoRAAdapters:
        if self._lora_adapters is None:
            self._lora_adapters = CogVideoXLoRAAdapters(self._lora_base_state()[0])
        return self._lora_adapters

    def load_lora_weights(self, path: str | os.PathLike | Mapping[str, np.ndarray], adapter_name: str | None = None,
                          scale: float = 1.0, **kwargs: Any) -> str:
        """Load a LoRA (file, folder, cached model id or state dict; diffusers/PEFT or kohya layout)
        as the active adapter; keyword `weight_name` picks a file in a folder, as in diffusers."""
        name = self.lora_adapters.load(path, adapter_name, scale, metadata=kwargs.pop("metadata", None),
                                       weight_name=kwargs.pop("weight_name", None))
        if kwargs:
            raise TypeError(f"load_lora_weights: unexpected arguments {sorted(kwargs)}")
        self._lora_run_cache = None
        return name

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None) -> None:
        self.lora_adapters.set_adapters(adapter_names, adapter_weights)
        self._lora_run_cache = None

    def disable_lora(self) -> None:
        self.lora_adapters.disable()
        self._lora_run_cache = None

    def enable_lora(self) -> None:
        self.lora_adapters.enable()
        self._lora_run_cache = None

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        self.lora_adapters.delete(adapter_names)
        self._lora_run_cache = None

    def get_active_adapters(self) -> list[str]:
        return list(self.lora_adapters.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {"transformer": self.lora_adapters.names}

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> None:
        _, state = self._lora_base_state()
        self._lora_set_base_state(self.lora_adapters.fuse(state, lora_scale, adapter_names))
        self._lora_run_cache = None

    def unfuse_lora(self) -> None:
        _, state = self._lora_base_state()
        self._lora_set_base_state(self.lora_adapters.unfuse(state))
        self._lora_run_cache = None

    def unload_lora_weights(self) -> None:
        """Drop every adapter; fused weights stay fused (as in diffusers)."""
        adapters = self.lora_adapters
        adapters.forget_fused()
        adapters.delete(adapters.names)
        self._lora_run_cache = None

    def lora_transformer_state(self) -> nnx.State:
        """The transformer state to run: the base plus the active, unfused adapters (cached until
        the adapters or the base change)."""
        _, state = self._lora_base_state()
        if self._lora_adapters is None:
            return state
        key = (tuple(self._lora_adapters.active.items()),
               self._lora_adapters.fused.adapters if self._lora_adapters.fused else None)
        cache = self._lora_run_cache
        if cache is None or cache[0] != key or cache[1] is not state:
            self._lora_run_cache = cache = (key, state, self._lora_adapters.apply(state))
        return cache[2]
