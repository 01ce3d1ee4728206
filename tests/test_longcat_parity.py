"""LongCat-Video DiT vs the upstream PyTorch code (fp32, CPU): fixtures and tests/data/longcat_extra."""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvid.models import load_transformer
from jaxvid.models.loading import load_model
from jaxvid.models.longcat import LongCatVideoTransformer3D

EXTRA = Path(__file__).parent / "data" / "longcat_extra"
TOL = 1e-4


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# One jitted entry point: models of the same config share its compilations.
forward = nnx.jit(lambda model, *args, **kw: model(*args, **kw),
                  static_argnames=("num_cond_latents", "return_kv", "skip_crs_attn"))


def _inputs(io):
    return (jnp.asarray(io["hidden_states"]), jnp.asarray(io["timestep"]), jnp.asarray(io["encoder_hidden_states"]),
            jnp.asarray(io["encoder_attention_mask"]))


@pytest.mark.parametrize("case", ["dit_dense", "dit_cond1", "dit_bsa"])
def test_fixture_parity_hf_folder_and_converted(case, fixtures_dir, tmp_path):
    from jaxvid.cli.convert import convert_path

    folder = fixtures_dir / "longcat" / case
    io = np.load(folder / "io.npz")
    nc = int(io["num_cond_latents"])
    model = load_transformer(folder / "transformer")
    assert isinstance(model, LongCatVideoTransformer3D)
    assert model.cfg.enable_bsa == (case == "dit_bsa")
    err = rel_l2(forward(model, *_inputs(io), num_cond_latents=nc), io["output"])
    assert err < TOL, f"{case} (HF folder): rel L2 {err:.2e}"

    ckpt = convert_path(folder / "transformer", tmp_path / "ckpt", dtype="fp32", show_progress=False)
    converted = load_model(ckpt)
    err = rel_l2(forward(converted, *_inputs(io), num_cond_latents=nc), io["output"])
    assert err < TOL, f"{case} (converted): rel L2 {err:.2e}"


def test_bsa_fixture_is_not_dense(fixtures_dir):
    """The BSA fixture tells BSA from dense attention, so its parity really checks the sparse path."""
    folder = fixtures_dir / "longcat" / "dit_bsa"
    io = np.load(folder / "io.npz")
    model = load_model(folder / "transformer")
    model.disable_bsa()
    assert rel_l2(forward(model, *_inputs(io)), io["output"]) > 100 * TOL
    model.enable_bsa()
    assert rel_l2(forward(model, *_inputs(io)), io["output"]) < TOL


@pytest.fixture(scope="module")
def dense_model(fixtures_dir):
    return load_model(fixtures_dir / "longcat" / "dit_dense" / "transformer")


@pytest.fixture(scope="module")
def extra():
    return np.load(EXTRA / "io.npz")


def test_per_frame_timesteps_and_mask_with_holes(dense_model, extra):
    err = rel_l2(forward(dense_model, *_inputs(extra)), extra["out_varlen"])
    assert err < TOL, err


def test_text_tokens_zero_pad(dense_model, extra):
    import dataclasses

    model = nnx.merge(*nnx.split(dense_model))
    model.cfg = dataclasses.replace(model.cfg, text_tokens_zero_pad=True)
    err = rel_l2(forward(model, *_inputs(extra)), extra["out_zeropad"])
    assert err < TOL, err


def test_conditioning_frames(dense_model, extra):
    nc = int(extra["num_cond_latents"])
    err = rel_l2(forward(dense_model, *_inputs(extra), num_cond_latents=nc), extra["out_cond_full"])
    assert err < TOL, err


def test_kv_cache_continuation(dense_model, extra):
    x, t, y, mask = _inputs(extra)
    nc = int(extra["num_cond_latents"])
    b = x.shape[0]
    out, cache = forward(dense_model, x[:, :, :nc], jnp.zeros((b, nc)), jnp.zeros_like(y), None,
                         return_kv=True, skip_crs_attn=True)
    assert rel_l2(out, extra["out_cache_call"]) < TOL
    assert sorted(cache) == list(range(dense_model.cfg.depth))
    for i, (k, v) in cache.items():  # ours [B, S, H, D]; upstream [B, H, S, D]
        assert rel_l2(k.transpose(0, 2, 1, 3), extra[f"cache_k_{i}"]) < 1e-5
        assert rel_l2(v.transpose(0, 2, 1, 3), extra[f"cache_v_{i}"]) < 1e-5
    cont = forward(dense_model, x[:, :, nc:], t[:, nc:], y, mask, num_cond_latents=nc, kv_cache_dict=cache)
    err = rel_l2(cont, extra["out_continuation"])
    assert err < TOL, err
    # A batch-1 cache broadcasts over the batch (upstream repeats it).
    cache1 = {i: (k[:1], v[:1]) for i, (k, v) in cache.items()}
    cont1 = forward(dense_model, x[:1, :, nc:], t[:1, nc:], y[:1], mask[:1], num_cond_latents=nc,
                    kv_cache_dict=cache1)
    assert rel_l2(cont1, extra["out_continuation"][:1]) < TOL
