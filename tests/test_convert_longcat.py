"""jaxvid-convert on a whole LongCat-Video checkpoint folder (dit/, text_encoder/, vae/, tokenizer/, scheduler/, lora/).

The source is built the way the release is: the upstream-layout DiT fixture as dit/, a transformers
UMT5EncoderModel and a diffusers AutoencoderKLWan written with save_pretrained, weight-free
tokenizer/ and scheduler/ folders, and LoRA files without a config in lora/. Every converted model
must load to exactly the parameters (and outputs) of the original folder; everything else must be
copied byte for byte; a bad component must fail the whole run before anything is written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import pipeline as convert_pipeline
from convert.apply import ConversionError
from convert.checkpoint import CheckpointReader, is_checkpoint
from convert.safetensors_io import SafetensorsError, SafetensorsReader, write_safetensors
from jaxvid.cli import convert as convert_cli
from jaxvid.models import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA_FILES = {"cfg_step_lora.safetensors": "lora_a.safetensors", "refinement_lora.safetensors": "lora_b.safetensors"}
MODEL_DIRS = ("dit", "text_encoder", "vae")
COPIED_DIRS = ("tokenizer", "scheduler", "lora")
UMT5 = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=20, feed_forward_proj="gated-gelu", dropout_rate=0.0)
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1",
             "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


def _write_longcat_folder(root: Path, fixtures_dir: Path) -> Path:
    """A tiny LongCat-Video release folder; model widths fit together (text 32, latent channels 4)."""
    from diffusers import AutoencoderKLWan as TorchWan
    from transformers import UMT5Config, UMT5EncoderModel

    shutil.copytree(fixtures_dir / "longcat" / "dit_dense" / "transformer", root / "dit")
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(**UMT5)).eval().save_pretrained(root / "text_encoder")
    TorchWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
             latents_mean=[0.0, 0.1, -0.1, 0.2], latents_std=[1.0, 1.5, 2.0, 0.5]).eval().save_pretrained(root / "vae")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "spiece.model").write_bytes(bytes(range(256)) * 4)
    (root / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    (root / "tokenizer" / "special_tokens_map.json").write_text('{"eos_token": "</s>"}')
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (root / "lora").mkdir()
    for name, data in LORA_FILES.items():
        shutil.copy(REPO_ROOT / "tests" / "data" / "longcat_extra" / data, root / "lora" / name)
    (root / "README.md").write_text("# tiny LongCat-Video\n")
    (root / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    return root


@pytest.fixture(scope="module")
def source(fixtures_dir, tmp_path_factory) -> Path:
    return _write_longcat_folder(tmp_path_factory.mktemp("longcat") / "LongCat-Video", fixtures_dir)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("converted") / "LongCat-Video-jaxvid"
    assert convert_cli.main([str(source), str(dst), "--quiet"]) == 0
    return dst


@pytest.fixture()
def writable_source(source, tmp_path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "src"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_nothing_left(dst: Path) -> None:
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")], "staging folder left behind"


def _params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _forward(name: str, *models: nnx.Module) -> list[np.ndarray]:
    """A small input through each model, by one jitted function (the models share one graph: one compile)."""
    graphdef = nnx.graphdef(models[0])
    rng = np.random.default_rng(3)
    if name == "dit":
        args = (rng.standard_normal((1, 4, 2, 8, 8)), np.array([400.0]), rng.standard_normal((1, 1, 5, 32)),
                np.array([[1, 1, 1, 0, 0]]))
        call = lambda m, x, t, y, mask: m(x, t, y, mask)  # noqa: E731
    elif name == "text_encoder":
        args = (rng.integers(0, UMT5["vocab_size"], (2, 7)), np.array([[1] * 7, [1] * 4 + [0] * 3]))
        call = lambda m, ids, mask: m(ids, mask)  # noqa: E731
    else:
        args = (rng.standard_normal((1, 4, 1, 4, 4)),)
        call = lambda m, z: m.decode(z)  # noqa: E731
    args = tuple(jnp.asarray(a, jnp.float32 if a.dtype.kind == "f" else jnp.int32) for a in args)
    fwd = jax.jit(lambda s, *a: call(nnx.merge(graphdef, s), *a))
    return [np.asarray(fwd(nnx.state(m), *args), np.float32) for m in models]


# ---------------------------------------------------------------------------------------------
# good input
# ---------------------------------------------------------------------------------------------


def test_detected_as_component_set(source):
    assert convert_cli.is_component_set(source)
    assert not convert_cli.is_component_set(source / "dit")  # a component folder itself
    assert not convert_cli.is_component_set(source / "tokenizer")


def test_layout_and_copies(source, converted):
    assert sorted(p.name for p in converted.iterdir()) == sorted([*MODEL_DIRS, *COPIED_DIRS, "README.md"])
    for name in MODEL_DIRS:
        assert is_checkpoint(converted / name), name
    assert CheckpointReader(converted / "dit").class_name == "LongCatVideoTransformer3DModel"
    assert CheckpointReader(converted / "text_encoder").class_name == "UMT5EncoderModel"
    assert CheckpointReader(converted / "vae").class_name == "AutoencoderKLWan"
    for name in COPIED_DIRS:
        assert _files(converted / name) == _files(source / name), name
    assert sorted(_files(converted / "lora")) == sorted(LORA_FILES)
    assert (converted / "README.md").read_bytes() == (source / "README.md").read_bytes()
    assert not list(converted.parent.glob(".*convert-*")), "staging folder left behind"


@pytest.mark.parametrize("name", MODEL_DIRS)
def test_converted_component_identical(source, converted, name):
    original, ours = load_model(source / name), load_model(converted / name)
    assert type(ours) is type(original)
    a, b = _params(original), _params(ours)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == np.float32, key
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    assert nnx.graphdef(ours) == nnx.graphdef(original)
    out, ref = _forward(name, ours, original)
    assert np.isfinite(out).all() and np.abs(out).max() > 0
    np.testing.assert_array_equal(out, ref)


def test_pipeline_reads_converted_folder(converted):
    """jaxvid's LongCat pipeline loads the converted folder (same subfolder names) and its LoRAs."""
    longcat = pytest.importorskip("jaxvid.pipelines.longcat")
    assert longcat.is_longcat_folder(converted)
    pipe = longcat.LongCatPipeline.from_pretrained(converted, progress=False)
    pipe.load_lora("cfg_step_lora")
    pipe.load_lora("refinement_lora")
    assert sorted(pipe.loras.names) == ["cfg_step_lora", "refinement_lora"]


def test_bf16_every_component(source, tmp_path):
    dst = tmp_path / "bf16"
    convert_cli.convert_path(source, dst, dtype="bf16", show_progress=False)
    for name in MODEL_DIRS:
        reader = CheckpointReader(dst / name)
        assert {str(reader.dtype(k)) for k in reader.keys()} == {"bfloat16"}, name
    assert _files(dst / "lora") == _files(source / "lora")


# ---------------------------------------------------------------------------------------------
# bad input: the run fails before writing anything and leaves nothing
# ---------------------------------------------------------------------------------------------


def _rewrite(folder: Path, file: str, edit) -> None:
    reader = SafetensorsReader(folder / file)
    tensors = {k: np.array(reader.read(k)) for k in reader.keys()}
    edit(tensors)
    write_safetensors(folder / file, tensors)


def test_mismatched_component_weights(writable_source, tmp_path, monkeypatch):
    key = "decoder.conv_out.bias"
    _rewrite(writable_source / "vae", "diffusion_pytorch_model.safetensors", lambda t: t.__setitem__(key, t[key][:2]))
    written = []
    real = convert_pipeline.write_component
    monkeypatch.setattr(convert_pipeline, "write_component", lambda plan, dst, **kw: written.append(dst.name) or real(plan, dst, **kw))
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"(?s)vae.*shape mismatches.*decoder\.conv_out\.bias"):
        convert_cli.convert_path(writable_source, dst, show_progress=False)
    assert written == [], "components were written before every component was checked"
    _assert_nothing_left(dst)


def test_missing_component_weight_via_cli(writable_source, tmp_path, capsys):
    _rewrite(writable_source / "text_encoder", "model.safetensors", lambda t: t.pop("encoder.final_layer_norm.weight"))
    dst = tmp_path / "out"
    assert convert_cli.main([str(writable_source), str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "text_encoder" in err and "encoder.final_layer_norm.weight" in err
    _assert_nothing_left(dst)


def test_truncated_lora(writable_source, tmp_path):
    file = writable_source / "lora" / "cfg_step_lora.safetensors"
    file.write_bytes(file.read_bytes()[:-50])
    dst = tmp_path / "out"
    with pytest.raises(SafetensorsError, match=r"cfg_step_lora\.safetensors.*truncated"):
        convert_cli.convert_path(writable_source, dst, show_progress=False)
    _assert_nothing_left(dst)


def test_folder_without_supported_components(tmp_path):
    src = tmp_path / "src"
    (src / "tokenizer").mkdir(parents=True)
    (src / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (src / "image_encoder").mkdir()
    (src / "image_encoder" / "config.json").write_text('{"_class_name": "SomeImageEncoder"}')
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match=r"neither model_index\.json nor config\.json nor a subfolder"):
        convert_cli.convert_path(src, dst)
    _assert_nothing_left(dst)
