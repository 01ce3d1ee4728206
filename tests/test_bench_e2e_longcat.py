"""bench/e2e.py --model longcat: the folder writer, the configuration checks and the reference table
(no worker runs here: `python bench/e2e.py --model longcat --smoke` runs the tiny pipeline)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench import e2e
from jaxvid.synthetic import longcat


def _headers(folder):
    """{component: {tensor: (shape, dtype)}} of every safetensors file under a LongCat folder."""
    from safetensors import safe_open

    out = {}
    for sub in ("dit", "text_encoder", "vae"):
        (path,) = (folder / sub).glob("*.safetensors")
        with safe_open(str(path), "np") as f:
            out[sub] = {k: f.get_slice(k).get_shape() for k in f.keys()}
    return out


def test_streaming_writer_matches_the_tiny_writer_and_loads(tmp_path):
    """write_random_longcat at the tiny sizes writes the tensors write_tiny_longcat writes (names, shapes),
    in bf16 from the pooled values, and jaxvid's LongCatPipeline loads them as stored."""
    import jax.numpy as jnp
    import ml_dtypes
    from safetensors import safe_open

    from jaxvid.pipelines.longcat import LongCatPipeline
    from jaxvid.synthetic.cogvideox import pooled_random_values

    ref = longcat.write_tiny_longcat(tmp_path / "ref", loras=False)
    vocab = json.loads((ref / "text_encoder" / "config.json").read_text())["vocab_size"]
    configs = {"dit": longcat.tiny_dit_config(), "text_encoder": longcat.tiny_text_encoder_config(vocab),
               "vae": longcat.tiny_vae_config()}
    got = longcat.write_random_longcat(tmp_path / "got", values=pooled_random_values(1 << 12), configs=configs)
    assert _headers(got) == _headers(ref)
    for sub in ("dit", "text_encoder", "vae"):
        assert json.loads((got / sub / "config.json").read_text()) == json.loads((ref / sub / "config.json").read_text())
    pipe = LongCatPipeline.from_pretrained(got, dtype=jnp.float32, progress=False, offload="none")
    with safe_open(str(got / "dit" / "diffusion_pytorch_model.safetensors"), "np") as f:
        stored = f.get_tensor("x_embedder.proj.bias")
    assert stored.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(pipe.dit.x_embedder.proj.bias[...]), stored.astype(np.float32))


def test_real_size_configs_are_the_released_models():
    from jaxvid.models.longcat import LongCatConfig
    from jaxvid.models.t5 import T5Config
    from jaxvid.models.vae_wan import WanVAEConfig

    c = longcat.longcat_video_configs()
    assert LongCatConfig.from_hf_config(c["dit"]) == LongCatConfig.longcat_video()
    assert T5Config.from_hf_config(c["text_encoder"]) == T5Config.umt5_xxl()
    assert WanVAEConfig.from_hf_config(c["vae"]) == WanVAEConfig.wan21()


@pytest.mark.parametrize("config, message", [
    ("diffusers", "runs jaxvid only"),
    ("jaxvid-warm/radial", "takes /bsa"),
])
def test_longcat_configs_are_checked(config, message):
    e2e._check_config("jaxvid-warm:blocks/bsa@20", "longcat")
    with pytest.raises(SystemExit, match=message):
        e2e._check_config(config, "longcat")
    with pytest.raises(SystemExit, match="radial"):
        e2e._check_config("jaxvid-warm/bsa", "5b")  # CogVideoX keeps /radial only


def test_reference_table_divides_by_upstreams_step():
    ref = {r["case"]: r for r in json.loads((e2e.REPO_ROOT / "bench" / "results" / "reference"
                                             / "peer_torch_step_h100.json").read_text())}
    ms = ref["LongCat DiT step B2 480p 93f CFG"]["ms"]
    rows = [{"config": "jaxvid-warm", "per_step": ms / 2000, "peak_gib": 20.0}, {"config": "x", "error": "e"}]
    text = e2e.longcat_reference(rows, 93, 480, 832)
    assert "| jaxvid-warm | " in text and "| 0.50 | 20.00 |" in text
    assert "no upstream reference" in e2e.longcat_reference(rows, 61, 480, 832)
