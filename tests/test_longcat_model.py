"""LongCat config, switches, random weights and bad-input errors (no reference needed)."""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvid.models.longcat import BSAParams, LongCatConfig, LongCatVideoTransformer3D
from jaxvid.synthetic.random_weights import random_longcat as random_model

forward = nnx.jit(lambda model, *args, **kw: model(*args, **kw))


def test_from_hf_config_reads_fixture_configs(fixtures_dir):
    d = json.loads((fixtures_dir / "longcat" / "dit_bsa" / "transformer" / "config.json").read_text())
    cfg = LongCatConfig.from_hf_config(d)
    assert cfg == LongCatConfig.tiny(enable_bsa=True, bsa_params=BSAParams(
        sparsity=0.75, cdf_threshold=None, chunk_3d_shape_q=(2, 2, 2), chunk_3d_shape_k=(2, 2, 2)))
    assert LongCatConfig.from_hf_config({**d, "mystery": 1}) == cfg  # warns (tests/test_config_keys.py)
    with pytest.raises(ValueError, match="cp_split_hw"):
        LongCatConfig.from_hf_config({**d, "cp_split_hw": [2, 1]})
    assert LongCatConfig.from_hf_config({**d, "cp_split_hw": None}).cp_split_hw == (1, 1)


def test_config_validation():
    with pytest.raises(ValueError, match="enable_bsa=True needs bsa_params"):
        LongCatConfig.tiny(enable_bsa=True)
    with pytest.raises(ValueError, match="patch_size"):
        LongCatConfig.tiny(patch_size=(2, 2, 2))
    with pytest.raises(ValueError, match="num_heads"):
        LongCatConfig.tiny(num_heads=3)
    with pytest.raises(ValueError, match="sparsity"):
        BSAParams(sparsity=1.5)


def test_real_size_preset_is_13_6b():
    cfg = LongCatConfig.longcat_video()
    abstract = nnx.eval_shape(lambda: LongCatVideoTransformer3D(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert 13.5e9 < n < 13.7e9
    assert cfg.ffn_hidden_dim == 11008 and cfg.rope_dims == (44, 42, 42)


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    from jaxvid.models.loading import load_model

    model = load_model(fixtures_dir / "longcat" / "dit_bsa" / "transformer")  # BSA chunks (2, 2, 2)
    model.disable_bsa()
    return model


def test_random_params_bf16():
    cfg = LongCatConfig.tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = random_model(cfg, seed=0)
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert float(model.blocks.attn.q_norm.weight[...].astype(jnp.float32).mean()) == pytest.approx(1.0, abs=0.05)
    out = forward(model, *_args(t=2))
    assert out.dtype == jnp.float32 and out.shape == (1, 4, 2, 8, 8) and bool(jnp.isfinite(out).all())


def _args(b=1, t=4, h=8, w=8, L=5, seed=0):
    k = jax.random.split(jax.random.key(seed), 2)
    return (jax.random.normal(k[0], (b, 4, t, h, w)), jnp.full((b,), 500.0),
            jax.random.normal(k[1], (b, 1, L, 32)), jnp.ones((b, L), jnp.int32))


def test_bsa_switch_logs_and_changes_output(tiny, caplog):
    x, t, y, m = _args()
    dense = forward(tiny, x, t, y, m)
    with caplog.at_level(logging.INFO, logger="jaxvid.models.longcat"):
        tiny.enable_bsa(sparsity=0.75)
    assert "block sparse attention enabled" in caplog.text
    assert tiny.cfg.bsa_params.sparsity == 0.75
    sparse = forward(tiny, x, t, y, m)
    one_frame = forward(tiny, x[:, :, :1], t, y, m)  # one latent frame: BSA is not used (as upstream)
    tiny.disable_bsa()
    assert bool(jnp.isfinite(sparse).all()) and float(jnp.abs(sparse - dense).max()) > 1e-4
    np.testing.assert_allclose(one_frame, forward(tiny, x[:, :, :1], t, y, m), rtol=1e-6, atol=1e-6)


def test_padded_text_tokens_are_ignored(tiny):
    """Without zero-padding, what sits in masked text positions must not matter."""
    x, t, y, _ = _args(L=6)
    mask = jnp.array([[1, 1, 1, 0, 0, 0]])
    a = forward(tiny, x, t, y, mask)
    b = forward(tiny, x, t, y.at[:, :, 3:].set(100.0), mask)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bad_inputs(tiny):
    x, t, y, m = _args()
    with pytest.raises(ValueError, match="divisible by the patch"):
        tiny(x[..., :7], t, y, m)
    with pytest.raises(ValueError, match="encoder_attention_mask is None"):
        tiny(x, t, y, None)
    with pytest.raises(ValueError, match="encoder_attention_mask.shape"):
        tiny(x, t, y, m[:, :3])
    with pytest.raises(ValueError, match="num_cond_latents=4"):
        tiny(x, t, y, m, num_cond_latents=4)
    with pytest.raises(ValueError, match="timestep.shape"):
        tiny(x, jnp.ones((1, 3)), y, m)
    with pytest.raises(ValueError, match="hidden_states.shape"):
        tiny(x[:, :3], t, y, m)
    tiny.enable_bsa()
    try:
        with pytest.raises(ValueError, match="not divisible by the chunk shape"):
            tiny(x[:, :, :3], t, y, m)  # 3 frames vs chunk t=2
        with pytest.raises(ValueError, match="not divisible by the chunk shape"):
            tiny(x, t, y, m, num_cond_latents=1)
    finally:
        tiny.disable_bsa()
    with pytest.raises(ValueError, match="kv_cache_dict has layers"):
        k = jnp.zeros((1, 16, 4, 16))
        tiny(x[:, :, 1:], t, y, m, num_cond_latents=1, kv_cache_dict={0: (k, k)})


def test_bsa_settings_overridable_at_load(fixtures_dir):
    """enable_bsa / bsa_params come from config.json and can be replaced when loading."""
    from jaxvid.models import load_transformer

    folder = fixtures_dir / "longcat" / "dit_bsa" / "transformer"
    assert load_transformer(folder).cfg.enable_bsa
    params = {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}
    model = load_transformer(folder, enable_bsa=False, bsa_params=params)
    assert not model.cfg.enable_bsa and model.cfg.bsa_params.sparsity == 0.5
    with pytest.raises(ValueError, match="config_overrides"):
        load_transformer(folder, enable_bsaa=True)
