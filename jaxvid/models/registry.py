"""Every model class jaxvid can load, by the class name its config.json gives."""
from __future__ import annotations

from convert.keymaps.t5 import TIED_EMBEDDING_IGNORE
from jaxvid.models.loading import ModelEntry

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
