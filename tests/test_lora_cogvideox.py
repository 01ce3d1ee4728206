"""CogVideoX LoRAs: jaxvid vs diffusers (PEFT backend) with the same LoRA files, fp32 on CPU.

A tiny diffusers CogVideoXTransformer3DModel gets random PEFT adapters (every Linear kind, the
Conv2d patch embedding of 1.0 models, a rank / alpha pattern, rsLoRA, adapters on some layers
only), saved by `CogVideoXPipeline.save_lora_weights` (with and without diffusers' adapter
metadata). diffusers loads them with `load_lora_adapter` (what `pipe.load_lora_weights` calls)
and runs with set_adapters / fuse_lora / unfuse_lora; jaxvid loads the same files and must give
the same transformer output (rel L2 <= 1e-4). The kohya layout is the same tensors renamed as
CogVideoX-Fun's LoRANetwork names them, with each module's alpha: it must match diffusers running
the PEFT file.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel  # noqa: E402
from flax import nnx  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from convert.safetensors_io import SafetensorsReader, write_safetensors  # noqa: E402
from jaxvid.models import load_transformer  # noqa: E402
from jaxvid.models.lora_cogvideox import (  # noqa: E402
    CogVideoXLoRAAdapters,
    CogVideoXLoraLoaderMixin,
    fuse_lora,
    load_cogvideox_lora,
    lora_targets,
    merge_into_state,
    unfuse_lora,
)
from tests.test_cogvideox_parity import _TINY, Case, jax_forward, make_inputs, rel_l2, torch_forward  # noqa: E402

MODEL_RTOL = 1e-4

CASES = [
    # 1.0 5b-like: Conv2d patch embedding (PEFT adapts it as a conv LoRA), RoPE
    Case("5b_conv_patch", dict(use_rotary_positional_embeddings=True), frames=3, height=8, width=12, text_tokens=6),
    # 1.5-like: Linear patch embedding over t x h x w patches, no affine norms
    Case("15_linear_patch", dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False,
                                 norm_elementwise_affine=False), frames=4, height=6, width=8),
]

# Adapter "a": every Linear kind (and the patch embedding via "proj"), rank / alpha patterns.
CONFIG_A = dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj", "ff.net.2", "linear",
                                                   "proj_out", "text_proj", "linear_1", "linear_2"],
                rank_pattern={"to_v": 2}, alpha_pattern={"ff.net.2": 3})
# Adapter "b": a few modules of one block only, rsLoRA scaling.
CONFIG_B = dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["transformer_blocks.1.attn1.to_k",
                                                                    "transformer_blocks.1.ff.net.0.proj", "proj_out"])
WEIGHT = "pytorch_lora_weights.safetensors"


def _save_adapter(model, name: str, folder: Path, with_metadata: bool) -> Path:
    sd = get_peft_model_state_dict(model, adapter_name=name)
    meta = model.peft_config[name].to_dict() if with_metadata else None
    CogVideoXPipeline.save_lora_weights(folder, transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta)
    return folder / WEIGHT


@dataclasses.dataclass
class Built:
    case: Case
    cfg: dict
    base: object  # torch model without adapters
    jmodel: object
    files: dict[str, Path]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def built(request, tmp_path_factory) -> Built:
    case: Case = request.param
    cfg = {**_TINY, **case.config}
    torch.manual_seed(0)
    base = CogVideoXTransformer3DModel(**cfg).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    root = tmp_path_factory.mktemp(f"lora_{case.name}")
    base.save_pretrained(root / "model")
    # random (not zero-initialised) adapters, kept small so the LoRA changes the output but does not swamp it
    trainer = copy.deepcopy(base)
    trainer.add_adapter(LoraConfig(init_lora_weights=False, **CONFIG_A), adapter_name="a")
    trainer.add_adapter(LoraConfig(init_lora_weights=False, **CONFIG_B), adapter_name="b")
    with torch.no_grad():
        for n, p in trainer.named_parameters():
            if "lora_" in n:
                p.mul_(0.3)
    files = {
        "a": _save_adapter(trainer, "a", root / "a", with_metadata=True),
        "b": _save_adapter(trainer, "b", root / "b", with_metadata=True),
        "b_nometa": _save_adapter(trainer, "b", root / "b_nometa", with_metadata=False),
    }
    return Built(case, cfg, base, load_transformer(root / "model"), files)


def torch_with(b: Built, adapters: dict[str, Path]):
    m = copy.deepcopy(b.base)
    for name, f in adapters.items():
        m.load_lora_adapter(str(f.parent), weight_name=f.name, prefix="transformer", adapter_name=name)
    return m


def jax_run(b: Built, state, inputs) -> np.ndarray:
    graphdef, _ = nnx.split(b.jmodel)
    return jax_forward(nnx.merge(graphdef, state), inputs)


def base_state(b: Built):
    return nnx.split(b.jmodel)[1]


def params(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_the_lora_changes_the_output(built):
    inputs = make_inputs(built.case, built.cfg)
    ref_base = torch_forward(built.base, inputs, built.case)
    ref_lora = torch_forward(torch_with(built, {"a": built.files["a"]}), inputs, built.case)
    assert rel_l2(ref_lora, ref_base) > 1e-2  # otherwise the parity tests below would prove little


def test_file_layout_is_diffusers(built):
    keys = SafetensorsReader(built.files["a"]).keys()
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    lora = load_cogvideox_lora(built.files["a"], CogVideoXConfigOf(built))
    assert len(lora.layers) * 2 == len(keys)  # every tensor used
    if built.cfg.get("patch_size_t") is None:
        assert "patch_embed.proj" in {layer.module for layer in lora.layers}  # the Conv2d LoRA is read


def CogVideoXConfigOf(b: Built):  # noqa: N802
    return b.jmodel.cfg


@pytest.mark.parametrize("which", ["a", "b", "b_nometa"])
def test_one_adapter_matches_diffusers(built, which):
    inputs = make_inputs(built.case, built.cfg)
    ref = torch_forward(torch_with(built, {which: built.files[which]}), inputs, built.case)
    adapters = CogVideoXLoRAAdapters(built.jmodel.cfg)
    adapters.load(built.files[which], adapter_name=which)
    err = rel_l2(jax_run(built, adapters.apply(base_state(built)), inputs), ref)
    print(f"{built.case.name} adapter {which}: rel L2 = {err:.2e}")
    assert err <= MODEL_RTOL


def test_two_adapters_with_weights_match_diffusers(built):
    inputs = make_inputs(built.case, built.cfg, seed=1)
    tm = torch_with(built, {"a": built.files["a"], "b": built.files["b"]})
    tm.set_adapters(["a", "b"], weights=[0.7, -0.4])
    ref = torch_forward(tm, inputs, built.case)
    adapters = CogVideoXLoRAAdapters(built.jmodel.cfg)
    adapters.load(built.files["a"], adapter_name="a")
    adapters.load(built.files["b"], adapter_name="b", scale=0.3)
    assert adapters.active == {"b": 0.3}  # as diffusers: loading activates only the new adapter
    adapters.set_adapters(["a", "b"], [0.7, -0.4])
    err = rel_l2(jax_run(built, adapters.apply(base_state(built)), inputs), ref)
    print(f"{built.case.name} two adapters: rel L2 = {err:.2e}")
    assert err <= MODEL_RTOL


def test_fuse_and_unfuse_match_diffusers(built):
    inputs = make_inputs(built.case, built.cfg, seed=2)
    tm = torch_with(built, {"a": built.files["a"], "b": built.files["b"]})
    tm.set_adapters(["a", "b"], weights=[0.5, 1.2])
    unfused_ref = torch_forward(tm, inputs, built.case)
    tm.fuse_lora()
    fused_ref = torch_forward(tm, inputs, built.case)

    adapters = CogVideoXLoRAAdapters(built.jmodel.cfg)
    adapters.load(built.files["a"], adapter_name="a")
    adapters.load(built.files["b"], adapter_name="b")
    adapters.set_adapters(["a", "b"], [0.5, 1.2])
    base = base_state(built)
    fused = adapters.fuse(base)
    assert adapters.apply(fused) is fused  # fused adapters are not added a second time
    err_fused = rel_l2(jax_run(built, fused, inputs), fused_ref)
    unfused = adapters.unfuse(fused)
    tm.unfuse_lora()
    err_unfused = rel_l2(jax_run(built, adapters.apply(unfused), inputs), torch_forward(tm, inputs, built.case))
    print(f"{built.case.name}: fused rel L2 {err_fused:.2e}, after unfuse {err_unfused:.2e}")
    assert err_fused <= MODEL_RTOL and err_unfused <= MODEL_RTOL
    assert rel_l2(fused_ref, unfused_ref) <= MODEL_RTOL
    # unfuse gives the original weights back bit for bit (diffusers subtracts; we restore)
    before, after = params(base), params(unfused)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_fuse_with_lora_scale_matches_diffusers(built):
    inputs = make_inputs(built.case, built.cfg, seed=3)
    tm = torch_with(built, {"a": built.files["a"]})
    tm.fuse_lora(lora_scale=0.6)
    ref = torch_forward(tm, inputs, built.case)
    adapters = CogVideoXLoRAAdapters(built.jmodel.cfg)
    adapters.load(built.files["a"], adapter_name="a")
    err = rel_l2(jax_run(built, adapters.fuse(base_state(built), lora_scale=0.6), inputs), ref)
    assert err <= MODEL_RTOL


def _kohya(peft_file: Path, config: dict, out: Path, style: str) -> Path:
    """The PEFT file's tensors under kohya names, each module with its alpha (as a kohya trainer saves them)."""
    reader = SafetensorsReader(peft_file)
    tensors = {}
    for key in reader.keys():
        module, part = key.removeprefix("transformer.").rsplit(".lora_", 1)
        name = {"double": "lora_unet__" + module.replace(".", "_"), "single": "lora_unet_" + module.replace(".", "_"),
                "dotted": "transformer." + module}[style]
        arr = reader.read(key)
        if part.startswith("A"):
            tensors[f"{name}.lora_down.weight"] = arr
            r = config["rank_pattern"].get(module.rsplit(".", 1)[-1], config["r"])
            alpha = next((v for p, v in config["alpha_pattern"].items() if module.endswith(p)), config["lora_alpha"])
            assert r == arr.shape[0]
            tensors[f"{name}.alpha"] = np.array(alpha, np.float32)
        else:
            tensors[f"{name}.lora_up.weight"] = arr
    out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, tensors)
    return out


@pytest.mark.parametrize("style", ["double", "single", "dotted"])
def test_kohya_layout_matches_diffusers(built, style, tmp_path):
    kohya = _kohya(built.files["a"], CONFIG_A, tmp_path / f"kohya_{style}.safetensors", style)
    inputs = make_inputs(built.case, built.cfg, seed=4)
    ref = torch_forward(torch_with(built, {"a": built.files["a"]}), inputs, built.case)
    adapters = CogVideoXLoRAAdapters(built.jmodel.cfg)
    adapters.load(kohya, adapter_name="k", scale=1.0)
    err = rel_l2(jax_run(built, adapters.apply(base_state(built)), inputs), ref)
    print(f"{built.case.name} kohya ({style}): rel L2 = {err:.2e}")
    assert err <= MODEL_RTOL


def test_state_functions_and_mixin(built):
    """The state-level functions and the pipeline mixin give what the adapter set gives."""
    inputs = make_inputs(built.case, built.cfg, seed=5)
    cfg = built.jmodel.cfg
    a = load_cogvideox_lora(built.files["a"], cfg, "a")
    b = load_cogvideox_lora(built.files["b"], cfg, "b")
    base = base_state(built)
    merged = merge_into_state(base, [(a, 0.7), (b, -0.4)])
    fused, record = fuse_lora(base, [(a, 0.7), (b, -0.4)])
    for k, v in params(merged).items():
        np.testing.assert_array_equal(params(fused)[k], v, err_msg=k)
    restored = unfuse_lora(fused, record)
    for k, v in params(base).items():
        np.testing.assert_array_equal(params(restored)[k], v, err_msg=k)

    @dataclasses.dataclass
    class Component:
        module: object
        graphdef: object = None
        state: object = None

        def __post_init__(self):
            self.graphdef, self.state = nnx.split(self.module)

    class Pipe(CogVideoXLoraLoaderMixin):
        def __init__(self, model):
            self.transformer = Component(model)

    pipe = Pipe(built.jmodel)
    assert pipe.load_lora_weights(built.files["a"]) == "default_0"
    pipe.load_lora_weights(built.files["b"].parent, adapter_name="b")  # a folder works too
    pipe.set_adapters(["default_0", "b"], [0.7, -0.4])
    assert pipe.get_active_adapters() == ["default_0", "b"]
    assert pipe.get_list_adapters() == {"transformer": ["default_0", "b"]}
    run = pipe.lora_transformer_state()
    assert pipe.lora_transformer_state() is run  # cached
    want = jax_run(built, merged, inputs)
    assert rel_l2(jax_run(built, run, inputs), want) <= 1e-6
    pipe.disable_lora()
    assert pipe.lora_transformer_state() is pipe.transformer.state
    pipe.enable_lora()
    pipe.fuse_lora()
    assert rel_l2(jax_run(built, pipe.transformer.state, inputs), want) <= 1e-6
    assert pipe.lora_transformer_state() is pipe.transformer.state
    with pytest.raises(ValueError, match="unfuse"):
        pipe.set_adapters(["b"])
    pipe.unfuse_lora()
    for k, v in params(base).items():
        np.testing.assert_array_equal(params(pipe.transformer.state)[k], v, err_msg=k)
    pipe.fuse_lora(adapter_names=["b"])
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapters
    assert pipe.get_list_adapters() == {"transformer": []}
    only_b = merge_into_state(base, [(b, -0.4)])
    for k, v in params(only_b).items():
        np.testing.assert_array_equal(params(pipe.transformer.state)[k], v, err_msg=k)


def test_targets_cover_every_linear(built):
    """Every torch Linear (and the Conv2d patchifier) of the diffusers model is a LoRA target."""
    linear_like = {n for n, m in built.base.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert set(lora_targets(built.jmodel.cfg)) == linear_like


# ---- bad input --------------------------------------------------------------------------------


def _arrays(path: Path) -> dict[str, np.ndarray]:
    r = SafetensorsReader(path)
    return {k: r.read(k) for k in r.keys()}


def test_errors_name_the_problem(built, tmp_path):
    cfg = built.jmodel.cfg
    good = _arrays(built.files["b_nometa"])
    key = next(iter(good))
    with pytest.raises(ValueError, match="not a Linear of the model"):
        load_cogvideox_lora({**good, "transformer.blocks.0.nope.lora_A.weight": good[key]}, cfg)
    with pytest.raises(ValueError, match="not a LoRA tensor name"):
        load_cogvideox_lora({**good, "transformer.something.weight": good[key]}, cfg)
    bad_shape = dict(good)
    a_key = next(k for k in good if k.endswith("lora_A.weight"))
    bad_shape[a_key] = np.zeros((3, 7), np.float32)
    with pytest.raises(ValueError, match="do not fit"):
        merge_into_state(base_state(built), [(load_cogvideox_lora(bad_shape, cfg), 1.0)])
    with pytest.raises(ValueError, match="mix"):
        load_cogvideox_lora({**good, "lora_unet__proj_out.lora_down.weight": good[a_key]}, cfg)
    with pytest.raises(ValueError, match="DoRA"):
        load_cogvideox_lora({**good, "transformer.proj_out.lora_magnitude_vector": np.ones(4, np.float32)}, cfg)
    missing_up = {k: v for k, v in good.items() if not k.endswith("lora_B.weight")}
    with pytest.raises(ValueError, match="needs both"):
        load_cogvideox_lora(missing_up, cfg)
    with pytest.raises(ValueError, match="no transformer LoRA tensors"):
        load_cogvideox_lora({"text_encoder.x.lora_A.weight": good[a_key]}, cfg)
    with pytest.raises(FileNotFoundError):
        load_cogvideox_lora(tmp_path / "missing.safetensors", cfg)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 7, "transformer.lora_alpha": 7})}
    with pytest.raises(ValueError, match="rank 7"):
        load_cogvideox_lora(good, cfg, metadata=meta)

    adapters = CogVideoXLoRAAdapters(cfg)
    adapters.load(built.files["b"], adapter_name="b")
    with pytest.raises(ValueError, match="already loaded"):
        adapters.load(built.files["b"], adapter_name="b")
    with pytest.raises(ValueError, match=r"\['x'\] are not loaded"):
        adapters.set_adapters(["x"])
    with pytest.raises(ValueError, match="weights"):
        adapters.set_adapters(["b"], [1.0, 2.0])
    with pytest.raises(ValueError, match="scale"):
        adapters.load(built.files["a"], adapter_name="a", scale=float("nan"))
    state = adapters.fuse(base_state(built))
    with pytest.raises(ValueError, match="unfuse"):
        adapters.fuse(state)
    with pytest.raises(ValueError, match="fused"):
        adapters.delete("b")


def test_folder_weight_name_and_cached_model_id(built, tmp_path, monkeypatch):
    """A folder with weight_name, and a LoRA model id already in the local HF cache, read the same file."""
    from tests.test_hub import write_cached_repo

    cfg = built.jmodel.cfg
    want = load_cogvideox_lora(built.files["a"], cfg, "a")
    cache = tmp_path / "hub"
    write_cached_repo(cache, "someone/cogvideox-style-lora", {"my_lora.safetensors": built.files["a"]})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for got in (load_cogvideox_lora(built.files["a"].parent, cfg, "a", weight_name=WEIGHT),
                load_cogvideox_lora("someone/cogvideox-style-lora", cfg, "a"),
                load_cogvideox_lora("someone/cogvideox-style-lora", cfg, "a", weight_name="my_lora.safetensors")):
        assert [x.module for x in got.layers] == [x.module for x in want.layers]
        for x, y in zip(got.layers, want.layers):
            assert x.alpha_scale == y.alpha_scale
            np.testing.assert_array_equal(x.down, y.down)
            np.testing.assert_array_equal(x.up, y.up)
    with pytest.raises(ValueError, match="weight_name"):
        load_cogvideox_lora(built.files["a"], cfg, weight_name=WEIGHT)
