"""Where the embedded default model lives: a trained tiny CogVideoX pipeline shipped inside the package.

`default_model_path()` is the folder `CogVideoXPipeline.from_pretrained` (and `jaxvid generate`
without --model) loads; its MODEL_CARD.md says what it was trained on and how well it follows
held-out captions. `generation_settings(folder)` holds the settings it was trained and measured
for (frames, size, DDIM steps, and the guidance scale that scored best on the held-out captions),
read from the folder's GENERATION_FILE, which the training script writes.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["default_model_path", "default_model_folder", "generation_settings", "DEFAULT_GENERATION",
           "DEFAULT_PROMPT", "GENERATION_FILE"]

# The world's frame count and size; DDIM steps and guidance before evaluation picks the scale.
DEFAULT_GENERATION: dict[str, Any] = {
    "num_frames": 9, "height": 48, "width": 48, "num_inference_steps": 20, "guidance_scale": 5.0, "fps": 8,
}
# A caption of a combination the model never saw in training (see jaxvid.synthetic.world.HELD_OUT).
DEFAULT_PROMPT = "a green square moving up on a black background"
GENERATION_FILE = "jaxvid_generation.json"


def default_model_folder() -> Path:
    """jaxvid/assets/default_model/ inside the installed package (it may be absent)."""
    return Path(str(resources.files("jaxvid").joinpath("assets", "default_model")))


def default_model_path() -> Path:
    """The shipped pipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    folder = default_model_folder()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: the embedded default model is missing (no model_index.json); "
                                "reinstall jaxvid or retrain it with `python -m jaxvid.synthetic.train`")
    return folder


def generation_settings(folder: str | os.PathLike) -> dict[str, Any]:
    """num_frames, height, width, num_inference_steps, guidance_scale, fps of a trained default-model
    folder (its GENERATION_FILE over DEFAULT_GENERATION)."""
    path = Path(folder) / GENERATION_FILE
    stored = json.loads(path.read_text()) if path.is_file() else {}
    unknown = sorted(set(stored) - set(DEFAULT_GENERATION))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected some of {sorted(DEFAULT_GENERATION)}")
    return {**DEFAULT_GENERATION, **stored}
