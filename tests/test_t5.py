"""T5 v1.1 / umT5 encoders against transformers' T5EncoderModel / UMT5EncoderModel (fp32, CPU)."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel, UMT5Config, UMT5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from convert.apply import ConversionError
from convert.keymaps.t5 import TIED_EMBEDDING_IGNORE, encoder_rules
from convert.safetensors_io import SafetensorsReader
from jaxvid.models.loading import fill_model, load_model
from jaxvid.models.t5 import T5Config, T5Encoder, relative_position_buckets

HF_CLASSES = {"t5": (HFT5Config, T5EncoderModel), "umt5": (UMT5Config, UMT5EncoderModel)}
TINY = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=20, feed_forward_proj="gated-gelu", dropout_rate=0.0)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _save_hf(tmp_path_factory, kind: str, num_layers: int, seed: int = 0):
    torch.manual_seed(seed)
    config_cls, model_cls = HF_CLASSES[kind]
    model = model_cls(config_cls(num_layers=num_layers, **TINY)).eval()
    folder = tmp_path_factory.mktemp(f"{kind}{num_layers}")
    model.save_pretrained(folder)
    return model, folder


def _inputs(batch=3, length=24, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY["vocab_size"], (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for row in range(1, batch):  # right padding, as the tokenizer makes it; row 0 unpadded
        mask[row, length // (row + 1):] = 0
    return ids, mask


def _reference(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()


def _load(folder, **cfg_override) -> T5Encoder:
    cfg = T5Config.from_hf_config(json.loads((folder / "config.json").read_text()))
    cfg = dataclasses.replace(cfg, **cfg_override)
    return fill_model(T5Encoder, cfg, encoder_rules(cfg), SafetensorsReader(folder), ignore=TIED_EMBEDDING_IGNORE)


@pytest.fixture(scope="module", params=["t5", "umt5"])
def saved(request, tmp_path_factory):
    return request.param, *_save_hf(tmp_path_factory, request.param, num_layers=3)


def test_whole_encoder_matches_transformers(saved):
    kind, model, folder = saved
    ids, mask = _inputs()
    ours = _load(folder)(jnp.asarray(ids), jnp.asarray(mask))
    assert ours.shape == (3, 24, TINY["d_model"])
    assert rel_l2(ours, _reference(model, ids, mask)) <= 1e-4


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_one_layer_matches_transformers(kind, tmp_path_factory):
    model, folder = _save_hf(tmp_path_factory, kind, num_layers=1, seed=3)
    ids, mask = _inputs(seed=4)
    assert rel_l2(_load(folder)(jnp.asarray(ids), jnp.asarray(mask)), _reference(model, ids, mask)) <= 1e-5


def test_load_model_through_registry_and_jit(saved):
    kind, model, folder = saved
    ids, mask = _inputs(batch=2, length=11, seed=5)
    encoder = load_model(folder, expect=["T5EncoderModel", "UMT5EncoderModel"])
    assert encoder.cfg.relative_bias_per_layer == (kind == "umt5")
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def encode(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    assert rel_l2(encode(state, ids, mask), _reference(model, ids, mask)) <= 1e-4


def test_bfloat16_stays_close(saved):
    kind, model, folder = saved
    ids, mask = _inputs(seed=6)
    out = _load(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    assert rel_l2(np.asarray(out, np.float32), _reference(model, ids, mask)) <= 3e-2


def test_relative_position_buckets_match_transformers():
    # 32 buckets / distance 128 are every T5 and umT5 XXL checkpoint's; 512 is LongCat's text length.
    for num_buckets, max_distance, length in ((32, 128, 512), (8, 20, 64), (64, 256, 300)):
        pos = torch.arange(length)
        ref = T5Attention._relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=True,
                                                    num_buckets=num_buckets, max_distance=max_distance)
        np.testing.assert_array_equal(relative_position_buckets(length, num_buckets, max_distance), ref.numpy())


def test_tied_embedding_under_either_name(saved, tmp_path):
    kind, model, folder = saved
    tensors = load_file(str(folder / "model.safetensors"))
    ids, mask = _inputs(batch=2, length=9, seed=7)
    ref = _reference(model, ids, mask)
    cfg = T5Config.from_hf_config(json.loads((folder / "config.json").read_text()))

    both = dict(tensors, **{"encoder.embed_tokens.weight": tensors["shared.weight"].clone()})
    save_file(both, str(tmp_path / "both.safetensors"))
    encoder = fill_model(T5Encoder, cfg, encoder_rules(cfg), SafetensorsReader(tmp_path / "both.safetensors"),
                         ignore=TIED_EMBEDDING_IGNORE)
    assert rel_l2(encoder(ids, mask), ref) <= 1e-4

    only_encoder = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in tensors.items()}
    save_file(only_encoder, str(tmp_path / "encoder_only.safetensors"))
    source = SafetensorsReader(tmp_path / "encoder_only.safetensors")
    with pytest.raises(ConversionError, match="shared.weight"):
        fill_model(T5Encoder, cfg, encoder_rules(cfg), source, ignore=TIED_EMBEDDING_IGNORE)
    encoder = fill_model(T5Encoder, cfg, encoder_rules(cfg, source.keys()), source, ignore=TIED_EMBEDDING_IGNORE)
    assert rel_l2(encoder(ids, mask), ref) <= 1e-4


def test_presets_and_config_reading():
    t5 = T5Config.t5_v1_1_xxl()
    umt5 = T5Config.umt5_xxl()
    assert (t5.d_model, t5.num_layers, t5.num_heads, t5.d_ff, t5.vocab_size) == (4096, 24, 64, 10240, 32128)
    assert not t5.relative_bias_per_layer and umt5.relative_bias_per_layer and umt5.vocab_size == 256384
    # LongCat's text_encoder/config.json carries keys transformers itself ignores (scalable_attention)
    longcat = {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "d_ff": 10240, "d_kv": 64, "d_model": 4096,
               "num_heads": 64, "num_layers": 24, "vocab_size": 256384, "feed_forward_proj": "gated-gelu",
               "dense_act_fn": "gelu_new", "is_gated_act": True, "scalable_attention": True, "tie_word_embeddings": False}
    assert T5Config.from_hf_config(longcat) == umt5
    abstract = nnx.eval_shape(lambda: T5Encoder(T5Config.tiny(relative_bias_per_layer=True), rngs=nnx.Rngs(0)))
    assert abstract.blocks.attention.relative_attention_bias.embedding.shape == (2, 8, 4)


@pytest.mark.parametrize(
    "change, field",
    [({"is_decoder": True}, "is_decoder"), ({"feed_forward_proj": "gated-swish-x"}, "feed_forward_proj"),
     ({"model_type": "bert", "architectures": ["BertModel"]}, "model_type"), ({"num_heads": 0}, "num_heads")],
)
def test_bad_config_names_the_field(change, field):
    base = {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_ff": 48, "d_kv": 8, "d_model": 32,
            "num_heads": 4, "num_layers": 2, "vocab_size": 99, "feed_forward_proj": "gated-gelu"}
    with pytest.raises(ValueError, match=field):
        T5Config.from_hf_config({**base, **change})


def test_bad_inputs_raise(saved):
    encoder = _load(saved[2])
    with pytest.raises(ValueError, match="input_ids"):
        encoder(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        encoder(jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32))


def test_registry_loads_a_checkpoint_with_only_the_encoder_embedding_name(saved, tmp_path):
    """load_model passes the checkpoint's keys to the key table, so either tied-embedding name loads."""
    import shutil

    from jaxvid.models.loading import load_model

    _, model, folder = saved
    tensors = load_file(str(folder / "model.safetensors"))
    only_encoder = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in tensors.items()}
    out = tmp_path / "encoder_only"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    save_file(only_encoder, str(out / "model.safetensors"))
    ids, mask = _inputs(batch=2, length=9, seed=3)
    assert rel_l2(load_model(out)(ids, mask), _reference(model, ids, mask)) <= 1e-4
