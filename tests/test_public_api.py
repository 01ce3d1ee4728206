"""The package's top-level entry points."""
import numpy as np
import pytest

import jaxvid


def test_load_pipeline_picks_the_pipeline_by_folder(tmp_path):
    from jaxvid.pipelines.cogvideox import CogVideoXPipeline
    from jaxvid.pipelines.longcat import LongCatPipeline
    from jaxvid.synthetic.cogvideox import write_tiny_pipeline
    from jaxvid.synthetic.longcat import write_tiny_longcat

    cog = jaxvid.load_pipeline(write_tiny_pipeline(tmp_path / "cog", seed=0))
    assert isinstance(cog, CogVideoXPipeline)
    lc = jaxvid.load_pipeline(write_tiny_longcat(tmp_path / "lc"))
    assert isinstance(lc, LongCatPipeline)
    with pytest.raises(ValueError, match="model_index.json"):
        jaxvid.load_pipeline(tmp_path)


def test_lazy_model_loaders(fixtures_dir):
    from jaxvid.models.cogvideox import CogVideoXTransformer3D

    model = jaxvid.load_transformer(fixtures_dir / "cogvideox" / "tiny_2b_sincos" / "transformer")
    assert isinstance(model, CogVideoXTransformer3D)
    io = np.load(fixtures_dir / "cogvideox" / "tiny_2b_sincos" / "io.npz")
    out = np.asarray(model(io["hidden_states"], io["encoder_hidden_states"], io["timestep"]))
    assert np.linalg.norm(out - io["output"]) / np.linalg.norm(io["output"]) <= 1e-4
    assert jaxvid.load_model is not None
    with pytest.raises(AttributeError):
        jaxvid.not_a_thing  # noqa: B018
