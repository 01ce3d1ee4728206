"""`jaxvid generate` with bad values: exit code 2, one error line naming the option, no traceback, no output.

Most cases run `jaxvid.cli.main.main(argv)` in-process (fast: every check happens before any weight
is loaded); a few run `python -m jaxvid generate ...` as a subprocess to see the real stderr.
"""
from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxvid.cli.main import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def longcat(tmp_path_factory):
    from jaxvid.synthetic.longcat import write_tiny_longcat

    return write_tiny_longcat(tmp_path_factory.mktemp("lc") / "ckpt", loras=False)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    from jaxvid import video

    path = tmp_path_factory.mktemp("v") / "stage1.gif"
    return video.save(np.zeros((5, 32, 32, 3), np.uint8), path, fps=15)


def _run_bad(argv, tmp_path, caplog, capsys) -> str:
    """Run `jaxvid generate argv --output tmp/out.mp4`; check the contract; return the one error line."""
    out = tmp_path / "out.mp4"
    if "--output" not in argv:
        argv = [*argv, "--output", str(out)]
    before = set(tmp_path.iterdir())
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = main(["generate", "--no-progress", *argv])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 2, (rc, [r.getMessage() for r in errors])
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "\n" not in message and errors[0].exc_info is None
    assert "Traceback" not in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == before and not out.exists()  # nothing written
    return message


# (argv, option the message must name); no --model: the embedded tiny CogVideoX (checks before loading)
COGVIDEOX_CASES = [
    (["--guidance", "inf"], "--guidance"),
    (["--guidance", "nan"], "--guidance"),
    (["--guidance=-inf"], "--guidance"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--fps", "0"], "--fps"),
    (["--max-sequence-length", "0"], "--max-sequence-length"),
    (["--num-frames", "10"], "--num-frames"),
    (["--num-frames", "0"], "--num-frames"),
    (["--height", "30"], "--height"),
    (["--width", "36"], "--width"),
    (["--height", "-32"], "--height"),
    (["--attention", "radial", "--dense-layers", "100"], "--dense-layers"),
    (["--attention", "radial", "--dense-layers", "-1"], "--dense-layers"),
    (["--attention", "radial", "--dense-timesteps", "-1"], "--dense-timesteps"),
    (["--attention", "radial", "--decay-factor", "nan"], "--decay-factor"),
    (["--attention", "radial", "--decay-factor", "0"], "--decay-factor"),
    (["--dense-layers", "2"], "--dense-layers"),  # a radial option without --attention radial
    # LongCat-Video options on a CogVideoX model
    (["--bsa-sparsity", "0.5"], "--bsa-sparsity"),
    (["--bsa-sparsity", "1.5"], "--bsa-sparsity"),
    (["--distill"], "--distill"),
    (["--refine"], "--refine"),
    (["--mode", "long"], "--mode"),
    (["--num-segments", "3"], "--num-segments"),
    (["--no-kv-cache", "--target-fps", "10"], "--no-kv-cache"),
]


@pytest.mark.parametrize("argv, option", COGVIDEOX_CASES, ids=[" ".join(a) for a, _ in COGVIDEOX_CASES])
def test_cogvideox_bad_values(argv, option, tmp_path, caplog, capsys):
    assert option in _run_bad(argv, tmp_path, caplog, capsys)


LONGCAT_CASES = [
    (["--mode", "refine", "--bsa-sparsity", "1.5"], "--bsa-sparsity"),
    (["--mode", "refine", "--bsa-sparsity", "1.0"], "--bsa-sparsity"),
    (["--mode", "refine", "--bsa-sparsity", "nan"], "--bsa-sparsity"),
    (["--mode", "t2v", "--guidance", "inf"], "--guidance"),
    (["--mode", "t2v", "--height", "40", "--width", "32"], "--height"),
    (["--mode", "t2v", "--height", "32"], "--height"),
    (["--mode", "t2v", "--num-frames", "10"], "--num-frames"),
    (["--mode", "long", "--num-cond-frames", "6"], "--num-cond-frames"),
    (["--mode", "long", "--num-segments", "0"], "--num-segments"),
    (["--mode", "long", "--target-fps", "0"], "--target-fps"),
    (["--mode", "refine", "--refine-height", "100", "--refine-width", "128"], "--refine-height"),
    (["--mode", "t2v", "--refine-steps", "0"], "--refine-steps"),
    # CogVideoX options on a LongCat-Video model
    (["--mode", "t2v", "--attention", "radial"], "--attention"),
    (["--mode", "t2v", "--dynamic-cfg"], "--dynamic-cfg"),
    (["--mode", "t2v", "--scheduler", "dpm"], "--scheduler"),
    (["--mode", "t2v", "--no-vae-tiling"], "--vae-tiling"),
]


@pytest.mark.parametrize("argv, option", LONGCAT_CASES, ids=[" ".join(a) for a, _ in LONGCAT_CASES])
def test_longcat_bad_values(argv, option, longcat, stage1, tmp_path, caplog, capsys):
    extra = ["--video", str(stage1)] if argv[1] == "refine" else ["--prompt", "a cat"]
    message = _run_bad(["--model", str(longcat), *argv, *extra], tmp_path, caplog, capsys)
    assert option in message


def test_bad_output_paths(tmp_path, caplog, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    (tmp_path / "folder.mp4").mkdir()
    cases = [
        (str(a_file / "out.mp4"), "is a file, not a folder"),  # a path under a file
        (str(tmp_path / "out.avi"), "unsupported video extension"),
        (str(tmp_path / "out"), "unsupported video extension"),
        (str(tmp_path / "folder.mp4"), "is a folder"),
    ]
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        cases.append((str(ro / "out.mp4"), "not writable"))
    for output, why in cases:
        t0 = time.perf_counter()
        message = _run_bad(["--output", output], tmp_path, caplog, capsys)
        assert time.perf_counter() - t0 < 1.0, output  # found up front, not after a run
        assert "--output" in message and why in message, message


def test_unknown_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--frames", "9"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --frames" in err[0]


def _subprocess(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxvid", "generate", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv, option", [
    (["--guidance", "inf"], "--guidance"),
    (["--distill"], "--distill"),
    (["--frames", "9"], "--frames"),
])
def test_subprocess_stderr_is_one_line(argv, option, tmp_path):
    """`python -m jaxvid generate` (the __main__) as a user runs it: exit 2, one error line on stderr."""
    out = tmp_path / "out.mp4"
    proc = _subprocess([*argv, "--output", str(out)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and option in errors[0], proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failed_final_write_keeps_the_frames(tmp_path, monkeypatch):
    """If the video cannot be written at the end, the frames are kept in a .npy and the message says where."""
    from jaxvid import video
    from jaxvid.cli import generate as gen

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video, "save", disk_full)
    frames = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    with pytest.raises(gen.OutputError, match="No space left on device") as e:
        gen._save(frames, tmp_path / "out.mp4", fps=8)
    kept = Path(str(e.value).rsplit("kept in ", 1)[1])
    assert kept.is_file() and kept.parent == tmp_path
    np.testing.assert_array_equal(np.load(kept), frames)
    assert not (tmp_path / "out.mp4").exists()
