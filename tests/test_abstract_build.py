"""jaxvid.models.abstract: the parameter tree built without tracing equals `nnx.eval_shape`'s.

The reference is flax's own abstract build (`nnx.eval_shape` over the constructor, what loading
used before): the same graph definition, the same Variable paths and types, the same shapes and
dtypes, for every registered model class (tiny configs, float32 and bfloat16, fp8 linears).
Outside `shapes_only()` the helpers draw exactly what flax's layers draw from the same keys.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvid.models import abstract
from jaxvid.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3D
from jaxvid.models.fp8 import quantize_model_fp8
from jaxvid.models.layers import embed, layer_norm, linear
from jaxvid.models.longcat import LongCatConfig, LongCatVideoTransformer3D
from jaxvid.models.t5 import T5Config, T5Encoder
from jaxvid.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
from jaxvid.models.vae_wan import AutoencoderKLWan, WanVAEConfig


def _bf16(cfg):
    return dataclasses.replace(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


CASES = {
    "cogvideox-5b-like": (CogVideoXTransformer3D, CogVideoXConfig.tiny()),
    # learned position table, ofs embedding and patch_size_t: CogVideoX 1.5 / I2V's extra Params
    "cogvideox-1.5-like-bf16": (CogVideoXTransformer3D, _bf16(CogVideoXConfig.tiny(
        use_learned_positional_embeddings=True, ofs_embed_dim=8, patch_size_t=2))),
    "vae-cogvideox": (AutoencoderKLCogVideoX, CogVideoXVAEConfig.tiny()),
    "t5": (T5Encoder, T5Config.tiny()),
    "umt5-bf16": (T5Encoder, _bf16(T5Config.tiny(relative_bias_per_layer=True))),
    "longcat-dit": (LongCatVideoTransformer3D, LongCatConfig.tiny()),
    "vae-wan": (AutoencoderKLWan, WanVAEConfig.tiny()),
}


def _flat(model: nnx.Module):
    graphdef, state = nnx.split(model)
    return graphdef, [(path, type(v), v.get_value()) for path, v in nnx.to_flat_state(state)]


def _assert_same_abstract(ours: nnx.Module, reference: nnx.Module) -> None:
    graphdef, flat = _flat(ours)
    ref_graphdef, ref_flat = _flat(reference)
    assert graphdef == ref_graphdef and hash(graphdef) == hash(ref_graphdef)
    assert [p for p, _, _ in flat] == [p for p, _, _ in ref_flat]
    for (path, kind, value), (_, ref_kind, ref_value) in zip(flat, ref_flat):
        assert kind is ref_kind, path
        assert isinstance(value, jax.ShapeDtypeStruct), path
        assert (value.shape, value.dtype) == (ref_value.shape, ref_value.dtype), path
        assert value == ref_value, path  # weak_type and sharding too


@pytest.mark.parametrize("name", list(CASES))
def test_build_abstract_equals_eval_shape(name):
    model_cls, cfg = CASES[name]
    ours = abstract.build_abstract(model_cls, cfg)
    _assert_same_abstract(ours, nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("name", ["cogvideox-5b-like", "longcat-dit"])
def test_fp8_abstract_equals_eval_shape(name):
    """Loading a converted fp8 checkpoint fills fp8 linears: quantizing the abstract model gives
    the structure eval_shape over build-and-quantize gives."""
    model_cls, cfg = CASES[name]
    ours = quantize_model_fp8(abstract.build_abstract(model_cls, cfg))
    _assert_same_abstract(ours, nnx.eval_shape(lambda: quantize_model_fp8(model_cls(cfg, rngs=nnx.Rngs(0)))))


def test_helpers_draw_flax_values_outside_shapes_only():
    """The wrapped initializers are flax's defaults: a model built for real is initialized as before."""
    pairs = [
        (linear(6, 5, param_dtype=jnp.float32, rngs=nnx.Rngs(3)), nnx.Linear(6, 5, rngs=nnx.Rngs(3))),
        (embed(7, 4, rngs=nnx.Rngs(3)), nnx.Embed(7, 4, rngs=nnx.Rngs(3))),
        (layer_norm(4, eps=1e-5, rngs=nnx.Rngs(3)), nnx.LayerNorm(4, epsilon=1e-5, rngs=nnx.Rngs(3))),
    ]
    for ours, ref in pairs:
        a, b = nnx.state(ours, nnx.Param), nnx.state(ref, nnx.Param)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def block(r: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(4, 3, rngs=r)

    stacked = abstract.stack(block, 3, nnx.Rngs(5))
    reference = nnx.split_rngs(splits=3)(nnx.vmap(block, in_axes=(0,), out_axes=0))(nnx.Rngs(5))
    assert stacked.kernel[...].shape == (3, 4, 3)
    np.testing.assert_array_equal(np.asarray(stacked.kernel[...]), np.asarray(reference.kernel[...]))
    assert not np.array_equal(np.asarray(stacked.kernel[0]), np.asarray(stacked.kernel[1]))  # own keys per layer


class _Unported(nnx.Module):
    """A constructor that computes a Param (bypasses the helpers)."""

    def __init__(self, cfg, *, rngs):
        self.w = nnx.Param(jnp.zeros((cfg, 2)))
        self.b = nnx.Param(abstract.zeros((2,), jnp.float32))


class _Rejects(nnx.Module):
    def __init__(self, cfg, *, rngs):
        raise ValueError(f"cfg={cfg}: expected a positive size")


def test_abstract_model_falls_back_to_eval_shape(caplog):
    with pytest.raises(abstract.NotAbstractError, match="w"):
        abstract.build_abstract(_Unported, 3)
    with caplog.at_level(logging.WARNING, logger="jaxvid.models.abstract"):
        model = abstract.abstract_model(_Unported, 3)
    assert "_Unported" in caplog.text and "eval_shape" in caplog.text
    _assert_same_abstract(model, nnx.eval_shape(lambda: _Unported(3, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match="cfg=-1: expected a positive size"):  # the constructor's own error
        abstract.abstract_model(_Rejects, -1)
    assert not abstract._SHAPES_ONLY.get()  # the scope ends with the build, also on errors


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_checked_model_graphdef_is_the_loaded_ones(fixtures_dir, component):
    """check_model's abstract model (no weights read) has the graph definition of the loaded module,
    so stages jitted on it before the read compile once."""
    from jaxvid.models.loading import check_model

    checked = check_model(fixtures_dir / "cogvideox" / "pipeline_t2v_2b_ddim" / component)
    graphdef = nnx.split(checked.load(progress=False))[0]
    assert checked.graphdef == graphdef and hash(checked.graphdef) == hash(graphdef)
