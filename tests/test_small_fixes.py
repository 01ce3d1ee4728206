"""Issue 16 items 12 and 14, issue 17's small things: clear one-line config errors, one set of dtype
spellings, `python -m jaxvid`, the package's assets read from a plain folder on sys.path."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

import jaxvid
from jaxvid.cli.main import main
from jaxvid.synthetic.cogvideox import tiny_spiece_model, write_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16", jnp.bfloat16, "fp32", "float32", jnp.float32])
def test_load_transformer_takes_the_pipeline_dtype_spellings(tiny, dtype):
    model = jaxvid.load_transformer(tiny, dtype=dtype)
    want = jnp.bfloat16 if dtype in ("bf16", "bfloat16", jnp.bfloat16) else jnp.float32
    assert jnp.dtype(model.cfg.dtype) == jnp.dtype(want) == jnp.dtype(model.cfg.param_dtype)
    leaf = model.patch_embed.proj.kernel[...]
    assert leaf.dtype == jnp.dtype(want)


@pytest.mark.parametrize("dtype", ["bf17", "int8", 3])
def test_bad_dtype_is_a_clear_error(tiny, dtype):
    with pytest.raises(ValueError, match="dtype="):
        jaxvid.load_transformer(tiny, dtype=dtype)


def _copy(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny, dst)
    return dst


@pytest.mark.parametrize("text, why", [
    ('{"_class_name": "CogVideoXTransformer3DModel", ', "not valid JSON (line 1"),
    ("[1, 2, 3]", "expected a JSON object"),
    ("\xff\xfe garbage", "not valid JSON"),
])
def test_malformed_config_json_is_one_line(tiny, tmp_path, text, why, caplog):
    folder = _copy(tiny, tmp_path / "pipe")
    cfg = folder / "transformer" / "config.json"
    cfg.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError) as e:
        jaxvid.load_transformer(folder / "transformer")
    assert str(cfg) in str(e.value) and why in str(e.value) and "\n" not in str(e.value)
    # the CLI: exit 2, one error line naming the file (before any weight is loaded)
    with caplog.at_level(logging.ERROR):
        assert main(["generate", "--model", str(folder), "--prompt", "x", "--output", str(tmp_path / "o.mp4")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(cfg) in errors[0] and why in errors[0]


@pytest.mark.parametrize("key, value", [("num_layers", "two"), ("patch_size", [2, 2]), ("num_attention_heads", None)])
def test_config_value_of_the_wrong_type_names_the_file(tiny, tmp_path, key, value, caplog):
    folder = _copy(tiny, tmp_path / "pipe")
    cfg = folder / "transformer" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), key: value}))
    with pytest.raises(ValueError) as e:
        jaxvid.load_transformer(folder / "transformer")
    assert str(cfg) in str(e.value) and "\n" not in str(e.value)
    with caplog.at_level(logging.ERROR):
        assert main(["generate", "--model", str(folder), "--prompt", "x", "--output", str(tmp_path / "o.mp4")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(cfg) in errors[0]


def test_malformed_scheduler_config_names_the_file(tiny, tmp_path):
    from jaxvid.pipelines.cogvideox import CogVideoXPipeline

    folder = _copy(tiny, tmp_path / "pipe")
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text('{"beta_start": ')
    with pytest.raises(ValueError, match="scheduler_config.json: not valid JSON"):
        CogVideoXPipeline.from_pretrained(folder)


def test_python_dash_m_jaxvid_runs_the_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "jaxvid", "generate", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CogVideoX options" in proc.stdout and "LongCat-Video options" in proc.stdout


def test_help_states_each_default_once_and_every_option_has_help():
    import argparse

    from jaxvid.cli.generate import add_generate_parser

    parser = argparse.ArgumentParser(prog="jaxvid")
    generate = add_generate_parser(parser.add_subparsers(dest="command"))
    for action in generate._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
            assert action.help.count("default") <= 1, f"{action.option_strings}: {action.help!r}"
    text = " ".join(generate.format_help().split())
    assert "(default: None)" not in text


def test_assets_read_from_a_plain_folder_on_sys_path(tmp_path):
    """The package copied to a plain folder (not installed) finds its shipped tokenizer model."""
    shutil.copytree(REPO / "jaxvid", tmp_path / "jaxvid", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import jaxvid.synthetic.cogvideox as c; "
            "assert c.__file__.startswith(sys.argv[1]), c.__file__; print(len(c.tiny_spiece_model()))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)  # convert/ and pallas_kernels/ from the repo; jaxvid from the copy
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == len(tiny_spiece_model()) > 0
    # and from a zip on sys.path (a zipfile.Path, where joinpath takes one name on Python 3.11)
    archive = shutil.make_archive(str(tmp_path / "pkg"), "zip", tmp_path, "jaxvid")
    code_zip = ("import sys; sys.path.insert(0, sys.argv[1]); from importlib import resources; "
                "print(len((resources.files('jaxvid') / 'assets' / 'tiny_spiece.model').read_bytes()))")
    proc = subprocess.run([sys.executable, "-c", code_zip, archive], env={**env, "PYTHONPATH": ""},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) == len(tiny_spiece_model())
