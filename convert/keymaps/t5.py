"""Key table: transformers' T5EncoderModel / UMT5EncoderModel -> jaxvid.models.t5.T5Encoder.

The token embedding is tied: transformers names it `shared.weight` and `encoder.embed_tokens.weight`,
and a checkpoint may hold either or both. The table reads `shared.weight`; the registry ignores
`encoder\\.embed_tokens\\.weight` (TIED_EMBEDDING_IGNORE). When the caller knows the checkpoint's keys
and only `encoder.embed_tokens.weight` is there, `encoder_rules(cfg, source_keys)` reads that one.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from convert.keymap import Rule, repeat
from convert.transforms import identity, linear_T

SHARED_EMBEDDING = "shared.weight"
ENCODER_EMBEDDING = "encoder.embed_tokens.weight"
# regexes of source keys that carry no separate parameter (for the registry's ignore list)
TIED_EMBEDDING_IGNORE = (r"encoder\.embed_tokens\.weight",)


def _block_rules(cfg: Any) -> list[Rule]:
    attn = "encoder.block.{i}.layer.0."
    ffn = "encoder.block.{i}.layer.1."
    rules = [
        Rule(attn + "layer_norm.weight", "blocks.attention_norm.weight[{i}]"),
        *(Rule(attn + f"SelfAttention.{p}.weight", f"blocks.attention.{p}.kernel[{{i}}]", linear_T) for p in "qkvo"),
        Rule(ffn + "layer_norm.weight", "blocks.ffn_norm.weight[{i}]"),
        *(
            Rule(ffn + f"DenseReluDense.{p}.weight", f"blocks.ffn.{p}.kernel[{{i}}]", linear_T)
            for p in (("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo"))
        ),
    ]
    if cfg.relative_bias_per_layer:
        rules.append(Rule(attn + "SelfAttention.relative_attention_bias.weight",
                          "blocks.attention.relative_attention_bias.embedding[{i}]"))
    return repeat(rules, cfg.num_layers)


def encoder_rules(cfg: Any, source_keys: Iterable[str] | None = None) -> list[Rule]:
    """Rules for a T5Config (T5 v1.1: shared relative bias from layer 0; umT5: one per layer).

    `source_keys` (optional) lets the table read the tied embedding from `encoder.embed_tokens.weight`
    when the checkpoint has no `shared.weight`.
    """
    embedding = SHARED_EMBEDDING
    if source_keys is not None:
        keys = set(source_keys)
        if SHARED_EMBEDDING not in keys and ENCODER_EMBEDDING in keys:
            embedding = ENCODER_EMBEDDING
    rules = [
        Rule(embedding, "shared.embedding", identity),
        Rule("encoder.final_layer_norm.weight", "final_layer_norm.weight"),
        *_block_rules(cfg),
    ]
    if not cfg.relative_bias_per_layer:
        rules.append(Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                          "relative_attention_bias.embedding"))
    return rules
