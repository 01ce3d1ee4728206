"""LongCat LoRAs in upstream's file layout: run-time and merged, vs upstream's enable_loras (fp32, CPU)."""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.safetensors_io import SafetensorsReader, write_safetensors
from jaxvid.models.loading import load_model
from jaxvid.models.lora import LoRALibrary, load_lora

EXTRA = Path(__file__).parent / "data" / "longcat_extra"
TOL = 1e-4

forward = nnx.jit(lambda model, *args, **kw: model(*args, **kw))


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return load_model(fixtures_dir / "longcat" / "dit_dense" / "transformer")


@pytest.fixture(scope="module")
def io():
    data = np.load(EXTRA / "io.npz")
    return data, tuple(jnp.asarray(data[k]) for k in
                       ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"))


@pytest.fixture(scope="module")
def library(model):
    lib = LoRALibrary(model.cfg)
    # Upstream: load_lora(..., multiplier=0.7) for "a"; alpha_scale comes from the files.
    lib.load("a", EXTRA / "lora_a.safetensors", multiplier=0.7)
    lib.load("b", EXTRA / "lora_b.safetensors")
    return lib


@pytest.mark.parametrize("names, expected", [(["a", "b"], "out_lora_ab"), (["b"], "out_lora_b")])
def test_lora_runtime_and_merged_match_upstream(model, io, library, names, expected):
    data, args = io
    library.enable(names)
    assert rel_l2(forward(model, *args, lora=library.runtime()), data[expected]) < TOL
    merged = library.merged(model)
    assert rel_l2(forward(merged, *args), data[expected]) < TOL
    library.disable_all()
    assert library.runtime() is None
    assert rel_l2(forward(model, *args), data["out_varlen"]) < TOL  # the base model is untouched


def test_lora_layers_resolved(model, library):
    a = {layer.module: layer for layer in library._loras["a"].layers}
    qkv = a["blocks.0.attn.qkv"]  # three output parts: block-diagonal up
    assert (qkv.target, qkv.index, qkv.rank, qkv.alpha_scale) == ("blocks.attn.qkv", 0, 12, 0.5)
    assert a["final_layer.linear"].index is None


def _rewrite(src: Path, dst: Path, rename: dict[str, str] | None = None, drop: str | None = None, reshape=None):
    reader = SafetensorsReader(src)
    tensors = {}
    for k in reader.keys():
        if drop and drop in k:
            continue
        arr = np.array(reader.read(k))
        if reshape and reshape in k:
            arr = arr[:-1]
        tensors[(rename or {}).get(k, k)] = arr
    write_safetensors(dst, tensors)
    return dst


def test_lora_errors(model, library, tmp_path):
    src = EXTRA / "lora_b.safetensors"
    key = next(k for k in SafetensorsReader(src).keys() if k.endswith("lora_down.weight"))
    bad_module = key.replace("blocks___lorahyphen___0", "blocks___lorahyphen___7")
    with pytest.raises(ValueError, match="match no Linear layer.*blocks.7"):
        load_lora(_rewrite(src, tmp_path / "m.safetensors", {key: bad_module}), model.cfg)
    with pytest.raises(ValueError, match="not in upstream's LoRA layout"):
        load_lora(_rewrite(src, tmp_path / "k.safetensors", {key: key.replace("lora_down", "lora_sideways")}),
                  model.cfg)
    with pytest.raises(ValueError, match="do not fit"):
        load_lora(_rewrite(src, tmp_path / "s.safetensors", reshape="lora_down"), model.cfg)
    with pytest.raises(ValueError, match="not loaded"):
        library.enable(["refinement_lora"])
    write_safetensors(tmp_path / "empty.safetensors", {})
    with pytest.raises(ValueError, match=r"no LoRA layers found.*0___lorahyphen___attn___lorahyphen___qkv\.lora_down"):
        load_lora(tmp_path / "empty.safetensors", model.cfg)


def test_alpha_used_without_alpha_scale(model, tmp_path):
    path = _rewrite(EXTRA / "lora_b.safetensors", tmp_path / "noalpha.safetensors", drop="alpha_scale")
    lora = load_lora(path, model.cfg, alpha=1.0)
    assert all(layer.alpha_scale == 1.0 / layer.rank for layer in lora.layers)
