"""FP8 weights for the DiT linears (jaxvid.models.fp8): the fp8 GEMM against its quantize-dequantize
reference, the HLO, tiny CogVideoX / LongCat models against their fp32 selves, load and convert."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvid.models.fp8 import (
    E4M3_MAX,
    FP8_DTYPE,
    Fp8Linear,
    fp8_dot,
    fp8_dot_reference,
    quantize_model_fp8,
    quantize_per_token,
    quantize_weight,
)
from jaxvid.models.longcat import LongCatConfig
from jaxvid.synthetic.cogvideox import tiny_configs, write_random_cogvideox
from jaxvid.synthetic.random_weights import random_longcat

# Relative L2 of a whole tiny model's output, fp8 linears vs the same fp32 model (weights N(0, 0.1^2),
# norm weights around 1; measured on CPU, jax 0.10.2: CogVideoX 0.024, LongCat 0.024; e4m3 keeps 3
# mantissa bits, ~2-3% per rounding).
COGVIDEOX_REL_L2_BOUND = 0.06
LONGCAT_REL_L2_BOUND = 0.06

forward = nnx.jit(lambda model, *args, **kw: model(*args, **kw))


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (3, 5, 64), jnp.float32)
    x = x.at[1, 2].multiply(40.0)  # one outlier token: per-token scales keep the others intact
    w = jax.random.normal(k[1], (64, 48), jnp.float32) * 0.05
    w = w.at[:, 7].multiply(30.0)  # one large output channel: per-channel scales
    return x, w


def test_quantize_weight_is_per_output_channel():
    _, w = _inputs()
    q, s = quantize_weight(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and s.shape == (48,)
    np.testing.assert_allclose(np.asarray(s), np.abs(np.asarray(w)).max(axis=0) / E4M3_MAX, rtol=1e-6)
    # every column's largest entry lands on +-448; e4m3 rounding error <= 2^-4 relative (3 mantissa bits)
    qf = np.asarray(q.astype(jnp.float32))
    np.testing.assert_array_equal(np.abs(qf).max(axis=0), E4M3_MAX)
    deq = qf * np.asarray(s)
    big = np.abs(np.asarray(w)) > 2.0 ** -6 * np.asarray(s) * 64  # normal e4m3 range
    assert np.all(np.abs(deq - np.asarray(w))[big] <= 2.0 ** -4 * np.abs(np.asarray(w))[big] + 1e-12)


def test_fp8_dot_matches_quantize_dequantize_reference():
    x, w = _inputs()
    q, s = quantize_weight(w)
    got = fp8_dot(x, q, s)
    want = fp8_dot_reference(x, q, s)
    assert got.dtype == jnp.float32 and got.shape == (3, 5, 48)
    # same f8 products, exact in f32; only the summation order may differ
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    # and the quantized GEMM is close to the float one (the error the user pays)
    assert _rel_l2(got, jnp.dot(x, w, precision="highest")) < 0.05


def test_per_token_scale_isolates_outlier_tokens():
    x, _ = _inputs()
    xq, sx = quantize_per_token(x)
    assert sx.shape == (3, 5, 1)
    deq = xq.astype(jnp.float32) * sx
    for b, t in [(0, 0), (1, 1), (2, 4)]:  # ordinary tokens next to the outlier keep ~3-bit precision
        assert _rel_l2(deq[b, t], x[b, t]) < 0.05


def test_fp8_dot_hlo_is_an_f8_dot():
    x, w = _inputs()
    q, s = quantize_weight(w)
    text = jax.jit(fp8_dot).lower(x, q, s).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert dots and all("f8E4M3FN" in line for line in dots), dots
    assert any("-> tensor<3x5x48xf32>" in line for line in dots), dots


def _cog_args(cfg, seed=0):
    k = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(k[0], (1, 3, cfg.in_channels, 8, 8), jnp.float32)
    enc = jax.random.normal(k[1], (1, 6, cfg.text_embed_dim), jnp.float32)
    return x, enc, jnp.array([500.0])


def _fp8_copy(model):
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
    return quantize_model_fp8(copy)


def _cog_cfg():
    import dataclasses

    return dataclasses.replace(tiny_configs()[0], dtype=jnp.float32, param_dtype=jnp.float32)


@pytest.fixture(scope="module")
def cog_src(tmp_path_factory):
    """A tiny random CogVideoX transformer folder (diffusers layout, fp32, weights N(0, 0.1^2))."""
    import numpy as np_

    rng = np_.random.default_rng(3)

    def values(key, shape):  # as the default generator (norm weights around 1), 5x its spread
        x = rng.standard_normal(shape).astype(np_.float32) * np_.float32(0.1)
        return x + np_.float32(1.0) if "norm" in key and key.endswith(".weight") else x

    return write_random_cogvideox(tmp_path_factory.mktemp("cog") / "src", _cog_cfg(), seed=3, values=values)


def test_cogvideox_fp8_load_convert_and_error(tmp_path, cog_src):
    """Load with weights="fp8" (quantized after loading), convert with --weights fp8 and load that:
    the same tensors bit for bit, the same output; and the fp8 model against the fp32 one."""
    from jaxvid.cli.convert import main as convert_main
    from jaxvid.models.loading import load_model

    ref_model = load_model(cog_src, dtype="fp32")
    loaded = load_model(cog_src, dtype="fp32", weights="fp8")
    blocks = loaded.transformer_blocks
    assert all(isinstance(m, Fp8Linear) for m in (blocks.attn1.to_q, blocks.attn1.to_out, blocks.ff.linear_in))
    # modulation, embeddings and the final layer stay in the model dtype
    assert isinstance(blocks.norm1.linear, nnx.Linear) and isinstance(loaded.proj_out, nnx.Linear)
    assert isinstance(loaded.patch_embed.proj, nnx.Linear) and blocks.norm1.linear.kernel[...].dtype == jnp.float32
    assert blocks.attn1.to_q.kernel[...].dtype == FP8_DTYPE and blocks.attn1.to_q.kernel[...].ndim == 3  # stacked

    dst = tmp_path / "fp8"
    assert convert_main([str(cog_src), str(dst), "--dtype", "fp32", "--weights", "fp8", "--quiet"]) == 0
    assert not list(tmp_path.glob(".fp8*"))  # no temp folder left
    converted = load_model(dst)  # a converted fp8 checkpoint loads as fp8 by itself
    a = nnx.to_flat_state(nnx.state(loaded, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(converted, nnx.Param)))
    assert len(a) == len(b)
    for path, v in a:
        got = b[path].get_value()
        assert got.dtype == v.get_value().dtype, path
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(v.get_value().astype(jnp.float32)))
    kernel = converted.transformer_blocks.ff.linear_in.kernel[...]
    assert kernel.dtype == FP8_DTYPE and kernel.dtype.itemsize == 1  # 1 byte per weight

    args = _cog_args(ref_model.cfg)
    out = forward(loaded, *args)
    np.testing.assert_array_equal(np.asarray(forward(converted, *args)), np.asarray(out))
    err = _rel_l2(out, forward(ref_model, *args))
    assert 0 < err < COGVIDEOX_REL_L2_BOUND, err


@pytest.mark.slow  # two compiles of the tiny LongCat DiT (~60 s on a loaded 2-core machine)
def test_longcat_fp8_model_close_to_fp32():
    model = random_longcat(LongCatConfig.tiny(), seed=2, std=0.1)
    k = jax.random.split(jax.random.key(0), 2)
    args = (jax.random.normal(k[0], (1, 4, 2, 8, 8)), jnp.full((1,), 500.0),
            jax.random.normal(k[1], (1, 1, 5, 32)), jnp.ones((1, 5), jnp.int32))
    ref = forward(model, *args)
    fp8 = _fp8_copy(model)
    assert isinstance(fp8.blocks.attn.qkv, Fp8Linear) and isinstance(fp8.blocks.ffn.w2, Fp8Linear)
    assert not isinstance(fp8.blocks.adaLN_modulation[1], Fp8Linear)
    assert not isinstance(fp8.final_layer.linear, Fp8Linear)
    err = _rel_l2(forward(fp8, *args), ref)
    assert 0 < err < LONGCAT_REL_L2_BOUND, err


def test_bad_weights_option_and_model(tmp_path):
    from jaxvid.models.loading import load_model
    from jaxvid.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig

    with pytest.raises(ValueError, match=r"weights='int4'.*fp8"):
        load_model(tmp_path, weights="int4")
    vae = nnx.eval_shape(lambda: AutoencoderKLCogVideoX(CogVideoXVAEConfig.tiny(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="weights='fp8' is supported for"):
        quantize_model_fp8(vae)


def test_convert_bad_weights_option(tmp_path, capsys):
    from jaxvid.cli.convert import main as convert_main

    with pytest.raises(SystemExit) as e:
        convert_main([str(tmp_path), str(tmp_path / "out"), "--weights", "int4"])
    assert e.value.code == 2
    assert "--weights" in capsys.readouterr().err
