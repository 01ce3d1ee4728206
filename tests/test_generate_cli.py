"""`jaxvid generate`: the embedded tiny default end to end, option handling and clear errors."""
from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest

from jaxvid import video
from jaxvid.attention.plan import AttentionPlan, Radial
from jaxvid.cli.generate import add_generate_parser, attention_plan
from jaxvid.synthetic.cogvideox import write_tiny_pipeline


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxvid")
    add_generate_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["generate", *argv])


def run(argv: list[str]) -> int:
    args = parse(argv)
    return args.func(args)


def test_tiny_default_writes_a_video(tmp_path, caplog):
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO):
        assert run(["--output", str(out), "--no-progress"]) == 0
    frames = video.load(out)
    from jaxvid.synthetic.default_model import default_model_folder, generation_settings

    if (default_model_folder() / "model_index.json").is_file():  # the trained default model, at its settings
        g = generation_settings(default_model_folder())
        assert frames.shape == (g["num_frames"], g["height"], g["width"], 3)
        assert any("embedded default model" in r.getMessage() for r in caplog.records)
    else:  # the random tiny fallback
        assert frames.shape == (9, 32, 32, 3)
        assert any("tiny random" in r.getMessage() for r in caplog.records)
    assert frames.dtype == np.uint8
    summary = [r.getMessage() for r in caplog.records if r.name == "jaxvid.cli.generate" and "wrote" in r.getMessage()]
    assert summary and "compile" in summary[0] and "s/step" in summary[0] and "total" in summary[0]


@pytest.fixture(scope="module")
def i2v_model(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("i2v") / "pipe", variant="i2v-1.5")


@pytest.mark.parametrize("argv, message", [
    (["--num-frames", "10"], "--num-frames=10; expected 1 + 4k frames"),
    (["--height", "30"], "--height=30; expected a multiple of 8"),
    (["--width", "36"], "--width=36; expected a multiple of 8"),
    (["--height", "64", "--width", "64"], "RoPE grid covers at most 32x32"),
    (["--steps", "0"], "--steps=0"),
    (["--attention", "radial", "--decay-factor", "0"], "--decay-factor=0"),
    ([], "image-to-video model: pass the first frame with --image"),
    (["--image", "/nonexistent.png"], "--image='/nonexistent.png'"),
    (["--output", "out.avi"], "--output='out.avi': unsupported video extension '.avi'"),
    (["--fps", "0"], "--fps=0; expected a positive int"),
])
def test_bad_requests_fail_before_loading(i2v_model, argv, message, caplog):
    with caplog.at_level(logging.ERROR):
        assert run(["--model", str(i2v_model), "--prompt", "x", *argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(message in e for e in errors), errors


def test_missing_prompt_and_model_folder(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert run(["--model", str(tmp_path)]) == 2
        assert run(["--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
        assert run(["--model", str(tmp_path), "--prompt", "x"]) == 2
    errors = "\n".join(r.getMessage() for r in caplog.records)
    assert "--prompt is required" in errors and "no such folder" in errors and "model_index.json" in errors


def test_unknown_option_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--frames", "9"])
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_attention_options_build_the_plan():
    assert attention_plan(parse([])) is None
    plan = attention_plan(parse(["--attention", "radial", "--dense-layers", "2", "--dense-timesteps", "5",
                                 "--decay-factor", "0.5", "--block-size", "64"]))
    assert plan == AttentionPlan(sparse=Radial(decay_factor=0.5, block_size=64, model_type="cogvideox"),
                                 dense_layers=2, dense_timesteps=5)


def test_generate_routes_longcat_folders_and_rejects_modes_for_cogvideox(tmp_path, caplog):
    """`jaxvid generate` hands a LongCat-Video folder to the LongCat CLI; CogVideoX accepts only t2v."""
    from jaxvid.cli import main
    from jaxvid.synthetic.longcat import write_tiny_longcat

    longcat = write_tiny_longcat(tmp_path / "longcat")
    with caplog.at_level(logging.ERROR):
        # continuation without a video is rejected by the LongCat checks, before any weight loads
        assert main(["generate", "--model", str(longcat), "--mode", "continue", "--prompt", "x"]) == 2
    assert "--video" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["generate", "--mode", "long", "--output", str(tmp_path / "x.mp4")]) == 2
    assert "LongCat-Video models" in caplog.text
