"""`jaxvid generate` CogVideoX options: --lora, --video/--strength, --preset, --scene-boundaries, model ids
from the Hugging Face cache, --max-sequence-length, and the summary line. Each CLI run is checked against
the Python API with the same settings (whose parity with diffusers is tested in
test_pipeline_cogvideox_features.py); the CLI's written frames are captured before encoding."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from jaxvid.cli import generate as cli
from jaxvid.pipelines.cogvideox import CogVideoXPipeline
from jaxvid.synthetic.cogvideox import TinyDefaults, write_tiny_pipeline
from tests.test_generate_cli import parse, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny default pipeline (the same weights the CLI writes when --model is absent)."""
    folder = write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)
    return folder, CogVideoXPipeline.from_pretrained(folder, dtype="fp32")


@pytest.fixture()
def captured(monkeypatch):
    frames = {}

    def save(f, path, fps):
        frames["frames"] = np.asarray(f)
        return path

    monkeypatch.setattr(cli, "_save", save)
    return frames


def _lora_file(pipe, path, seed=0):
    """A random PEFT-layout LoRA on a few of the tiny transformer's Linears."""
    from flax import nnx
    from safetensors.numpy import save_file

    from jaxvid.models.lora_cogvideox import lora_targets

    shapes = {".".join(map(str, k)): v.get_value().shape for k, v in nnx.to_flat_state(pipe.transformer.state)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, t in lora_targets(pipe.transformer.cfg).items():
        if t.conv or not module.endswith(("to_q", "to_v", "proj_out")):
            continue
        d_in, d_out = shapes[t.target + ".kernel"][-2:]
        tensors[f"transformer.{module}.lora_A.weight"] = (0.3 * rng.standard_normal((2, d_in))).astype(np.float32)
        tensors[f"transformer.{module}.lora_B.weight"] = (0.3 * rng.standard_normal((d_out, 2))).astype(np.float32)
    save_file(tensors, str(path))
    return path


def test_loras_and_step_cache_match_the_python_api(tiny, tmp_path, captured, caplog):
    """Two --lora options and --step-cache 2 (2 steps, timesteps 999 and 499: the second reuses)."""
    folder, pipe = tiny
    a, b = _lora_file(pipe, tmp_path / "a.safetensors", 0), _lora_file(pipe, tmp_path / "b.safetensors", 1)
    with caplog.at_level(logging.INFO):
        assert run(["--steps", "2", "--lora", f"{a}:0.7", "--lora", str(b), "--step-cache", "2",
                    "--output", str(tmp_path / "o.mp4"), "--no-progress"]) == 0
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("CogVideoX:"))
    assert "num_frames 9 (model default" in summary and "height 32 (model default" in summary
    assert "LoRA a.safetensors:0.7, b.safetensors:1" in summary and "attention dense" in summary
    assert "attention recomputed every 2 steps" in summary
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, 1.0])
    pipe.enable_pyramid_attention_broadcast(2)
    try:
        want = pipe(TinyDefaults().prompt, num_inference_steps=2, seed=0, progress=False).frames[0]
    finally:
        pipe.unload_lora_weights()
        pipe.disable_pyramid_attention_broadcast()
    np.testing.assert_array_equal(captured["frames"], want)


def test_preset_and_scenes_build_the_plan(tmp_path, monkeypatch, caplog):
    """--preset auto picks by frame count, --dense-timesteps overrides it, --scene-boundaries (pixel
    frames) become the radial mask's scenes in token frames; the summary line says all of it."""
    from jaxvid.attention.plan import AttentionPlan, Scene

    seen = {}

    def generate(self, *args, **kwargs):
        seen["plan"] = kwargs["attention"]
        raise ValueError("stop here")

    monkeypatch.setattr(CogVideoXPipeline, "generate", generate)
    with caplog.at_level(logging.INFO):
        assert run(["--attention", "radial", "--preset", "auto", "--dense-timesteps", "1", "--scene-boundaries",
                    "0,5,9", "--output", str(tmp_path / "o.mp4")]) == 2
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("CogVideoX:"))
    assert "1 dense layers, 1 dense steps (preset short (auto: 9 frames < 30), --dense-timesteps given)" in summary
    assert "scenes at frames 0,5,9 (causal)" in summary
    # 9 frames -> 3 latent frames (frame 0 alone, then 4 per latent): pixel edge 5 is latent edge 2
    scene = Scene(boundaries=(0, 2, 3), adjacency=((True, False), (True, True)))
    assert seen["plan"] == AttentionPlan.radial_cogvideox(dense_layers=1, dense_timesteps=1, scene=scene)


def test_video_to_video_matches_the_python_api(tiny, tmp_path, captured, caplog):
    from jaxvid import video

    folder, pipe = tiny
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)  # 11 frames: the first 9 (1 + 4k) are used
    path = tmp_path / "in.gif"
    video.save(source, path, fps=8)
    frames_in = video.load(path)
    with caplog.at_level(logging.INFO):
        assert run(["--video", str(path), "--strength", "0.5", "--steps", "4", "--output", str(tmp_path / "o.mp4"),
                    "--no-progress"]) == 0
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("CogVideoX:"))
    assert "num_frames 9 (the input video, 9 frames)" in summary and "strength 0.5" in summary
    want = pipe(TinyDefaults().prompt, video=frames_in[:9], strength=0.5, num_inference_steps=4, seed=0,
                progress=False).frames[0]
    np.testing.assert_array_equal(captured["frames"], want)


def test_model_id_resolves_in_the_hub_cache(tiny, tmp_path, monkeypatch, caplog):
    import jaxvid
    from tests.test_hub import write_cached_repo

    folder, _ = tiny
    files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
    cache = tmp_path / "hub"
    snapshot = write_cached_repo(cache, "THUDM/CogVideoX-tiny", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert cli.resolve_model_option("THUDM/CogVideoX-tiny") == snapshot
    assert isinstance(jaxvid.load_pipeline("THUDM/CogVideoX-tiny"), CogVideoXPipeline)
    with caplog.at_level(logging.ERROR):
        assert run(["--model", "THUDM/CogVideoX-5b", "--prompt", "x", "--output", str(tmp_path / "o.mp4")]) == 2
    error = caplog.records[-1].getMessage()
    assert "--model='THUDM/CogVideoX-5b'" in error and "huggingface-cli download THUDM/CogVideoX-5b" in error


@pytest.mark.parametrize("argv, message", [
    (["--strength", "0.5"], "--strength is a video-to-video option; add --video"),
    (["--video", "in.mp4", "--strength", "1.5"], "--strength=1.5; expected a number in (0, 1]"),
    (["--preset", "auto"], "--preset is a radial attention option"),
    (["--scene-boundaries", "0,5,9"], "--scene-boundaries is a radial attention option"),
    (["--attention", "radial", "--scene-boundaries", "0,x"], "--scene-boundaries='0,x'; expected comma-separated"),
    (["--attention", "radial", "--scene-boundaries", "0,5,12"], "--scene-boundaries=(0, 5, 12); expected strictly"),
    (["--attention", "radial", "--scene-boundaries", "0,2,3,9"], "two edges fall in one token frame"),
    (["--lora", "/nonexistent.safetensors:0.5"], "--lora='/nonexistent.safetensors:0.5'"),
    (["--video", "/nonexistent.mp4"], "--video='/nonexistent.mp4': no such file"),
    (["--model", "not a folder"], "--model='not a folder': no such folder"),
])
def test_bad_options_fail_before_loading(argv, message, caplog, tmp_path):
    with caplog.at_level(logging.ERROR):
        assert run([*argv, "--output", str(tmp_path / "o.mp4")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(message in e for e in errors), errors


def test_lora_specs_and_presets():
    assert cli.parse_lora_specs(None) == []
    assert cli.radial_dense_settings(parse(["--attention", "radial"]), 49) == (1, 12, "default")
    assert cli.radial_dense_settings(parse(["--attention", "radial", "--preset", "auto"]), 81)[:2] == (3, 8)
    assert cli.radial_dense_settings(parse(["--attention", "radial", "--preset", "long", "--dense-layers", "0"]),
                                     9)[:2] == (0, 8)


def test_max_sequence_length_is_checked_against_position_tables(tmp_path, caplog):
    """A model with an absolute position table (no RoPE) is built for one text length."""
    model = write_tiny_pipeline(tmp_path / "i2v", variant="i2v")
    with caplog.at_level(logging.ERROR):
        assert run(["--model", str(model), "--prompt", "x", "--image", str(model / "model_index.json"),
                    "--max-sequence-length", "100", "--output", str(tmp_path / "o.mp4")]) == 2
    assert "--max-sequence-length=100; this model's position table" in caplog.records[-1].getMessage()


def test_scene_edges_map_to_token_frames_of_cogvideox_1_5():
    """1.5: 17 frames -> 5 latents, one padding latent in front (to scene 0), 2 latents per token frame."""
    from jaxvid.pipelines.cogvideox import scene_for_frames
    from jaxvid.synthetic.cogvideox import tiny_configs

    tcfg, vcfg, _ = tiny_configs("t2v-1.5")
    scene = scene_for_frames((0, 9, 17), 17, tcfg, vcfg, "isolated")
    assert scene.boundaries == (0, 2, 3) and scene.adjacency == ((True, False), (False, True))
    with pytest.raises(ValueError, match="two edges fall in one token frame"):
        scene_for_frames((0, 5, 9), 9, tcfg, vcfg)
