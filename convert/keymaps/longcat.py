"""Key table: upstream LongCat-Video DiT checkpoint (`dit/`, diffusers save_pretrained) -> jaxvid.

Names are kept; only torch Linear weights become `kernel` [in, out], the Conv3d patch embedding
becomes a [t, h, w, in, out] kernel, and `blocks.{i}.*` fill slice i of the stacked `blocks.*`.
"""
from __future__ import annotations

from typing import Any

from convert.keymap import Rule, repeat
from convert.transforms import conv3d_to_dhwio, identity, linear_T

# Linear layers of one block, by module name (bias: whether upstream's Linear has one).
_BLOCK_LINEARS = {
    "adaLN_modulation.1": True,
    "attn.qkv": True,
    "attn.proj": True,
    "cross_attn.q_linear": True,
    "cross_attn.kv_linear": True,
    "cross_attn.proj": True,
    "ffn.w1": False,
    "ffn.w2": False,
    "ffn.w3": False,
}
_BLOCK_VECTORS = (
    "pre_crs_attn_norm.weight",
    "pre_crs_attn_norm.bias",
    "attn.q_norm.weight",
    "attn.k_norm.weight",
    "cross_attn.q_norm.weight",
    "cross_attn.k_norm.weight",
)
_TOP_LINEARS = ("t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.y_proj.0", "y_embedder.y_proj.2",
                "final_layer.linear", "final_layer.adaLN_modulation.1")


def _linear(source_module: str, target_module: str, bias: bool = True, index: str = "") -> list[Rule]:
    """Rules of one torch Linear; `index` (e.g. "[{i}]") targets a slice of a stacked parameter."""
    rules = [Rule(f"{source_module}.weight", f"{target_module}.kernel{index}", linear_T)]
    if bias:
        rules.append(Rule(f"{source_module}.bias", f"{target_module}.bias{index}", identity))
    return rules


def block_rules() -> list[Rule]:
    """Rules of one block, templated on {i}."""
    rules: list[Rule] = []
    for name, bias in _BLOCK_LINEARS.items():
        rules += _linear(f"blocks.{{i}}.{name}", f"blocks.{name}", bias, index="[{i}]")
    rules += [Rule(f"blocks.{{i}}.{name}", f"blocks.{name}[{{i}}]", identity) for name in _BLOCK_VECTORS]
    return rules


def transformer_rules(cfg: Any) -> list[Rule]:
    """Every parameter of `LongCatVideoTransformer3D(cfg)` from upstream's key names."""
    rules = [
        Rule("x_embedder.proj.weight", "x_embedder.proj.kernel", conv3d_to_dhwio),
        Rule("x_embedder.proj.bias", "x_embedder.proj.bias", identity),
    ]
    for name in _TOP_LINEARS:
        rules += _linear(name, name)
    return rules + repeat(block_rules(), cfg.depth)
