"""Key table: FastVideo's native LongCat DiT layout -> upstream LongCat names (then convert/keymaps/longcat.py).

FastVideo publishes LongCat weights converted by its script
`scripts/checkpoint_conversion/longcat_to_fastvideo.py` (hao-ai-lab/FastVideo), whose names are the
`param_names_mapping` of `fastvideo/configs/models/dits/longcat.py`: modules renamed, and the fused
projections split along the output axis (self-attention `attn.qkv` into `self_attn.to_q/to_k/to_v`,
cross-attention `cross_attn.kv_linear` into `cross_attn.to_k/to_v`, weight and bias alike). Its
config.json says `_class_name: LongCatTransformer3DModel` and `num_attention_heads` for `num_heads`.

The table here is the inverse: each upstream tensor is a `Join` of one or more FastVideo tensors
concatenated along axis 0. `FastVideoSource` presents a FastVideo checkpoint under upstream names,
after checking the table both ways (every FastVideo tensor used exactly once, every upstream tensor
complete with matching shapes), so the upstream key table then fills every jaxvid parameter.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.apply import ConversionError

__all__ = ["Join", "fastvideo_joins", "fastvideo_linear_parts", "FastVideoSource", "to_fastvideo", "fastvideo_hf_config",
           "FASTVIDEO_CLASS_NAME"]

FASTVIDEO_CLASS_NAME = "LongCatTransformer3DModel"

# upstream module -> FastVideo module (outside the blocks)
_TOP = {
    "x_embedder.proj": "patch_embed.proj",
    "t_embedder.mlp.0": "time_embedder.linear_1",
    "t_embedder.mlp.2": "time_embedder.linear_2",
    "y_embedder.y_proj.0": "caption_embedder.linear_1",
    "y_embedder.y_proj.2": "caption_embedder.linear_2",
    "final_layer.adaLN_modulation.1": "final_layer.adaln_linear",
    "final_layer.linear": "final_layer.proj",
}
# upstream module inside blocks.{i} -> FastVideo module(s); several = the upstream output axis is
# their concatenation, in this order
_BLOCK: dict[str, tuple[str, ...]] = {
    "adaLN_modulation.1": ("adaln_linear_1",),
    "attn.qkv": ("self_attn.to_q", "self_attn.to_k", "self_attn.to_v"),
    "attn.proj": ("self_attn.to_out",),
    "attn.q_norm": ("self_attn.q_norm",),
    "attn.k_norm": ("self_attn.k_norm",),
    "cross_attn.q_linear": ("cross_attn.to_q",),
    "cross_attn.kv_linear": ("cross_attn.to_k", "cross_attn.to_v"),
    "cross_attn.proj": ("cross_attn.to_out",),
    "cross_attn.q_norm": ("cross_attn.q_norm",),
    "cross_attn.k_norm": ("cross_attn.k_norm",),
    "pre_crs_attn_norm": ("norm_cross",),
    "ffn.w1": ("ffn.w1",),
    "ffn.w2": ("ffn.w2",),
    "ffn.w3": ("ffn.w3",),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Join:
    """upstream tensor `target` = concatenation of FastVideo tensors `sources` along axis 0."""

    target: str
    sources: tuple[str, ...]


def _fastvideo_names(upstream_key: str) -> tuple[str, ...]:
    module, _, param = upstream_key.rpartition(".")
    if module in _TOP:
        return (f"{_TOP[module]}.{param}",)
    head, _, rest = module.partition(".")
    index, _, inner = rest.partition(".")
    if head == "blocks" and index.isdigit() and inner in _BLOCK:
        return tuple(f"blocks.{index}.{m}.{param}" for m in _BLOCK[inner])
    raise KeyError(f"no FastVideo name known for upstream LongCat tensor {upstream_key!r}")


def fastvideo_joins(cfg: Any) -> list[Join]:
    """One Join per upstream tensor of `LongCatVideoTransformer3D(cfg)`, from the upstream key table."""
    from convert.keymaps.longcat import transformer_rules

    return [Join(r.source, _fastvideo_names(r.source)) for r in transformer_rules(cfg)]


def fastvideo_linear_parts(cfg: Any) -> dict[str, tuple[str, int, int]]:
    """FastVideo Linear module -> (upstream Linear module, part j, number of parts n): its weight is
    rows j*out/n:(j+1)*out/n of the upstream weight (n = 1: the whole). For LoRA files, whose
    FastVideo names are per FastVideo module."""
    from convert.keymaps.longcat import transformer_rules
    from convert.transforms import linear_T

    out = {}
    for r in transformer_rules(cfg):
        if r.source.endswith(".weight") and r.transform.name == linear_T.name:
            names = _fastvideo_names(r.source)
            for j, name in enumerate(names):
                out[name.removesuffix(".weight")] = (r.source.removesuffix(".weight"), j, len(names))
    return out


class FastVideoSource:
    """A FastVideo-layout tensor source seen under upstream LongCat names (a convert.apply.TensorSource).

    `source` needs keys(), shape(key), dtype(key) and read(key) (e.g. SafetensorsReader). Raises
    ConversionError listing every FastVideo tensor the table does not use, every one it needs but
    the checkpoint lacks, and parts whose shapes cannot be concatenated.
    """

    def __init__(self, source: Any, cfg: Any, *, what: str = "FastVideo checkpoint"):
        self._source = source
        self._joins = {j.target: j for j in fastvideo_joins(cfg)}
        have = set(source.keys())
        used: dict[str, int] = {}
        for j in self._joins.values():
            for s in j.sources:
                used[s] = used.get(s, 0) + 1
        problems = []
        missing = sorted(s for s in used if s not in have)
        unused = sorted(have - set(used))
        twice = sorted(s for s, n in used.items() if n > 1)
        bad_shapes = []
        for j in self._joins.values():
            shapes = [tuple(source.shape(s)) for s in j.sources if s in have]
            if len(shapes) == len(j.sources) and len({s[1:] for s in shapes}) > 1:
                bad_shapes.append(f"{j.target} <- {dict(zip(j.sources, shapes))}")
        for title, items in (("FastVideo tensors the table expects but the checkpoint lacks", missing),
                             ("FastVideo tensors nothing uses (unexpected)", unused),
                             ("FastVideo tensors used twice", twice),
                             ("parts that do not concatenate along axis 0", bad_shapes)):
            if items:
                problems.append(_listing(title, items))
        if problems:
            raise ConversionError(f"{what} does not match FastVideo's LongCat layout:\n" + "\n".join(problems))

    def keys(self) -> list[str]:
        return list(self._joins)

    def shape(self, key: str) -> tuple[int, ...]:
        shapes = [tuple(self._source.shape(s)) for s in self._joins[key].sources]
        return (sum(s[0] for s in shapes),) + shapes[0][1:]

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._source.dtype(self._joins[key].sources[0]))

    def read(self, key: str) -> np.ndarray:
        parts = [self._source.read(s) for s in self._joins[key].sources]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def to_fastvideo(upstream: Mapping[str, np.ndarray], cfg: Any) -> dict[str, np.ndarray]:
    """Upstream-layout tensors renamed and split as FastVideo's converter writes them (for tests
    and for writing FastVideo-layout files); every upstream tensor of the model must be present."""
    out = {}
    for j in fastvideo_joins(cfg):
        if j.target not in upstream:
            raise KeyError(f"upstream tensor {j.target!r} missing")
        for s, part in zip(j.sources, np.split(np.asarray(upstream[j.target]), len(j.sources), axis=0)):
            out[s] = part
    extra = sorted(set(upstream) - {j.target for j in fastvideo_joins(cfg)})
    if extra:
        raise KeyError(f"upstream tensors not in the LongCat model: {extra[:10]}")
    return out


def fastvideo_hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A FastVideo LongCat config.json as upstream's (num_attention_heads -> num_heads, class name)."""
    d = dict(config)
    if "num_attention_heads" in d:
        if "num_heads" in d and d["num_heads"] != d["num_attention_heads"]:
            raise ValueError(f"config.json: num_heads={d['num_heads']} and num_attention_heads="
                             f"{d['num_attention_heads']} disagree")
        d["num_heads"] = d.pop("num_attention_heads")
    if d.get("_class_name") == FASTVIDEO_CLASS_NAME:
        d["_class_name"] = "LongCatVideoTransformer3DModel"
    return d


def _listing(title: str, items: list[str], limit: int = 40) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {x}" for x in items[:limit]) + more
