"""config.json keys (issue 16, item 13): unknown keys warn once and are ignored, as diffusers does;
known keys with unsupported values and values of the wrong type are one clear error."""
from __future__ import annotations

import json
import logging

import pytest

from jaxvid.models.cogvideox import CogVideoXConfig
from jaxvid.models.longcat import LongCatConfig
from jaxvid.models.vae_cogvideox import CogVideoXVAEConfig
from jaxvid.models.vae_wan import WanVAEConfig
from tests.conftest import FIXTURES_ROOT

WAN = {"_class_name": "AutoencoderKLWan", "base_dim": 8, "z_dim": 4, "latents_mean": [0.0] * 4,
       "latents_std": [1.0] * 4}


def _fixture_config(rel: str) -> dict:
    return json.loads((FIXTURES_ROOT / rel / "config.json").read_text())


# (config class, a valid config.json dict, a known key with an unsupported value, a known key of the wrong type)
CASES = {
    "cogvideox": (CogVideoXConfig, lambda: _fixture_config("cogvideox/tiny_5b_rope/transformer"),
                  {"activation_fn": "relu"}, {"num_layers": "2"}),
    "vae_cogvideox": (CogVideoXVAEConfig, lambda: _fixture_config("cogvideox/vae_tiny/vae"),
                      {"use_quant_conv": True}, {"block_out_channels": 8}),
    "vae_wan": (WanVAEConfig, lambda: dict(WAN), {"is_residual": True}, {"latents_std": ["1"] * 4}),
    "longcat": (LongCatConfig, lambda: _fixture_config("longcat/dit_bsa/transformer"),
                {"cp_split_hw": [2, 1]}, {"enable_bsa": "yes"}),
}


@pytest.mark.parametrize("name", CASES)
def test_unknown_keys_warn_once_and_are_ignored(name, caplog):
    cls, base, _, _ = CASES[name]
    expected = cls.from_hf_config(base())
    with caplog.at_level(logging.WARNING):
        cfg = cls.from_hf_config({**base(), "some_future_key": 1, "use_magic": [True]})
    assert cfg == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "some_future_key" in warnings[0] and "use_magic" in warnings[0] and "config.json" in warnings[0]


@pytest.mark.parametrize("name", CASES)
def test_known_keys_with_unsupported_values_still_fail(name):
    cls, base, bad_value, _ = CASES[name]
    (key,) = bad_value
    with pytest.raises(ValueError, match=key):
        cls.from_hf_config({**base(), **bad_value})


@pytest.mark.parametrize("name", CASES)
def test_wrong_type_is_one_error_naming_file_and_key(name):
    cls, base, _, bad_type = CASES[name]
    ((key, value),) = bad_type.items()
    with pytest.raises(ValueError, match=rf"config\.json: {key}=") as err:
        cls.from_hf_config({**base(), **bad_type})
    assert repr(value) in str(err.value) and "expected" in str(err.value)


def test_nested_bsa_params_are_type_checked():
    d = _fixture_config("longcat/dit_bsa/transformer")
    with pytest.raises(ValueError, match=r"bsa_params: sparsity='0\.5'"):
        LongCatConfig.from_hf_config({**d, "bsa_params": {**d["bsa_params"], "sparsity": "0.5"}})


def test_diffusers_float_temporal_ratio_still_reads():
    d = _fixture_config("cogvideox/vae_tiny/vae")
    assert CogVideoXVAEConfig.from_hf_config({**d, "temporal_compression_ratio": 4.0}).temporal_compression_ratio == 4
