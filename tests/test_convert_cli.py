"""jaxvid-convert: component and pipeline folders, dtypes, sharded sources, and every bad input.

Bad input must fail with a clear error naming the problem and leave no output folder behind.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from convert import pipeline as convert_pipeline
from convert.apply import ConversionError
from convert.checkpoint import CheckpointReader, is_checkpoint
from convert.safetensors_io import SafetensorsError, SafetensorsReader, write_safetensors
from jaxvid.cli import convert as convert_cli
from jaxvid.models import load_transformer
from jaxvid.models.cogvideox import CogVideoXConfig
from jaxvid.synthetic.cogvideox import write_random_cogvideox

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture()
def component(fixtures_dir, tmp_path) -> Path:
    """A writable copy of the tiny 5b-like fixture's transformer folder."""
    dst = tmp_path / "src"
    shutil.copytree(fixtures_dir / "cogvideox" / "tiny_5b_rope" / "transformer", dst)
    return dst


def _rewrite(folder: Path, edit) -> None:
    reader = SafetensorsReader(folder / WEIGHTS)
    tensors = {k: np.array(reader.read(k)) for k in reader.keys()}
    edit(tensors)
    write_safetensors(folder / WEIGHTS, tensors)


def _assert_nothing_left(dst: Path) -> None:
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")], "staging folder left behind"


def _converted_output(model, seed=0):
    from flax import nnx

    cfg = model.cfg
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((1, 3, cfg.in_channels, 8, 12)), jnp.float32)
    e = jnp.asarray(rng.standard_normal((1, 5, cfg.text_embed_dim)), jnp.float32)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
    return np.asarray(fwd(state, h, e, jnp.array([500])), np.float32)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_missing_key(component, tmp_path):
    _rewrite(component, lambda t: t.pop("proj_out.bias"))
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"(?s)lacks.*proj_out\.bias"):
        convert_cli.convert_path(component, dst)
    _assert_nothing_left(dst)


def test_unexpected_key(component, tmp_path):
    _rewrite(component, lambda t: t.__setitem__("transformer_blocks.0.attn1.extra.weight", np.zeros(3, np.float32)))
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"(?s)unexpected.*transformer_blocks\.0\.attn1\.extra\.weight"):
        convert_cli.convert_path(component, dst)
    _assert_nothing_left(dst)


def test_shape_mismatch(component, tmp_path):
    _rewrite(component, lambda t: t.__setitem__("proj_out.weight", np.zeros((16, 31), np.float32)))
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"(?s)shape mismatches.*proj_out\.weight \(16, 31\)"):
        convert_cli.convert_path(component, dst)
    _assert_nothing_left(dst)


def test_every_difference_listed_at_once(component, tmp_path):
    def edit(t):
        t.pop("norm_final.weight")
        t["bogus"] = np.zeros(1, np.float32)
        t["proj_out.bias"] = np.zeros(3, np.float32)

    _rewrite(component, edit)
    with pytest.raises(ConversionError) as info:
        convert_cli.convert_path(component, tmp_path / "out")
    msg = str(info.value)
    assert "norm_final.weight" in msg and "bogus" in msg and "proj_out.bias" in msg


def test_truncated_safetensors(component, tmp_path):
    file = component / WEIGHTS
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    dst = tmp_path / "out"
    with pytest.raises(SafetensorsError, match="truncated"):
        convert_cli.convert_path(component, dst)
    _assert_nothing_left(dst)


def test_unknown_class_name(component, tmp_path):
    cfg = json.loads((component / "config.json").read_text())
    (component / "config.json").write_text(json.dumps({**cfg, "_class_name": "FluxTransformer2DModel"}))
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unknown model class 'FluxTransformer2DModel'"):
        convert_cli.convert_path(component, dst)
    _assert_nothing_left(dst)


def test_unknown_config_key(component, tmp_path, caplog):
    """Unknown keys are ignored with a warning naming them (as diffusers does); wrong types fail."""
    cfg = json.loads((component / "config.json").read_text())
    (component / "config.json").write_text(json.dumps({**cfg, "use_magic": True}))
    convert_cli.convert_path(component, tmp_path / "out")
    assert "use_magic" in caplog.text
    (component / "config.json").write_text(json.dumps({**cfg, "num_layers": "2"}))
    with pytest.raises(ValueError, match="num_layers"):
        convert_cli.convert_path(component, tmp_path / "out2")


def test_error_mid_write_leaves_nothing(component, tmp_path, monkeypatch):
    real = convert_pipeline.iter_converted

    def failing(*args, **kwargs):
        for n, item in enumerate(real(*args, **kwargs)):
            if n == 10:
                raise OSError("disk full (simulated)")
            yield item

    monkeypatch.setattr(convert_pipeline, "iter_converted", failing)
    dst = tmp_path / "nested" / "out"
    assert convert_cli.main([str(component), str(dst), "--quiet"]) == 1
    assert not dst.exists() and not dst.parent.exists()


def test_existing_output_needs_overwrite(component, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert convert_cli.main([str(component), str(dst), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    assert convert_cli.main([str(component), str(dst), "--overwrite", "--quiet"]) == 0
    assert is_checkpoint(dst) and not (dst / "keep.txt").exists()


def test_failed_overwrite_keeps_previous_output(component, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    real_rename = convert_pipeline.os.rename

    def rename(a, b):
        # the new output's move into place fails (e.g. a full or read-only disk); moving the old one back works
        if Path(b) == dst.absolute() and Path(a).name == "out":
            raise OSError("rename failed (simulated)")
        return real_rename(a, b)

    monkeypatch.setattr(convert_pipeline.os, "rename", rename)
    assert convert_cli.main([str(component), str(dst), "--overwrite", "--quiet"]) == 1
    assert (dst / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "staging folder left behind"


def test_checkpoint_writer_without_commit_leaves_nothing(tmp_path):
    from convert.checkpoint import CheckpointWriter

    dst = tmp_path / "ckpt"
    with CheckpointWriter(dst, class_name="X", config={}) as writer:
        writer.add("a", np.zeros((2,), np.float32))
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_malformed_safetensors_header(tmp_path):
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode()  # no data_offsets
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(SafetensorsError, match="'w' has a malformed header entry"):
        SafetensorsReader(tmp_path / "bad.safetensors")
    (tmp_path / "bad.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(SafetensorsError, match="weight_map"):
        SafetensorsReader(tmp_path)


def test_frame_count_incompatible_with_patch_size_t(fixtures_dir):
    model = load_transformer(fixtures_dir / "cogvideox" / "tiny_15_i2v_pt2" / "transformer")
    h = jnp.zeros((1, 3, 8, 8, 8))
    e = jnp.zeros((1, 4, 16))
    with pytest.raises(ValueError, match=r"3 latent frames; expected a multiple of patch_size_t=2"):
        model(h, e, jnp.array([1]), jnp.array([2.0]))


def test_bad_call_arguments(fixtures_dir):
    model = load_transformer(fixtures_dir / "cogvideox" / "tiny_2b_sincos" / "transformer")
    with pytest.raises(ValueError, match="hidden_states shape"):
        model(jnp.zeros((1, 3, 5, 8, 8)), jnp.zeros((1, 4, 16)), jnp.array([1]))
    with pytest.raises(ValueError, match="max_text_seq_length=4"):  # sincos table fixes the text length
        model(jnp.zeros((1, 3, 4, 8, 8)), jnp.zeros((1, 5, 16)), jnp.array([1]))
    with pytest.raises(ValueError, match="patch_size=2"):
        model(jnp.zeros((1, 3, 4, 7, 8)), jnp.zeros((1, 4, 16)), jnp.array([1]))


def test_bad_config_values():
    with pytest.raises(ValueError, match="ofs_embed_dim"):
        CogVideoXConfig.tiny(ofs_embed_dim=3)
    with pytest.raises(ValueError, match="activation_fn"):
        CogVideoXConfig.tiny(activation_fn="geglu")
    with pytest.raises(ValueError, match="use_learned_positional_embeddings"):
        CogVideoXConfig.tiny(use_rotary_positional_embeddings=False, use_learned_positional_embeddings=True)


# ---------------------------------------------------------------------------------------------
# good input
# ---------------------------------------------------------------------------------------------


def test_pipeline_folder(component, tmp_path):
    src = tmp_path / "pipe"
    shutil.copytree(component, src / "transformer")
    (src / "tokenizer").mkdir()
    (src / "tokenizer" / "spiece.model").write_bytes(b"\x00sentencepiece-bytes")
    (src / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 226}')
    (src / "scheduler").mkdir()
    (src / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "CogVideoXDDIMScheduler"}')
    (src / "image_encoder").mkdir()  # a weighted component jaxvid does not support: skipped
    (src / "image_encoder" / "config.json").write_text('{"architectures": ["CLIPVisionModelWithProjection"]}')
    write_safetensors(src / "image_encoder" / "model.safetensors", {"w": np.zeros(2, np.float32)})
    index = {
        "_class_name": "CogVideoXPipeline",
        "tokenizer": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "feature_extractor": [None, None],
    }
    (src / "model_index.json").write_text(json.dumps(index))
    dst = tmp_path / "out"
    assert convert_cli.main([str(src), str(dst), "--quiet"]) == 0
    assert json.loads((dst / "model_index.json").read_text()) == index
    assert is_checkpoint(dst / "transformer")
    for f in ("tokenizer/spiece.model", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    assert not (dst / "image_encoder").exists()
    # load_transformer accepts the pipeline folder and finds transformer/
    np.testing.assert_array_equal(_converted_output(load_transformer(dst)), _converted_output(load_transformer(component)))


def test_bf16_output(component, tmp_path):
    dst = tmp_path / "out"
    assert convert_cli.main([str(component), str(dst), "--dtype", "bf16", "--quiet"]) == 0
    reader = CheckpointReader(dst)
    assert {str(reader.dtype(k)) for k in reader.keys()} == {"bfloat16"}
    model = load_transformer(dst)  # dtype None keeps the stored bf16
    assert model.proj_out.kernel.get_value().dtype == jnp.bfloat16
    out = _converted_output(model)
    ref = _converted_output(load_transformer(component))
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 5e-2
    assert load_transformer(dst, dtype=jnp.float32).proj_out.kernel.get_value().dtype == jnp.float32


def test_sharded_bf16_source(tmp_path):
    cfg = CogVideoXConfig.tiny()
    src = write_random_cogvideox(tmp_path / "src", cfg, seed=1, dtype=ml_dtypes.bfloat16, max_shard_bytes=20_000)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 1 and (src / f"{WEIGHTS}.index.json").is_file()
    dst = tmp_path / "out"
    assert convert_cli.main([str(src), str(dst), "--quiet"]) == 0  # default dtype: as the source (bf16)
    assert json.loads((dst / "jaxvid.json").read_text())["extra"]["dtype"] == "bfloat16"
    a, b = load_transformer(src, dtype=jnp.float32), load_transformer(dst, dtype=jnp.float32)
    np.testing.assert_array_equal(_converted_output(a), _converted_output(b))


def test_demo_runs_without_torch(tmp_path):
    """`jaxvid demo` as on a fresh install: torch and diffusers unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; sys.modules['transformers'] = None\n"
        "from jaxvid.cli import main\n"
        f"sys.exit(main(['demo', '--out', {str(tmp_path / 'demo')!r}]))\n"
    )
    # (inherits conftest's unoptimised-compile XLA_FLAGS; the demo's exact check, max |diff| = 0, still holds)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo finished" in proc.stderr and "max |diff| = 0" in proc.stderr
    assert is_checkpoint(tmp_path / "demo" / "jaxvid" / "transformer")
