"""The embedded default model follows captions it never saw in training; a random model does not.

Held-out captions (jaxvid.synthetic.world.HELD_OUT) go through the real pipeline
(CogVideoXPipeline.from_pretrained on the shipped folder: tokenizer -> T5 -> DDIM loop with CFG ->
VAE), and the detector (colour masks, centroid track, bounding-box fill ratio; validated on the
world's own videos in test_synthetic_world.py) reads colour, shape and motion back. The random tiny
pipeline (jaxvid.synthetic.cogvideox) is the chance baseline.
"""
from __future__ import annotations

import numpy as np
import pytest

from jaxvid.synthetic import world
from jaxvid.synthetic.default_model import generation_settings
from jaxvid.synthetic.detect import detect_one

# Every held-out combination, one sample each: 15 captions in one batch.
CASES = [(world.caption(world.scene_from_combo(c, np.random.default_rng(0))), c[:3]) for c in world.HELD_OUT]


def _accuracy(folder, seed: int = 0, steps: int | None = None) -> tuple[float, list[str]]:
    """Fraction of CASES drawn right at the folder's generation settings (those the training
    script measured and shipped; the random pipeline has none and gets the defaults); `steps`
    overrides the number of DDIM steps."""
    from jaxvid.pipelines.cogvideox import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(folder, dtype="fp32")
    settings = generation_settings(folder)
    kw = {k: settings[k] for k in ("num_frames", "height", "width", "num_inference_steps", "guidance_scale")}
    if steps is not None:
        kw["num_inference_steps"] = steps
    videos = pipe([p for p, _ in CASES], seed=seed, progress=False, **kw).frames
    misses = []
    for (prompt, want), video in zip(CASES, videos):
        d = detect_one(video)
        got = (d.colour, d.shape, d.motion) if d else None
        if got != want:
            misses.append(f"{prompt!r}: saw {got}")
    return 1.0 - len(misses) / len(CASES), misses


def test_held_out_captions_are_not_training_captions():
    rng = np.random.default_rng(0)
    seen = {world.caption(world.sample_scene(rng)) for _ in range(3000)}
    assert not {p for p, _ in CASES} & seen


@pytest.mark.slow
def test_default_model_follows_held_out_captions():
    from jaxvid.synthetic.default_model import default_model_path

    try:
        folder = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"no trained default model shipped yet: {e}")
    accuracy, misses = _accuracy(folder)
    assert accuracy >= 0.9, misses


@pytest.mark.slow
def test_random_tiny_model_scores_about_chance(tmp_path):
    from jaxvid.synthetic.cogvideox import write_tiny_pipeline

    # a random network's videos are noise whatever the step count: 4 DDIM steps keep the test cheap
    accuracy, _ = _accuracy(write_tiny_pipeline(tmp_path / "tiny"), steps=4)
    # chance of colour, shape and motion all right is about 1/5 * 1/3 * 1/5 = 1/75
    assert accuracy <= 0.2
