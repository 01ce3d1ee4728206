"""Every model class jaxvid can load, by the class name its config.json gives (loading.py uses this table)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from convert.keymaps.t5 import TIED_EMBEDDING_IGNORE

__all__ = ["MODELS", "ModelEntry", "resolve"]


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """How to build and fill one model class: 'module:attr' strings, imported lazily."""

    config: str  # class with from_hf_config(dict) -> frozen config (fields dtype, param_dtype)
    model: str  # NNX module class, constructed as Model(cfg, *, rngs)
    rules: str  # function cfg -> list[Rule]
    ignore: tuple[str, ...] = ()  # regexes of source keys that carry no parameter (buffers)


def resolve(ref: str) -> Any:
    """The object a 'module:attr' string of a ModelEntry names (imported on first use)."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


# T5 v1.1 and umT5 are one encoder class (T5Config says which); transformers may save the tied
# input embedding under both names, and `shared.weight` is the one used.
_T5_ENCODER = ModelEntry(
    config="jaxvid.models.t5:T5Config",
    model="jaxvid.models.t5:T5Encoder",
    rules="convert.keymaps.t5:encoder_rules",
    ignore=TIED_EMBEDDING_IGNORE,
)

MODELS: dict[str, ModelEntry] = {
    "CogVideoXTransformer3DModel": ModelEntry(
        config="jaxvid.models.cogvideox:CogVideoXConfig",
        model="jaxvid.models.cogvideox:CogVideoXTransformer3D",
        rules="convert.keymaps.cogvideox:transformer_rules",
    ),
    "LongCatVideoTransformer3DModel": ModelEntry(
        config="jaxvid.models.longcat:LongCatConfig",
        model="jaxvid.models.longcat:LongCatVideoTransformer3D",
        rules="convert.keymaps.longcat:transformer_rules",
    ),
    "T5EncoderModel": _T5_ENCODER,
    "UMT5EncoderModel": _T5_ENCODER,
    "AutoencoderKLCogVideoX": ModelEntry(
        config="jaxvid.models.vae_cogvideox:CogVideoXVAEConfig",
        model="jaxvid.models.vae_cogvideox:AutoencoderKLCogVideoX",
        rules="convert.keymaps.vae_cogvideox:vae_rules",
    ),
    "AutoencoderKLWan": ModelEntry(
        config="jaxvid.models.vae_wan:WanVAEConfig",
        model="jaxvid.models.vae_wan:AutoencoderKLWan",
        rules="convert.keymaps.vae_wan:vae_rules",
    ),
}
