"""Synthetic CogVideoX checkpoints: the embedded tiny pipeline and random transformers at any size.

`write_tiny_pipeline(folder, seed=0, variant="t2v")` writes what `save_pretrained` of a diffusers
`CogVideoXPipeline` (or `CogVideoXImageToVideoPipeline`) writes: model_index.json, transformer/,
vae/, text_encoder/ (transformers' T5EncoderModel layout), tokenizer/ (a 100-piece sentencepiece
model shipped in jaxvid/assets/, plus T5's 100 sentinel tokens) and scheduler/. Weights come from
numpy alone (no torch), deterministic by seed, so `jaxvid generate` runs with no download and the
same seed always gives the same video. diffusers itself can load the folder too.

Tensor names and torch shapes of the VAE and T5 come from jaxvid's own key tables, run backwards:
each rule's target shape is turned back through its (permutation) transform.

`write_random_cogvideox(folder, cfg)` / `write_random_pipeline(folder, cfg)` write a random
transformer of any size (optionally sharded, one tensor in memory at a time) in diffusers' layout,
for `jaxvid demo` and the conversion benchmarks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from convert.keymaps.cogvideox import diffusers_shapes
from convert.safetensors_io import write_safetensors_streaming
from jaxvid.models.cogvideox import CogVideoXConfig
from jaxvid.models.t5 import T5Config
from jaxvid.models.vae_cogvideox import CogVideoXVAEConfig

__all__ = ["VARIANTS", "TinyDefaults", "tiny_configs", "write_tiny_pipeline", "tiny_spiece_model",
           "write_random_cogvideox", "write_random_pipeline"]

log = logging.getLogger(__name__)

_DIFFUSERS_VERSION = "0.42.1"
_SPIECE_ASSET = "tiny_spiece.model"
_SPIECE_PIECES = 100  # pieces in the shipped model; T5 adds 100 sentinels after them
_T5_EXTRA_IDS = 100
VARIANTS = ("t2v", "i2v", "t2v-1.5", "i2v-1.5")

# diffusers' THUDM/CogVideoX-5b scheduler config (DDIM); the 1.5 checkpoints ship the same one.
_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "clip_sample_range": 1.0, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 1.0,
    "steps_offset": 0, "timestep_spacing": "trailing", "trained_betas": None,
}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TinyDefaults:
    """Generation settings that suit the tiny pipeline (finishes in seconds on a CPU)."""

    num_frames: int = 9
    height: int = 32
    width: int = 32
    num_inference_steps: int = 4
    guidance_scale: float = 6.0
    prompt: str = "A panda, dressed in a small red jacket, sits on a wooden stool in a bamboo forest."


def tiny_spiece_model() -> bytes:
    """The shipped 100-piece sentencepiece model (T5 ids: <pad>=0, </s>=1, <unk>=2; identity normalization).

    Trained once with `sentencepiece.SentencePieceTrainer.train(vocab_size=100, model_type="unigram",
    pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, normalization_rule_name="identity")`
    on a handful of video prompts.
    """
    # one name per `/`: Traversable.joinpath takes a single name on Python 3.11 when the package is
    # read from a plain folder or a zip (a MultiplexedPath / zipfile.Path, not a pathlib.Path)
    return (resources.files("jaxvid") / "assets" / _SPIECE_ASSET).read_bytes()


def tiny_configs(variant: str = "t2v") -> tuple[CogVideoXConfig, CogVideoXVAEConfig, T5Config]:
    """(transformer, vae, text encoder) configs of a tiny pipeline `variant` (one of VARIANTS).

    "i2v" is 5b-I2V-like (image latents on channels, learned positions), "*-1.5" uses
    patch_size_t=2 (latent frame padding) and "i2v-1.5" adds the ofs embedding and the VAE's
    invert_scale_latents.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; expected one of {VARIANTS}")
    # CogVideoX 1.5's I2V VAE divides image latents by the scaling factor (invert_scale_latents)
    vae = CogVideoXVAEConfig.tiny(scaling_factor=0.7, invert_scale_latents=variant == "i2v-1.5")
    t5 = T5Config.tiny(vocab_size=_SPIECE_PIECES + _T5_EXTRA_IDS)
    defaults = TinyDefaults()
    latent = vae.latent_channels
    sample_h = defaults.height // vae.spatial_compression
    sample_w = defaults.width // vae.spatial_compression
    overrides: dict[str, Any] = dict(
        in_channels=latent, out_channels=latent, text_embed_dim=t5.d_model, time_embed_dim=16,
        num_attention_heads=2, attention_head_dim=16, sample_height=sample_h, sample_width=sample_w,
        sample_frames=defaults.num_frames, max_text_seq_length=226,
    )
    if variant.startswith("i2v"):
        overrides["in_channels"] = 2 * latent
    if variant == "i2v":
        overrides["use_learned_positional_embeddings"] = True
    if variant.endswith("1.5"):
        overrides.update(patch_size_t=2, patch_bias=False)
    if variant == "i2v-1.5":
        overrides["ofs_embed_dim"] = overrides["time_embed_dim"]
    return CogVideoXConfig.tiny(**overrides), vae, t5


# ------------------------------------------------------------------------------------------ weights


def _inverse_shape(rule: Any, target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Source (torch) shape of a rule whose transform is a permutation (or identity)."""
    from convert import transforms

    perms = {
        transforms.identity.name: None,
        transforms.linear_T.name: (1, 0),
        transforms.conv2d_to_hwio.name: (2, 3, 1, 0),
        transforms.conv3d_to_dhwio.name: (2, 3, 4, 1, 0),
    }
    if rule.transform.name not in perms:
        raise ValueError(f"rule {rule.source} -> {rule.target}: transform {rule.transform.name!r} is not a permutation")
    axes = perms[rule.transform.name]
    if axes is None:
        return tuple(target_shape)
    source = [0] * len(axes)
    for j, a in enumerate(axes):
        source[a] = target_shape[j]
    return tuple(source)


def source_shapes(rules: list, specs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{source key: torch shape} of a key table against the abstract model's Param specs."""
    out = {}
    for rule in rules:
        shape = tuple(specs[rule.target_path].shape)
        if rule.target_index is not None:
            shape = shape[1:]
        out[rule.source] = _inverse_shape(rule, shape)
    return out


def _random_weights(shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """N(0, 1/fan_in) for matrices and kernels (activations keep their scale), norms at 1, biases small."""
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if len(shape) >= 2:
            table = key in ("shared.weight", "patch_embed.pos_embedding") or "relative_attention_bias" in key
            fan_in = 1 if table else int(np.prod(shape[1:]))
            x = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
        elif "norm" in key and key.endswith("weight"):
            x = np.float32(1.0) + np.float32(0.05) * rng.standard_normal(shape, dtype=np.float32)
        else:
            x = np.float32(0.02) * rng.standard_normal(shape, dtype=np.float32)
        out[key] = x
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _vae_hf_config(cfg: CogVideoXVAEConfig) -> dict[str, Any]:
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": _DIFFUSERS_VERSION, "act_fn": "silu",
        "block_out_channels": list(cfg.block_out_channels), "down_block_types": ["CogVideoXDownBlock3D"] * n,
        "up_block_types": ["CogVideoXUpBlock3D"] * n, "force_upcast": cfg.force_upcast,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
        "latents_mean": None, "latents_std": None, "layers_per_block": cfg.layers_per_block,
        "norm_eps": cfg.norm_eps, "norm_num_groups": cfg.norm_num_groups, "sample_height": cfg.sample_height,
        "sample_width": cfg.sample_width, "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor,
        "temporal_compression_ratio": cfg.temporal_compression_ratio, "use_post_quant_conv": False,
        "use_quant_conv": False, "invert_scale_latents": cfg.invert_scale_latents,
    }


def _t5_hf_config(cfg: T5Config) -> dict[str, Any]:
    return {
        "architectures": ["T5EncoderModel"], "model_type": "t5", "d_ff": cfg.d_ff, "d_kv": cfg.d_kv,
        "d_model": cfg.d_model, "dense_act_fn": "gelu_new", "dropout_rate": 0.0, "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
        "is_gated_act": True, "layer_norm_epsilon": cfg.layer_norm_epsilon, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "pad_token_id": 0, "relative_attention_max_distance":
        cfg.relative_attention_max_distance, "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "tie_word_embeddings": False, "use_cache": True, "vocab_size": cfg.vocab_size, "dtype": "float32",
    }


def _tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_ids": _T5_EXTRA_IDS, "legacy": True, "model_max_length": 226, "add_prefix_space": True,
    }


def write_tiny_pipeline(folder: str | os.PathLike, *, seed: int = 0, variant: str = "t2v") -> Path:
    """Write a tiny random CogVideoX pipeline folder (diffusers' layout) at `folder`; returns it.

    Deterministic: the same seed and variant write the same bytes. Tens of thousands of parameters;
    writing takes well under a second.
    """
    from convert.keymaps.t5 import encoder_rules
    from convert.keymaps.vae_cogvideox import vae_rules
    from convert.safetensors_io import write_safetensors
    from jaxvid.models.loading import model_specs
    from jaxvid.models.t5 import T5Encoder
    from jaxvid.models.vae_cogvideox import AutoencoderKLCogVideoX

    transformer_cfg, vae_cfg, t5_cfg = tiny_configs(variant)
    folder = Path(folder)
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]

    weights = _random_weights(diffusers_shapes(transformer_cfg), rngs[0])
    for key, value in weights.items():  # AdaLN-zero style output layers start small, as trained models keep them
        if key.startswith("proj_out") or key.startswith("norm_out.linear"):
            weights[key] = value * np.float32(0.1)
    write_safetensors(folder / "transformer" / "diffusion_pytorch_model.safetensors", weights)
    _write_json(folder / "transformer" / "config.json",
                {**transformer_cfg.to_hf_config(), "_diffusers_version": _DIFFUSERS_VERSION})

    vae_shapes = source_shapes(vae_rules(vae_cfg), model_specs(AutoencoderKLCogVideoX, vae_cfg))
    write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors", _random_weights(vae_shapes, rngs[1]))
    _write_json(folder / "vae" / "config.json", _vae_hf_config(vae_cfg))

    t5_shapes = source_shapes(encoder_rules(t5_cfg), model_specs(T5Encoder, t5_cfg))
    write_safetensors(folder / "text_encoder" / "model.safetensors", _random_weights(t5_shapes, rngs[2]))
    _write_json(folder / "text_encoder" / "config.json", _t5_hf_config(t5_cfg))

    (folder / "tokenizer" / "spiece.model").write_bytes(tiny_spiece_model())
    _write_json(folder / "tokenizer" / "tokenizer_config.json", _tokenizer_config())

    _write_json(folder / "scheduler" / "scheduler_config.json",
                {"_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": _DIFFUSERS_VERSION, **_SCHEDULER_CONFIG})
    pipeline = "CogVideoXImageToVideoPipeline" if variant.startswith("i2v") else "CogVideoXPipeline"
    _write_json(folder / "model_index.json", {
        "_class_name": pipeline, "_diffusers_version": _DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    })
    return folder


# ---------------------------------------------------------------------------------------------
# Random transformers at any size in diffusers' layout (jaxvid demo, bench/convert_memory.py)
# ---------------------------------------------------------------------------------------------

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# A CogVideoX DDIM scheduler config for write_random_pipeline, copied verbatim by the converter like any weight-free component.
_RANDOM_SCHEDULER_CONFIG = {
    "_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": _DIFFUSERS_VERSION, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0,
    "timestep_spacing": "trailing", "trained_betas": None,
}


def _random_tensor(rng: np.random.Generator, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Weights ~ N(0, 0.02^2); norm scales ~ 1 so activations stay in range."""
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    if "norm" in key and key.endswith(".weight"):
        x += np.float32(1.0)
    return x


def write_random_cogvideox(
    folder: str | os.PathLike,
    cfg: CogVideoXConfig,
    *,
    seed: int = 0,
    dtype: Any = np.float32,
    max_shard_bytes: int | None = None,
    values: Callable[[str, tuple[int, ...]], np.ndarray] | None = None,
) -> Path:
    """Write a random CogVideoX transformer in diffusers' folder layout; returns the folder.

    With `max_shard_bytes`, tensors go to `diffusion_pytorch_model-0000k-of-0000n.safetensors`
    files plus `diffusion_pytorch_model.safetensors.index.json`, as diffusers shards. Tensors are
    generated and written one at a time (peak memory: one tensor). `values(key, shape)` replaces
    the default N(0, 0.02^2) float32 generator (the benchmark uses a cheaper one).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    config = {**cfg.to_hf_config(), "_diffusers_version": _DIFFUSERS_VERSION}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = dict(sorted(diffusers_shapes(cfg).items()))
    shards: list[dict[str, tuple[tuple[int, ...], np.dtype]]] = [{}]
    size = 0
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = (shape, dtype)
        size += nbytes
    rng = np.random.default_rng(seed)

    def produce(key: str) -> np.ndarray:
        x = values(key, shapes[key]) if values is not None else _random_tensor(rng, key, shapes[key])
        return x.astype(dtype, copy=False)

    if len(shards) == 1 and not max_shard_bytes:
        write_safetensors_streaming(folder / WEIGHTS_NAME, shards[0], produce, metadata={"format": "pt"})
        return folder
    weight_map: dict[str, str] = {}
    stem = WEIGHTS_NAME.removesuffix(".safetensors")
    for k, shard in enumerate(shards, start=1):
        name = f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(folder / name, shard, produce, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        log.info("wrote shard %s (%d tensors)", name, len(shard))
    total = sum(int(np.prod(s, dtype=np.int64)) * dtype.itemsize for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{WEIGHTS_NAME}.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_random_pipeline(folder: str | os.PathLike, cfg: CogVideoXConfig, *, seed: int = 0) -> Path:
    """A minimal diffusers pipeline folder: model_index.json, transformer/ (random) and scheduler/."""
    folder = Path(folder)
    write_random_cogvideox(folder / "transformer", cfg, seed=seed)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_RANDOM_SCHEDULER_CONFIG, indent=2))
    index = {
        "_class_name": "CogVideoXPipeline", "_diffusers_version": _DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def pooled_random_values(pool_size: int = 1 << 24, seed: int = 0) -> Callable[[str, tuple[int, ...]], np.ndarray]:
    """values(key, shape) for the writers' `values=`: random-looking N(0, 0.02^2) bf16 read from one
    fixed pool at moving offsets (norm scales 1), so writing 20 GB of weights takes seconds."""
    import ml_dtypes

    pool = (np.random.default_rng(seed).standard_normal(pool_size, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    offset = [0]

    def values(key: str, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        if "norm" in key and key.endswith(".weight"):
            return np.ones(shape, ml_dtypes.bfloat16)
        start = offset[0]
        offset[0] = (start + 104729) % pool_size
        head = pool[start:start + n]
        return np.concatenate([head, np.resize(pool, n - head.size)]).reshape(shape)

    return values


def write_random_full_pipeline(
    folder: str | os.PathLike,
    transformer: CogVideoXConfig,
    vae: CogVideoXVAEConfig,
    text_encoder: T5Config,
    *,
    values: Callable[[str, tuple[int, ...]], np.ndarray],
    dtype: Any = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """A whole diffusers CogVideoX pipeline folder of any size (transformer/, vae/, text_encoder/,
    the tiny tokenizer (spiece.model and tokenizer.json), DDIM scheduler/, model_index.json) with
    weights from `values(key, shape)` in `dtype` (default bf16), written one tensor at a time; what
    the benchmarks load with both libraries. Returns the folder."""
    import ml_dtypes

    from convert.keymaps.t5 import encoder_rules
    from convert.keymaps.vae_cogvideox import vae_rules
    from jaxvid.models.loading import model_specs
    from jaxvid.models.t5 import T5Encoder
    from jaxvid.models.vae_cogvideox import AutoencoderKLCogVideoX

    folder = Path(folder)
    dtype = np.dtype(dtype if dtype is not None else ml_dtypes.bfloat16)
    write_random_cogvideox(folder / "transformer", transformer, dtype=dtype, max_shard_bytes=max_shard_bytes,
                           values=values)
    for sub, rules, model_cls, cfg, name, hf in (
        ("vae", vae_rules(vae), AutoencoderKLCogVideoX, vae, "diffusion_pytorch_model.safetensors",
         _vae_hf_config(vae)),
        ("text_encoder", encoder_rules(text_encoder), T5Encoder, text_encoder, "model.safetensors",
         _t5_hf_config(text_encoder)),
    ):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        shapes = source_shapes(rules, model_specs(model_cls, cfg))
        write_safetensors_streaming(folder / sub / name, {k: (s, dtype) for k, s in shapes.items()},
                                    lambda k, shapes=shapes: values(k, shapes[k]).astype(dtype, copy=False),
                                    metadata={"format": "pt"})
        (folder / sub / "config.json").write_text(json.dumps(hf, indent=2))
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "spiece.model").write_bytes(tiny_spiece_model())
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config()))
    write_tokenizer_json(folder / "tokenizer")  # transformers 5 reads tokenizer.json as it is
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_RANDOM_SCHEDULER_CONFIG))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "CogVideoXPipeline", "_diffusers_version": _DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"]}))
    return folder


def write_tokenizer_json(tokenizer_dir: str | os.PathLike) -> Path:
    """Write `tokenizer.json` (the `tokenizers` library's format) beside a tiny folder's spiece.model.

    transformers 5 builds a T5 tokenizer from spiece.model by converting it, and some versions
    (5.17) cannot parse the tiny model's empty normalizer charsmap ("Cannot parse
    precompiled_charsmap"); with tokenizer.json they load it as it is. Same pieces and scores
    (Unigram), legacy T5 pre-tokenization (Metaspace, a space prepended), `</s>` appended, the
    `<extra_id_N>` tokens after the pieces: the ids jaxvid's tokenizer gives. Returns the file.
    """
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    folder = Path(tokenizer_dir)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    eos = sp.id_to_piece(sp.eos_id())
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                       special_tokens=[(eos, sp.eos_id())])
    specials = [sp.id_to_piece(i) for i in (sp.pad_id(), sp.eos_id(), sp.unk_id())]
    extra = [f"<extra_id_{i}>" for i in reversed(range(_T5_EXTRA_IDS))]  # T5: <extra_id_0> is the last id
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + extra])
    path = folder / "tokenizer.json"
    tmp = path.with_name(path.name + ".partial")
    tok.save(str(tmp))
    tmp.replace(path)
    return path
