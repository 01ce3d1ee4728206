"""Bad inputs to `jaxvid-convert`: exit 2, one line on stderr naming the option or path, no traceback,
no output, and the source folder byte-identical afterwards (issue 16's matrix, convert half).

Every case runs in-process through `main(argv)`; a few also run as the real console command in a
subprocess, where logging goes to stderr as a user sees it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert.safetensors_io import SafetensorsReader, write_safetensors
from jaxvid.cli import convert as convert_cli
from tests.convert_helpers import copy_component, leftovers, tree_hash

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _pipeline(root: Path, fixtures_dir: Path) -> Path:
    src = root / "src"
    copy_component(fixtures_dir, src / "transformer")
    (src / "scheduler").mkdir()
    (src / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "CogVideoXDDIMScheduler"}')
    (src / "model_index.json").write_text(json.dumps({
        "_class_name": "CogVideoXPipeline", "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"]}))
    return src


def _edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def _shard_outside(src: Path) -> None:
    comp = src / "transformer"
    keys = SafetensorsReader(comp / WEIGHTS).keys()
    shutil.move(comp / WEIGHTS, src.parent / "y.safetensors")
    (comp / f"{WEIGHTS}.index.json").write_text(json.dumps({"weight_map": {k: "../../y.safetensors" for k in keys}}))


def _int8_tensor(src: Path) -> None:
    comp = src / "transformer"
    reader = SafetensorsReader(comp / WEIGHTS)
    tensors = {k: np.array(reader.read(k)) for k in reader.keys()}
    tensors["proj_out.bias"] = tensors["proj_out.bias"].astype(np.int8)
    write_safetensors(comp / WEIGHTS, tensors)


def _symlink_out(src: Path) -> None:
    comp = src / "transformer"
    shutil.move(comp / WEIGHTS, src.parent / "outside.safetensors")
    (comp / WEIGHTS).symlink_to(src.parent / "outside.safetensors")


# (id, argv as a function of (src, dst, root), prepare(src, root), text the line must contain)
CASES = [
    ("src-missing", lambda s, d, r: [str(r / "nope"), str(d)], None, "SRC="),
    ("src-is-a-file", lambda s, d, r: [str(s / "model_index.json"), str(d)], None, "model_index.json"),
    ("src-without-config", lambda s, d, r: [str(s / "scheduler"), str(d)], None, "scheduler"),
    ("dst-exists", lambda s, d, r: [str(s), str(r)], None, "DST="),
    ("dst-equals-src", lambda s, d, r: [str(s), str(s), "--overwrite"], None, "DST="),
    ("dst-parent-of-src", lambda s, d, r: [str(s / "transformer"), str(s), "--overwrite"], None, "DST="),
    ("dst-inside-src", lambda s, d, r: [str(s), str(s / "out")], None, "DST="),
    ("dst-under-a-file", lambda s, d, r: [str(s), str(s / "model_index.json" / "out")], None, "DST="),
    ("dtype-unknown", lambda s, d, r: [str(s), str(d), "--dtype", "int4"], None, "--dtype"),
    ("option-unknown", lambda s, d, r: [str(s), str(d), "--fast"], None, "--fast"),
    ("dst-missing", lambda s, d, r: [str(s)], None, "DST"),
    ("verify-with-src", lambda s, d, r: [str(s), str(d), "--verify", str(s)], None, "--verify"),
    ("verify-not-a-checkpoint", lambda s, d, r: ["--verify", str(s)], None, "--verify"),
    ("model-index-not-json", lambda s, d, r: [str(s), str(d)],
     lambda s, r: (s / "model_index.json").write_text("{oops"), "model_index.json"),
    ("model-index-escaping-key", lambda s, d, r: [str(s), str(d)],
     lambda s, r: _edit_json(s / "model_index.json", lambda j: j.update({"../../x": ["diffusers", "X"]})), "'../../x'"),
    ("model-index-lists-missing-folder", lambda s, d, r: [str(s), str(d)],
     lambda s, r: _edit_json(s / "model_index.json", lambda j: j.update({"vae": ["diffusers", "AutoencoderKLCogVideoX"]})),
     "vae"),
    ("config-not-json", lambda s, d, r: [str(s), str(d)],
     lambda s, r: (s / "transformer" / "config.json").write_text('{"_class_name": '), "config.json"),
    ("config-wrong-type", lambda s, d, r: [str(s), str(d)],
     lambda s, r: _edit_json(s / "transformer" / "config.json", lambda j: j.update({"num_layers": "two"})), "config.json"),
    ("config-unknown-class", lambda s, d, r: [str(s), str(d)],
     lambda s, r: _edit_json(s / "transformer" / "config.json", lambda j: j.update({"_class_name": "Nope"})), "'Nope'"),
    ("shard-name-escaping", lambda s, d, r: [str(s), str(d)], lambda s, r: _shard_outside(s), "y.safetensors"),
    ("symlink-outside", lambda s, d, r: [str(s), str(d)], lambda s, r: _symlink_out(s), WEIGHTS),
    ("int8-tensor", lambda s, d, r: [str(s), str(d)], lambda s, r: _int8_tensor(s), "proj_out.bias"),
]


@pytest.fixture()
def case_root(tmp_path, fixtures_dir):
    root = tmp_path / "case"
    root.mkdir()
    return root, _pipeline(root, fixtures_dir)


def _check(code: int, err: str, expect: str, root: Path, before: str, dst: Path) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1, lines
    assert "Traceback" not in err and expect in lines[0], lines[0]
    assert tree_hash(root) == before, "the source folder changed"
    assert not dst.exists() and not leftovers(dst.parent, dst.name)


@pytest.mark.parametrize("case_id, argv, prepare, expect", CASES, ids=[c[0] for c in CASES])
def test_convert_bad_input(case_root, capsys, case_id, argv, prepare, expect):
    root, src = case_root
    if prepare:
        prepare(src, root)
    dst = root.parent / "out"
    before = tree_hash(root)
    try:
        code = convert_cli.main(argv(src, dst, root))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    _check(code, capsys.readouterr().err, expect, root, before, dst)


@pytest.mark.parametrize("case_id", ["dst-equals-src", "config-not-json", "dtype-unknown"])
def test_convert_bad_input_console(case_root, case_id):
    """The same as a user runs it: a subprocess, logging to stderr at its default level."""
    _, argv, prepare, expect = next(c for c in CASES if c[0] == case_id)
    root, src = case_root
    if prepare:
        prepare(src, root)
    dst = root.parent / "out"
    before = tree_hash(root)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "jaxvid.cli.convert", *argv(src, dst, root)], capture_output=True,
                            text=True, env=env, timeout=300)
    _check(result.returncode, result.stderr, expect, root, before, dst)
