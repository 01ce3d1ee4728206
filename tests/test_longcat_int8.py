"""LongCat-Video's upstream INT8 weight-only checkpoints (convert.int8_weights, load_model).

A tiny fp32 LongCat DiT is written, then quantized the way upstream's `QuantizedLinear.from_linear`
does (torch, per output channel, symmetric, every Linear but `final_layer.linear`) into upstream's
`base_model_int8/` layout (`quantized_model-*.safetensors` + index + quantization_config.json).
Loading it must give the fp32 model's parameters within the int8 rounding (half a scale step per
row) and, exactly, upstream's dequantize formula evaluated by torch; broken files raise clearly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from convert.int8_weights import dequantize_int8
from convert.safetensors_io import SafetensorsReader, write_safetensors
from jaxvid.models import load_model
from jaxvid.synthetic.longcat import write_tiny_dit

SKIPPED = "final_layer.linear"


def _upstream_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's per-channel symmetric INT8 quantization of a torch Linear weight [out, in]."""
    t = torch.from_numpy(np.asarray(w, np.float32))
    scale = t.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return (t / scale.unsqueeze(1)).round().clamp(-128, 127).to(torch.int8).numpy(), scale.numpy()


def _upstream_dequantize(q: np.ndarray, scale: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Upstream's QuantizedLinear.forward dequantization, in torch, as float32 numpy."""
    w = torch.from_numpy(q).to(dtype) * torch.from_numpy(scale).to(dtype).unsqueeze(1)
    return w.float().numpy()


def _write_int8(fp32_dir: Path, out: Path, drop: str | None = None, keep_float: str | None = None) -> Path:
    """The int8 weight-only folder of `fp32_dir`'s DiT; `drop` omits one key, `keep_float` leaves one
    quantizable linear in float (both make a broken file)."""
    out.mkdir(parents=True)
    shutil.copy(fp32_dir / "config.json", out / "config.json")
    src = SafetensorsReader(fp32_dir)
    tensors = {}
    for key in src.keys():
        w = src.read(key)
        module = key[: -len(".weight")]
        if key.endswith(".weight") and w.ndim == 2 and SKIPPED not in key and module != keep_float:
            tensors[module + ".weight_int8"], tensors[module + ".weight_scale"] = _upstream_quantize(w)
        else:
            tensors[key] = w
    if drop:
        del tensors[drop]
    shard = "quantized_model-00001-of-00001.safetensors"
    write_safetensors(out / shard, tensors)
    (out / "quantized_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: shard for k in tensors}}))
    (out / "quantization_config.json").write_text(json.dumps(
        {"quantization_method": "int8_per_channel_symmetric", "skip_patterns": [SKIPPED]}))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("longcat_int8")
    fp32 = write_tiny_dit(root / "dit", seed=3)
    return fp32, _write_int8(fp32, root / "base_model_int8")


def _params(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(str(p) for p in path): np.asarray(v[...], np.float32) for path, v in flat}


def test_dequantize_matches_upstream_formula_exactly():
    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, (48, 40)).astype(np.int8)
    q[0, :2] = (-128, 127)
    scale = (np.exp(rng.uniform(-12, 2, 48)) / 127).astype(np.float32)
    for ours, theirs in [(np.float32, torch.float32), (ml_dtypes.bfloat16, torch.bfloat16), (np.float16, torch.float16)]:
        got = dequantize_int8(q, scale, ours)
        assert got.dtype == np.dtype(ours)
        np.testing.assert_array_equal(got.astype(np.float32), _upstream_dequantize(q, scale, theirs))


def test_int8_checkpoint_loads_as_the_fp32_one_within_int8_rounding(folders):
    fp32_dir, int8_dir = folders
    ref, got = _params(load_model(fp32_dir, dtype="fp32")), _params(load_model(int8_dir, dtype="fp32"))
    assert ref.keys() == got.keys()
    src = SafetensorsReader(int8_dir)
    quantized = 0
    for path, want in ref.items():
        module, leaf = path.rsplit(".", 1)
        stacked = module.startswith("blocks.")
        pieces = range(want.shape[0]) if stacked else [None]
        for i in pieces:
            upstream = module.replace("blocks.", f"blocks.{i}.", 1) if stacked else module
            w, g = (want[i], got[path][i]) if stacked else (want, got[path])
            if leaf == "kernel" and upstream + ".weight_int8" in src:
                q, s = src.read(upstream + ".weight_int8"), src.read(upstream + ".weight_scale")
                # exactly upstream's dequantized weight (torch, fp32), transposed to [in, out]
                np.testing.assert_array_equal(g, _upstream_dequantize(q, s, torch.float32).T)
                # and the fp32 weight within half an int8 step of its row
                assert np.all(np.abs(g - w) <= 0.5 * s[None, :] * (1 + 1e-5)), upstream
                quantized += 1
            else:
                np.testing.assert_array_equal(g, w, err_msg=path)  # norms, biases, conv, final layer
    # t_embedder (2), y_embedder (2), final_layer.adaLN_modulation.1; 9 linears per block x 2 blocks
    assert quantized == 5 + 9 * 2


def test_int8_checkpoint_in_bf16(folders):
    _, int8_dir = folders
    got = _params(load_model(int8_dir, dtype="bf16"))
    src = SafetensorsReader(int8_dir)
    q, s = src.read("blocks.1.attn.qkv.weight_int8"), src.read("blocks.1.attn.qkv.weight_scale")
    np.testing.assert_array_equal(got["blocks.attn.qkv.kernel"][1], _upstream_dequantize(q, s, torch.bfloat16).T)


@pytest.mark.parametrize("broken, match", [
    (dict(drop="blocks.0.attn.proj.weight_scale"), r"blocks\.0\.attn\.proj: has .*weight_int8 but not .*weight_scale"),
    (dict(keep_float="blocks.1.ffn.w1"), r"partially quantized: 1 linear .*blocks\.1\.ffn\.w1\.weight"),
], ids=["scale-missing", "partially-quantized"])
def test_broken_int8_checkpoints_raise_clearly(folders, tmp_path, broken, match):
    bad = _write_int8(folders[0], tmp_path / "bad", **broken)
    with pytest.raises(ValueError, match=match):
        load_model(bad, dtype="fp32")


def test_unknown_quantization_method(folders, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folders[1], bad)
    (bad / "quantization_config.json").write_text('{"quantization_method": "int4_awq"}')
    with pytest.raises(ValueError, match="quantization_method='int4_awq'"):
        load_model(bad, dtype="fp32")

