"""Where the embedded default model lives: a trained tiny CogVideoX pipeline shipped inside the package.

`default_model_path()` is the folder `CogVideoXPipeline.from_pretrained` (and `jaxvid generate`
without --model) loads; its MODEL_CARD.md says what it was trained on and how well it follows
held-out captions. `DEFAULT_GENERATION` holds the settings it was trained and measured for.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["default_model_path", "DEFAULT_GENERATION", "DEFAULT_PROMPT"]

# The world's frame count and size; DDIM steps and guidance as measured in the model card.
DEFAULT_GENERATION: dict[str, Any] = {
    "num_frames": 9, "height": 48, "width": 48, "num_inference_steps": 20, "guidance_scale": 5.0, "fps": 8,
}
# A caption of a combination the model never saw in training (see jaxvid.synthetic.world.HELD_OUT).
DEFAULT_PROMPT = "a green square moving up on a black background"


def default_model_path() -> Path:
    """The shipped pipeline folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    folder = Path(str(resources.files("jaxvid").joinpath("assets", "default_model")))
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: the embedded default model is missing (no model_index.json); "
                                "reinstall jaxvid or retrain it with `python -m jaxvid.synthetic.train`")
    return folder
