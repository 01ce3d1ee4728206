"""Key table: diffusers CogVideoXTransformer3DModel -> jaxvid CogVideoXTransformer3D.

Names are identical except where diffusers' module lists carry no weights (`to_out.0`,
`ff.net.0.proj` / `ff.net.2`); per-layer keys fill slice i of the stacked `transformer_blocks`.
Also describes the diffusers tensor layout (`diffusers_shapes`) so tests, the demo and the
memory benchmark can write checkpoints in the real key layout without torch.
"""
from __future__ import annotations

from typing import Any

from convert.keymap import Rule, repeat
from convert.transforms import Transform, identity, linear_T, transpose

__all__ = ["transformer_rules", "diffusers_shapes", "conv_patch_to_linear"]


def _conv_patch_shape(s: tuple[int, ...]) -> tuple[int, ...]:
    if len(s) != 4:
        raise ValueError(f"expected a Conv2d weight [O, I, kh, kw], got shape {s}")
    return (s[1] * s[2] * s[3], s[0])


# torch Conv2d weight [O, I, p, p] with stride = kernel -> linear kernel [I * p * p, O] over
# patches flattened in (c, ph, pw) order (see CogVideoXPatchEmbed.patchify).
conv_patch_to_linear = Transform(
    "conv_patch_to_linear",
    lambda x: transpose(x.reshape(x.shape[0], -1), (1, 0)),
    _conv_patch_shape,
)


def _linear(src: str, dst: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{src}.weight", f"{dst}.kernel", linear_T)]
    return rules + ([Rule(f"{src}.bias", f"{dst}.bias")] if bias else [])


def _norm(src: str, dst: str, affine: bool = True) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}.scale"), Rule(f"{src}.bias", f"{dst}.bias")] if affine else []


def transformer_rules(cfg: Any) -> list[Rule]:
    """Rules for a CogVideoXConfig (layer count, patch variant, optional tables from the config)."""
    affine = cfg.norm_elementwise_affine
    rules: list[Rule] = []
    if cfg.patch_size_t is None:
        rules.append(Rule("patch_embed.proj.weight", "patch_embed.proj.kernel", conv_patch_to_linear))
        if cfg.patch_bias:
            rules.append(Rule("patch_embed.proj.bias", "patch_embed.proj.bias"))
    else:
        rules += _linear("patch_embed.proj", "patch_embed.proj")
    rules += _linear("patch_embed.text_proj", "patch_embed.text_proj")
    if cfg.use_learned_positional_embeddings:
        rules.append(Rule("patch_embed.pos_embedding", "patch_embed.pos_embedding", identity))
    rules += _linear("time_embedding.linear_1", "time_embedding.linear_1")
    rules += _linear("time_embedding.linear_2", "time_embedding.linear_2")
    if cfg.ofs_embed_dim:
        rules += _linear("ofs_embedding.linear_1", "ofs_embedding.linear_1")
        rules += _linear("ofs_embedding.linear_2", "ofs_embedding.linear_2")

    s, t = "transformer_blocks.{i}", "transformer_blocks"
    block: list[Rule] = []
    for norm in ("norm1", "norm2"):
        block += _linear(f"{s}.{norm}.linear", f"{t}.{norm}.linear")
        block += _norm(f"{s}.{norm}.norm", f"{t}.{norm}.norm", affine)
    for proj in ("to_q", "to_k", "to_v"):
        block += _linear(f"{s}.attn1.{proj}", f"{t}.attn1.{proj}", cfg.attention_bias)
    block += _norm(f"{s}.attn1.norm_q", f"{t}.attn1.norm_q")
    block += _norm(f"{s}.attn1.norm_k", f"{t}.attn1.norm_k")
    block += _linear(f"{s}.attn1.to_out.0", f"{t}.attn1.to_out")
    block += _linear(f"{s}.ff.net.0.proj", f"{t}.ff.linear_in")
    block += _linear(f"{s}.ff.net.2", f"{t}.ff.linear_out")
    rules += repeat([Rule(r.source, r.target + "[{i}]", r.transform) for r in block], cfg.num_layers)

    rules += _norm("norm_final", "norm_final", affine)
    rules += _linear("norm_out.linear", "norm_out.linear")
    rules += _norm("norm_out.norm", "norm_out.norm", affine)
    rules += _linear("proj_out", "proj_out")
    return rules


def diffusers_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor of a diffusers CogVideoXTransformer3DModel state dict with its (torch) shape."""
    d, dh, te = cfg.inner_dim, cfg.attention_head_dim, cfg.time_embed_dim
    out: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        out[f"{name}.weight"] = (n_out, n_in)
        if bias:
            out[f"{name}.bias"] = (n_out,)

    def norm(name: str, n: int, affine: bool = True) -> None:
        if affine:
            out[f"{name}.weight"], out[f"{name}.bias"] = (n,), (n,)

    p = cfg.patch_size
    if cfg.patch_size_t is None:
        out["patch_embed.proj.weight"] = (d, cfg.in_channels, p, p)
        if cfg.patch_bias:
            out["patch_embed.proj.bias"] = (d,)
    else:
        linear("patch_embed.proj", cfg.in_channels * cfg.patch_volume, d)
    linear("patch_embed.text_proj", cfg.text_embed_dim, d)
    if cfg.use_learned_positional_embeddings:
        out["patch_embed.pos_embedding"] = (1, cfg.learned_pos_tokens, d)
    linear("time_embedding.linear_1", d, te)
    linear("time_embedding.linear_2", te, te)
    if cfg.ofs_embed_dim:
        linear("ofs_embedding.linear_1", cfg.ofs_embed_dim, cfg.ofs_embed_dim)
        linear("ofs_embedding.linear_2", cfg.ofs_embed_dim, cfg.ofs_embed_dim)
    affine = cfg.norm_elementwise_affine
    for i in range(cfg.num_layers):
        b = f"transformer_blocks.{i}"
        for nrm in ("norm1", "norm2"):
            linear(f"{b}.{nrm}.linear", te, 6 * d)
            norm(f"{b}.{nrm}.norm", d, affine)
        for proj in ("to_q", "to_k", "to_v"):
            linear(f"{b}.attn1.{proj}", d, d, cfg.attention_bias)
        norm(f"{b}.attn1.norm_q", dh)
        norm(f"{b}.attn1.norm_k", dh)
        linear(f"{b}.attn1.to_out.0", d, d)
        linear(f"{b}.ff.net.0.proj", d, 4 * d)
        linear(f"{b}.ff.net.2", 4 * d, d)
    norm("norm_final", d, affine)
    linear("norm_out.linear", te, 2 * d)
    norm("norm_out.norm", d, affine)
    linear("proj_out", d, cfg.patch_volume * cfg.out_channels)
    return out
