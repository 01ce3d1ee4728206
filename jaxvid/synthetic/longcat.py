"""Tiny random LongCat-Video checkpoint folders in upstream's layout, from numpy alone (tests, demos).

`write_tiny_longcat(folder)` writes what the released checkpoint holds, at toy sizes:

    dit/           config.json (LongCatVideoTransformer3DModel) + diffusion_pytorch_model.safetensors
    text_encoder/  config.json (UMT5EncoderModel) + model.safetensors
    vae/           config.json (AutoencoderKLWan) + diffusion_pytorch_model.safetensors
    tokenizer/     spiece.model (trained on a few sentences) + tokenizer_config.json
    scheduler/     scheduler_config.json (FlowMatchEulerDiscreteScheduler)
    lora/          cfg_step_lora.safetensors, refinement_lora.safetensors (upstream's LoRA key layout)

Tensor names and torch shapes come from jaxvid's own key tables run backwards (target shape ->
source shape through each named transform), so the files are exactly what the loaders expect of a
real checkpoint. Weights are N(0, 1/fan_in) (biases small, norm scales near 1) so activations keep
their size through the tiny networks and parity checks compare signal, not rounding noise.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from convert.keymap import Rule
from convert.safetensors_io import write_safetensors

_DIFFUSERS_VERSION = "0.42.1"
TOKENIZER_CORPUS = (
    "A panda, dressed in a small red jacket and a tiny hat, sits on a wooden stool in a bamboo forest.",
    "A cat walks along a sunny street while the camera follows it slowly from behind.",
    "Golden light washes over the mountains while clouds drift across the valley at sunrise.",
    "A person rides a motorcycle along a long straight road between the water and a forest.",
    "Two dogs play in the snow; children laugh and throw snowballs near a frozen lake.",
)
TINY_BSA_PARAMS = {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4],
                   "chunk_3d_shape_k": [4, 4, 4]}
LORA_RANK = 4
_PIECES = 64  # sentencepiece vocabulary of the tiny tokenizer (the corpus supports no more than ~89)


def tiny_dit_config() -> dict[str, Any]:
    """config.json of a 2-block LongCat DiT (hidden 64, 4 heads, 4 latent channels, text width 32)."""
    return {
        "_class_name": "LongCatVideoTransformer3DModel", "_diffusers_version": _DIFFUSERS_VERSION,
        "in_channels": 4, "out_channels": 4, "hidden_size": 64, "depth": 2, "num_heads": 4,
        "caption_channels": 32, "mlp_ratio": 4, "adaln_tembed_dim": 32, "frequency_embedding_size": 64,
        "patch_size": [1, 2, 2], "enable_flashattn3": False, "enable_flashattn2": True, "enable_xformers": False,
        "enable_bsa": False, "bsa_params": dict(TINY_BSA_PARAMS), "cp_split_hw": None, "text_tokens_zero_pad": True,
    }


def tiny_text_encoder_config(vocab_size: int) -> dict[str, Any]:
    """config.json of a 2-layer umT5 encoder (d_model 32 = the DiT's caption_channels)."""
    return {
        "architectures": ["UMT5EncoderModel"], "model_type": "umt5", "vocab_size": vocab_size, "d_model": 32,
        "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 20, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": True, "dense_act_fn": "gelu_new", "tie_word_embeddings": False,
    }


def tiny_vae_config() -> dict[str, Any]:
    """config.json of a Wan 2.1 VAE with the real topology (8x space, 4x time) and 4 latent channels."""
    z = 4
    return {
        "_class_name": "AutoencoderKLWan", "_diffusers_version": _DIFFUSERS_VERSION, "base_dim": 8, "z_dim": z,
        "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_scales": [], "temperal_downsample": [False, True, True],
        "dropout": 0.0, "latents_mean": [0.1 * (i - z / 2) for i in range(z)],
        "latents_std": [0.5 + 0.25 * i for i in range(z)],
    }


def tiny_scheduler_config() -> dict[str, Any]:
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": _DIFFUSERS_VERSION,
            "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


# ---------------------------------------------------------------------------------------------
# Key tables run backwards
# ---------------------------------------------------------------------------------------------


def _source_shape(rule: Rule, target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape that `rule.transform` turns into `target_shape` (a slice of it when stacked)."""
    if rule.target_index is not None:
        target_shape = target_shape[1:]
    if rule.transform.name.startswith("flatten_gamma"):
        # diffusers' WanRMS_norm: (C, 1, 1) in the 2D attention blocks, (C, 1, 1, 1) in the 3D ones
        return target_shape + ((1, 1) if ".attentions." in rule.source else (1, 1, 1))
    markers = tuple(range(len(target_shape)))
    perm = rule.transform.shape_fn(markers)  # a permutation transform moves the markers
    if sorted(perm) != list(markers):
        raise ValueError(f"{rule.source}: cannot invert transform {rule.transform.name}")
    source = [0] * len(target_shape)
    for out_axis, in_axis in enumerate(perm):
        source[in_axis] = target_shape[out_axis]
    return tuple(source)


def _random_tensor(rng: np.random.Generator, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) >= 2 and not any(s in key for s in ("gamma", "embedding", "shared.weight", "relative_attention")):
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    if "norm" in key or "gamma" in key:
        return (1.0 + 0.05 * x).astype(np.float32)
    if "embed" in key or "shared" in key:
        return (0.5 * x).astype(np.float32)
    return (0.02 * x).astype(np.float32)


def _component_shapes(folder: Path, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Write config.json; return the torch name -> shape of every tensor the registered model's key table reads."""
    from jaxvid.models.loading import class_name_of, config_for, entry_for, model_specs
    from jaxvid.models.registry import resolve

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    entry = entry_for(class_name_of(config))
    cfg = config_for(entry, config, np.float32)
    specs = model_specs(resolve(entry.model), cfg)
    return {rule.source: _source_shape(rule, tuple(specs[rule.target_path].shape)) for rule in resolve(entry.rules)(cfg)}


def _write_component(folder: Path, config: dict[str, Any], weights_name: str, seed: int) -> None:
    """config.json + random weights named by the registered model's key table."""
    rng = np.random.default_rng(seed)
    shapes = _component_shapes(folder, config)
    write_safetensors(folder / weights_name, {key: _random_tensor(rng, key, shape) for key, shape in shapes.items()})


def write_tiny_dit(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """The DiT component alone (what `write_tiny_longcat` puts in dit/): config.json (tiny_dit_config)
    + diffusion_pytorch_model.safetensors, float32 torch layout. Returns the folder."""
    folder = Path(folder)
    _write_component(folder, tiny_dit_config(), "diffusion_pytorch_model.safetensors", seed)
    return folder


def _write_tokenizer(folder: Path) -> int:
    """A sentencepiece unigram model with T5's special ids (<pad>=0, </s>=1, <unk>=2); returns the vocab size."""
    import sentencepiece

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(TOKENIZER_CORPUS) * 20), model_writer=model, vocab_size=_PIECES,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    extra_ids = 4
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "extra_ids": extra_ids, "model_max_length": 512,
    }, indent=2))
    return _PIECES + extra_ids


def write_random_lora(path: str | os.PathLike, dit_config: dict[str, Any], *, seed: int, rank: int = LORA_RANK,
                      scale: float = 0.3) -> Path:
    """An upstream-layout LoRA over every block Linear: `lora___lorahyphen___blocks___lorahyphen___0...`.

    The fused qkv / kv projections use upstream's split form (lora_up.blocks.j, one per output part).
    """
    from jaxvid.models.longcat import LongCatConfig

    cfg = LongCatConfig.from_hf_config(dit_config)
    rng = np.random.default_rng(seed)
    d, f = cfg.hidden_size, cfg.ffn_hidden_dim
    dims = {"adaLN_modulation.1": (cfg.adaln_tembed_dim, 6 * d, 1), "attn.qkv": (d, 3 * d, 3),
            "attn.proj": (d, d, 1), "cross_attn.q_linear": (d, d, 1), "cross_attn.kv_linear": (d, 2 * d, 2),
            "cross_attn.proj": (d, d, 1), "ffn.w1": (d, f, 1), "ffn.w2": (f, d, 1), "ffn.w3": (d, f, 1)}
    tensors: dict[str, np.ndarray] = {}

    def draw(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (std * rng.standard_normal(shape)).astype(np.float32)

    for i in range(cfg.depth):
        for module, (d_in, d_out, n) in dims.items():
            name = "lora___lorahyphen___" + f"blocks.{i}.{module}".replace(".", "___lorahyphen___")
            tensors[f"{name}.lora_down.weight"] = draw((n * rank, d_in), scale / np.sqrt(d_in))
            if n > 1:
                for j in range(n):
                    tensors[f"{name}.lora_up.blocks.{j}.weight"] = draw((d_out // n, rank), scale)
            else:
                tensors[f"{name}.lora_up.weight"] = draw((d_out, rank), scale)
            tensors[f"{name}.alpha_scale"] = np.asarray(1.0, np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors)
    return path


def write_tiny_longcat(folder: str | os.PathLike, *, seed: int = 0, loras: bool = True) -> Path:
    """Write a complete tiny LongCat-Video checkpoint folder (see the module docstring); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(folder / "tokenizer")
    dit_config = tiny_dit_config()
    _write_component(folder / "dit", dit_config, "diffusion_pytorch_model.safetensors", seed)
    _write_component(folder / "text_encoder", tiny_text_encoder_config(vocab), "model.safetensors", seed + 1)
    _write_component(folder / "vae", tiny_vae_config(), "diffusion_pytorch_model.safetensors", seed + 2)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny_scheduler_config(), indent=2))
    if loras:
        write_random_lora(folder / "lora" / "cfg_step_lora.safetensors", dit_config, seed=seed + 3)
        write_random_lora(folder / "lora" / "refinement_lora.safetensors", dit_config, seed=seed + 4)
    return folder


# ---------------------------------------------------------------------------------------------
# Real-size folders (benchmarks)
# ---------------------------------------------------------------------------------------------


def longcat_video_configs() -> dict[str, dict[str, Any]]:
    """config.json of each model folder of the released checkpoint at real size, from jaxvid's presets:
    dit/ (LongCatConfig.longcat_video, 13.6B), text_encoder/ (T5Config.umt5_xxl), vae/ (WanVAEConfig.wan21)."""
    from jaxvid.models.longcat import LongCatConfig
    from jaxvid.models.t5 import T5Config
    from jaxvid.models.vae_wan import WanVAEConfig
    from jaxvid.synthetic.cogvideox import _t5_hf_config

    dit = LongCatConfig.longcat_video()
    bsa = dit.bsa_params
    dit_config = {**tiny_dit_config(), "in_channels": dit.in_channels, "out_channels": dit.out_channels,
                  "hidden_size": dit.hidden_size, "depth": dit.depth, "num_heads": dit.num_heads,
                  "caption_channels": dit.caption_channels, "mlp_ratio": dit.mlp_ratio,
                  "adaln_tembed_dim": dit.adaln_tembed_dim, "frequency_embedding_size": dit.frequency_embedding_size,
                  "bsa_params": {"sparsity": bsa.sparsity, "cdf_threshold": bsa.cdf_threshold,
                                 "chunk_3d_shape_q": list(bsa.chunk_3d_shape_q),
                                 "chunk_3d_shape_k": list(bsa.chunk_3d_shape_k)}}
    text_config = {**_t5_hf_config(T5Config.umt5_xxl()), "architectures": ["UMT5EncoderModel"], "model_type": "umt5"}
    vae = WanVAEConfig.wan21()
    vae_config = {**tiny_vae_config(), "base_dim": vae.base_dim, "z_dim": vae.z_dim, "dim_mult": list(vae.dim_mult),
                  "num_res_blocks": vae.num_res_blocks, "temperal_downsample": list(vae.temporal_downsample),
                  "latents_mean": list(vae.latents_mean), "latents_std": list(vae.latents_std)}
    return {"dit": dit_config, "text_encoder": text_config, "vae": vae_config}


def _write_component_streaming(folder: Path, config: dict[str, Any], weights_name: str,
                               values: Any, dtype: np.dtype) -> None:
    """config.json + weights from `values(key, shape)` named by the key table, one tensor at a time."""
    from convert.safetensors_io import write_safetensors_streaming

    shapes = _component_shapes(folder, config)
    write_safetensors_streaming(folder / weights_name, {k: (s, dtype) for k, s in shapes.items()},
                                lambda k: values(k, shapes[k]).astype(dtype, copy=False), metadata={"format": "pt"})


def write_random_longcat(folder: str | os.PathLike, *, values: Any,
                         configs: dict[str, dict[str, Any]] | None = None, dtype: Any = None) -> Path:
    """A LongCat-Video folder of any size in upstream's layout (dit/, text_encoder/, vae/, the tiny
    tokenizer/, scheduler/; no lora/) with weights from `values(key, shape)` in `dtype` (default
    bf16), written one tensor at a time: with `jaxvid.synthetic.cogvideox.pooled_random_values`
    the real-size folder (`configs` default: longcat_video_configs(), ~40 GB) takes seconds to
    minutes. The text encoder's vocabulary stays real size; the tokenizer only uses its first ids."""
    import ml_dtypes

    folder = Path(folder)
    dtype = np.dtype(dtype if dtype is not None else ml_dtypes.bfloat16)
    configs = configs if configs is not None else longcat_video_configs()
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(folder / "tokenizer")
    if configs["text_encoder"]["vocab_size"] < vocab:
        raise ValueError(f"configs['text_encoder'] vocab_size={configs['text_encoder']['vocab_size']}; the tiny "
                         f"tokenizer needs >= {vocab}")
    for sub, weights_name in (("dit", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"),
                              ("vae", "diffusion_pytorch_model.safetensors")):
        _write_component_streaming(folder / sub, configs[sub], weights_name, values, dtype)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny_scheduler_config(), indent=2))
    return folder
