"""Which published LongCat-Video LoRA files load: the module names they target and their key layouts.

The released `lora/cfg_step_lora.safetensors` (distill) and `lora/refinement_lora.safetensors`
cannot be downloaded here. Their layout is upstream's LoRA network (longcat_video/modules/
lora_utils.py: keys `lora___lorahyphen___<module with ___lorahyphen___ for dots>.lora_down.weight`,
`.lora_up.weight` or `.lora_up.blocks.<j>.weight`, `.alpha_scale`; its network is built from the
file's own keys and loaded strictly), and the modules they target are the ones FastVideo's converter
for exactly these two files maps (hao-ai-lab/FastVideo scripts/checkpoint_conversion/
longcat_to_fastvideo.py, `map_lora_module`): every block's attn.qkv / attn.proj / cross_attn.q_linear /
cross_attn.kv_linear / ffn.w1-w3 / adaLN_modulation.1, and final_layer.adaLN_modulation.1 /
final_layer.linear. A file over every one of those loads and is applied with upstream's formula
(the math itself is checked against an upstream-made file in test_longcat_lora.py); FastVideo's
converted LoRAs (PEFT-style `lora_A` / `lora_B` / `lora_alpha` on FastVideo's module names) do not
and say so.
"""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from convert.safetensors_io import write_safetensors
from jaxvid.models.longcat import LongCatConfig, LongCatVideoTransformer3D
from jaxvid.models.lora import load_lora

# FastVideo's map_lora_module patterns (upstream module -> number of output parts the LoRA splits)
BLOCK_TARGETS = {"attn.qkv": 3, "attn.proj": 1, "cross_attn.q_linear": 1, "cross_attn.kv_linear": 2,
                 "ffn.w1": 1, "ffn.w2": 1, "ffn.w3": 1, "adaLN_modulation.1": 1}
FINAL_TARGETS = {"final_layer.adaLN_modulation.1": 1, "final_layer.linear": 1}
RANK = 2


def _kernel_shapes(cfg):
    abstract = nnx.eval_shape(lambda: LongCatVideoTransformer3D(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {".".join(str(p) for p in path): tuple(v.get_value().shape) for path, v in flat}


def _upstream_file(path, cfg, rng):
    shapes = _kernel_shapes(cfg)
    tensors, expected = {}, []
    modules = [(f"blocks.{i}.{m}", f"blocks.{m}", n) for i in range(cfg.depth) for m, n in BLOCK_TARGETS.items()]
    modules += [(m, m, n) for m, n in FINAL_TARGETS.items()]
    for module, jax_path, n in modules:
        d_in, d_out = shapes[f"{jax_path}.kernel"][-2:]
        name = "lora___lorahyphen___" + module.replace(".", "___lorahyphen___")
        tensors[f"{name}.lora_down.weight"] = rng.normal(size=(n * RANK, d_in)).astype(np.float32)
        if n == 1:
            tensors[f"{name}.lora_up.weight"] = rng.normal(size=(d_out, RANK)).astype(np.float32)
        else:
            for j in range(n):
                tensors[f"{name}.lora_up.blocks.{j}.weight"] = rng.normal(size=(d_out // n, RANK)).astype(np.float32)
        tensors[f"{name}.alpha_scale"] = np.asarray(0.5, np.float32)
        expected.append(module)
    write_safetensors(path, tensors)
    return expected


def test_upstream_lora_layout_over_every_released_target_loads(tmp_path):
    cfg = LongCatConfig.tiny()
    rng = np.random.default_rng(0)
    for name in ("cfg_step_lora", "refinement_lora"):
        path = tmp_path / f"{name}.safetensors"
        expected = _upstream_file(path, cfg, rng)
        lora = load_lora(path, cfg, name)
        assert sorted(layer.module for layer in lora.layers) == sorted(expected)
        assert all(layer.alpha_scale == 0.5 for layer in lora.layers)
        qkv = next(layer for layer in lora.layers if layer.module == "blocks.0.attn.qkv")
        assert qkv.down.shape == (cfg.hidden_size, 3 * RANK) and qkv.up.shape == (3 * RANK, 3 * cfg.hidden_size)


def test_fastvideo_converted_lora_is_rejected_clearly(tmp_path):
    path = tmp_path / "fastvideo_refinement.safetensors"
    write_safetensors(path, {"blocks.0.self_attn.to_q.lora_A": np.zeros((RANK, 64), np.float32),
                             "blocks.0.self_attn.to_q.lora_B": np.zeros((64, RANK), np.float32),
                             "blocks.0.self_attn.to_q.lora_alpha": np.asarray(1.0, np.float32)})
    with pytest.raises(ValueError, match="keys not in upstream's LoRA layout"):
        load_lora(path, LongCatConfig.tiny(), "refinement_lora")
