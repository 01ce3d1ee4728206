"""LongCat DiT in FastVideo's native key layout: read back to the same model as the upstream layout.

The FastVideo-layout checkpoint is made from the upstream fixture the way FastVideo's converter
(hao-ai-lab/FastVideo scripts/checkpoint_conversion/longcat_to_fastvideo.py, names as in
fastvideo/configs/models/dits/longcat.py `param_names_mapping`) makes it: regex renames, fused
`attn.qkv` chunked in 3 and `cross_attn.kv_linear` in 2 along the output axis, config.json with
FastVideo's class name and `num_attention_heads`. That transcription lives here, apart from
jaxvid's table, so the table is checked against it; the loaded model must equal the upstream-layout
load parameter for parameter and reproduce the upstream PyTorch output stored with the fixture.
"""
from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.apply import ConversionError
from convert.keymaps.longcat_fastvideo import FastVideoSource, fastvideo_hf_config, fastvideo_joins, to_fastvideo
from convert.safetensors_io import SafetensorsReader, write_safetensors
from jaxvid.models import load_transformer
from jaxvid.models.longcat import LongCatConfig
from jaxvid.models.longcat_fastvideo import is_fastvideo_longcat, load_longcat_fastvideo

# FastVideo's renames (its param_names_mapping), upstream -> FastVideo; fused ones are split below.
FASTVIDEO_RENAMES = [
    (r"^x_embedder\.(.*)$", r"patch_embed.\1"),
    (r"^t_embedder\.mlp\.0\.(.*)$", r"time_embedder.linear_1.\1"),
    (r"^t_embedder\.mlp\.2\.(.*)$", r"time_embedder.linear_2.\1"),
    (r"^y_embedder\.y_proj\.0\.(.*)$", r"caption_embedder.linear_1.\1"),
    (r"^y_embedder\.y_proj\.2\.(.*)$", r"caption_embedder.linear_2.\1"),
    (r"^blocks\.(\d+)\.adaLN_modulation\.1\.(.*)$", r"blocks.\1.adaln_linear_1.\2"),
    (r"^blocks\.(\d+)\.pre_crs_attn_norm\.(.*)$", r"blocks.\1.norm_cross.\2"),
    (r"^blocks\.(\d+)\.attn\.proj\.(.*)$", r"blocks.\1.self_attn.to_out.\2"),
    (r"^blocks\.(\d+)\.attn\.q_norm\.(.*)$", r"blocks.\1.self_attn.q_norm.\2"),
    (r"^blocks\.(\d+)\.attn\.k_norm\.(.*)$", r"blocks.\1.self_attn.k_norm.\2"),
    (r"^blocks\.(\d+)\.cross_attn\.q_linear\.(.*)$", r"blocks.\1.cross_attn.to_q.\2"),
    (r"^blocks\.(\d+)\.cross_attn\.proj\.(.*)$", r"blocks.\1.cross_attn.to_out.\2"),
    (r"^blocks\.(\d+)\.cross_attn\.([qk]_norm)\.(.*)$", r"blocks.\1.cross_attn.\2.\3"),
    (r"^blocks\.(\d+)\.ffn\.(w[123])\.(.*)$", r"blocks.\1.ffn.\2.\3"),
    (r"^final_layer\.adaLN_modulation\.1\.(.*)$", r"final_layer.adaln_linear.\1"),
    (r"^final_layer\.linear\.(.*)$", r"final_layer.proj.\1"),
]
FASTVIDEO_SPLITS = [
    (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", ["self_attn.to_q", "self_attn.to_k", "self_attn.to_v"]),
    (r"^blocks\.(\d+)\.cross_attn\.kv_linear\.(weight|bias)$", ["cross_attn.to_k", "cross_attn.to_v"]),
]


def fastvideo_convert(upstream: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FastVideo's converter on upstream tensors (the reference for jaxvid's table)."""
    out = {}
    for key, value in upstream.items():
        for pattern, parts in FASTVIDEO_SPLITS:
            m = re.match(pattern, key)
            if m:
                for name, chunk in zip(parts, np.split(value, len(parts), axis=0)):
                    out[f"blocks.{m[1]}.{name}.{m[2]}"] = chunk
                break
        else:
            for pattern, repl in FASTVIDEO_RENAMES:
                if re.match(pattern, key):
                    out[re.sub(pattern, repl, key)] = value
                    break
            else:
                raise AssertionError(f"FastVideo's converter has no rule for {key}")
    return out


@pytest.fixture(scope="module")
def upstream_dir(fixtures_dir):
    return fixtures_dir / "longcat" / "dit_dense"


@pytest.fixture(scope="module")
def upstream_tensors(upstream_dir) -> dict[str, np.ndarray]:
    r = SafetensorsReader(upstream_dir / "transformer")
    return {k: r.read(k) for k in r.keys()}


@pytest.fixture(scope="module")
def fastvideo_dir(upstream_dir, upstream_tensors, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fastvideo") / "transformer"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", fastvideo_convert(upstream_tensors))
    config = json.loads((upstream_dir / "transformer" / "config.json").read_text())
    config["_class_name"] = "LongCatTransformer3DModel"
    config["num_attention_heads"] = config.pop("num_heads")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_table_is_the_inverse_of_fastvideos_converter(upstream_tensors):
    cfg = LongCatConfig.tiny()
    ours = to_fastvideo(upstream_tensors, cfg)
    theirs = fastvideo_convert(upstream_tensors)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    # every upstream tensor is one join, every FastVideo tensor in exactly one join
    joins = fastvideo_joins(cfg)
    assert {j.target for j in joins} == set(upstream_tensors)
    sources = [s for j in joins for s in j.sources]
    assert sorted(sources) == sorted(theirs)


def test_fastvideo_layout_loads_the_same_model(fastvideo_dir, upstream_dir):
    assert is_fastvideo_longcat(fastvideo_dir) and not is_fastvideo_longcat(upstream_dir / "transformer")
    fv = load_longcat_fastvideo(fastvideo_dir)
    up = load_transformer(upstream_dir / "transformer")
    a, b = _params(fv), _params(up)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    io = np.load(upstream_dir / "io.npz")
    args = (jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), jnp.asarray(io["encoder_hidden_states"]),
            jnp.asarray(io["encoder_attention_mask"]))
    out = np.asarray(nnx.jit(lambda m, *x: m(*x))(fv, *args), np.float64)
    ref = io["output"].astype(np.float64)
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    print(f"FastVideo layout vs upstream torch output: rel L2 {err:.2e}")
    assert err < 1e-4


def test_unused_or_missing_tensors_are_listed(fastvideo_dir, upstream_tensors, tmp_path):
    cfg = LongCatConfig.tiny()
    tensors = fastvideo_convert(upstream_tensors)

    class Dict:
        def __init__(self, d):
            self.d = d

        def keys(self):
            return list(self.d)

        def shape(self, k):
            return self.d[k].shape

        def dtype(self, k):
            return self.d[k].dtype

        def read(self, k):
            return self.d[k]

    extra = {**tensors, "blocks.0.self_attn.to_qkv.weight": tensors["blocks.0.self_attn.to_q.weight"]}
    with pytest.raises(ConversionError, match=r"nothing uses .*\n.*to_qkv"):
        FastVideoSource(Dict(extra), cfg)
    missing = {k: v for k, v in tensors.items() if k != "blocks.1.cross_attn.to_v.bias"}
    with pytest.raises(ConversionError, match=r"lacks .*\n.*blocks.1.cross_attn.to_v.bias"):
        FastVideoSource(Dict(missing), cfg)
    bad = {**tensors, "blocks.0.self_attn.to_k.weight": np.zeros((64, 3), np.float32)}
    with pytest.raises(ConversionError, match="concatenate"):
        FastVideoSource(Dict(bad), cfg)
    # an upstream-layout folder is not mistaken for a FastVideo one
    folder = tmp_path / "t"
    shutil.copytree(fastvideo_dir, folder)
    write_safetensors(folder / "model.safetensors", upstream_tensors)
    with pytest.raises(ConversionError, match="nothing uses"):
        load_longcat_fastvideo(folder)


def test_config_mapping():
    d = fastvideo_hf_config({"_class_name": "LongCatTransformer3DModel", "num_attention_heads": 4, "depth": 2})
    assert d == {"_class_name": "LongCatVideoTransformer3DModel", "num_heads": 4, "depth": 2}
    with pytest.raises(ValueError, match="disagree"):
        fastvideo_hf_config({"num_attention_heads": 4, "num_heads": 8})


# ---- LoRA files converted by FastVideo ---------------------------------------------------------

# FastVideo's LoRA converter (longcat_to_fastvideo.py convert_lora_weights / map_lora_module),
# transcribed: upstream module -> FastVideo module(s) (several: a fused projection split by output).
FASTVIDEO_LORA_MODULES = [
    (r"^blocks\.(\d+)\.attn\.qkv$", ["blocks.{}.self_attn.to_q", "blocks.{}.self_attn.to_k", "blocks.{}.self_attn.to_v"]),
    (r"^blocks\.(\d+)\.attn\.proj$", ["blocks.{}.self_attn.to_out"]),
    (r"^blocks\.(\d+)\.cross_attn\.q_linear$", ["blocks.{}.cross_attn.to_q"]),
    (r"^blocks\.(\d+)\.cross_attn\.kv_linear$", ["blocks.{}.cross_attn.to_k", "blocks.{}.cross_attn.to_v"]),
    (r"^blocks\.(\d+)\.ffn\.(w[123])$", ["blocks.{}.ffn.{}"]),
    (r"^blocks\.(\d+)\.adaLN_modulation\.1$", ["blocks.{}.adaln_linear_1"]),
    (r"^final_layer\.adaLN_modulation\.1$", ["final_layer.adaln_linear"]),
    (r"^final_layer\.linear$", ["final_layer.proj"]),
]


def fastvideo_convert_lora(upstream: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in upstream.items():
        name = key.removeprefix("lora___lorahyphen___").replace("___lorahyphen___", ".")
        module, part = re.match(r"^(.+?)\.(lora_down\.weight|lora_up\.weight|lora_up\.blocks\.\d+\.weight|alpha_scale)$",
                                name).groups()
        modules.setdefault(module, {})[part] = value
    out = {}
    for module, parts in modules.items():
        targets = None
        for pattern, names in FASTVIDEO_LORA_MODULES:
            m = re.match(pattern, module)
            if m:
                targets = [n.format(*m.groups()) for n in names]
                break
        if targets is None:
            continue  # FastVideo's converter drops modules it has no rule for (t_embedder, y_embedder)
        alpha_scale = float(parts.get("alpha_scale", np.float32(1.0)))
        down, n = parts["lora_down.weight"], len(targets)
        rank = down.shape[0] // n
        for i, t in enumerate(targets):
            out[f"{t}.lora_A"] = down[i * rank:(i + 1) * rank] if n > 1 else down
            out[f"{t}.lora_alpha"] = np.array(alpha_scale * (rank if n > 1 else down.shape[0]), np.float32)
        blocks = [parts[f"lora_up.blocks.{i}.weight"] for i in range(8) if f"lora_up.blocks.{i}.weight" in parts]
        if blocks and n == 1:
            o, r = blocks[0].shape
            bd = np.zeros((o * len(blocks), r * len(blocks)), np.float32)
            for i, blk in enumerate(blocks):
                bd[i * o:(i + 1) * o, i * r:(i + 1) * r] = blk
            out[f"{targets[0]}.lora_B"] = bd
        elif blocks:
            for i, t in enumerate(targets):
                out[f"{t}.lora_B"] = blocks[i]
        else:
            up = parts["lora_up.weight"]
            for t, chunk in zip(targets, np.split(up, n, axis=0)):
                out[f"{t}.lora_B"] = chunk
    return out


def test_fastvideo_lora_matches_upstream_output(fixtures_dir, tmp_path):
    """lora_one (qkv in 3 output parts, kv in 2, like the released cfg_step_lora) converted by
    FastVideo's rules, loaded back, run: the upstream PyTorch output with that LoRA."""
    from jaxvid.models.longcat_fastvideo import load_fastvideo_lora
    from jaxvid.models.lora import LoRALibrary

    folder = fixtures_dir / "longcat" / "lora_one"
    r = SafetensorsReader(folder / "lora_cfg_step_lora.safetensors")
    fv = fastvideo_convert_lora({k: r.read(k) for k in r.keys()})
    assert "blocks.0.self_attn.to_v.lora_A" in fv and "blocks.0.cross_attn.to_k.lora_B" in fv
    path = tmp_path / "distilled" / "cfg_step_lora.safetensors"
    path.parent.mkdir()
    write_safetensors(path, fv)
    model = load_transformer(folder / "transformer")
    lora = load_fastvideo_lora(path, model.cfg)
    assert lora.name == "distilled"
    lib = LoRALibrary(model.cfg)
    lib.add(lora)
    lib.enable(["distilled"])
    io = np.load(folder / "io.npz")
    args = (jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), jnp.asarray(io["encoder_hidden_states"]),
            jnp.asarray(io["encoder_attention_mask"]))
    ref = io["output"].astype(np.float64)
    for label, out in (("runtime", nnx.jit(lambda m, lo, *x: m(*x, lora=lo))(model, lib.runtime(), *args)),
                       ("merged", nnx.jit(lambda m, *x: m(*x))(lib.merged(model), *args))):
        out = np.asarray(out, np.float64)
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        print(f"FastVideo-layout LoRA ({label}) vs upstream torch: rel L2 {err:.2e}")
        assert err < 1e-4
    assert float(np.linalg.norm(io["output"] - io["output_base"])) > 1e-3 * float(np.linalg.norm(ref))


def test_fastvideo_lora_errors(tmp_path):
    from jaxvid.models.longcat_fastvideo import load_fastvideo_lora

    cfg = LongCatConfig.tiny()
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"blocks.0.self_attn.to_q.lora_A": np.zeros((2, 64), np.float32)})
    with pytest.raises(ValueError, match="needs lora_A and lora_B"):
        load_fastvideo_lora(path, cfg)
    write_safetensors(path, {"blocks.0.attn.qkv.lora_A": np.zeros((2, 64), np.float32)})
    with pytest.raises(ValueError, match="not a FastVideo LoRA tensor"):
        load_fastvideo_lora(path, cfg)
    write_safetensors(path, {"blocks.0.self_attn.to_q.lora_A": np.zeros((2, 64), np.float32),
                             "blocks.0.self_attn.to_q.lora_B": np.zeros((192, 2), np.float32)})
    with pytest.raises(ValueError, match="do not fit"):
        load_fastvideo_lora(path, cfg)
