"""Parity of jaxvid's Wan 2.1 VAE with diffusers' AutoencoderKLWan (fp32, CPU, tiny random config).

Weights: a seeded diffusers model (norm gains and biases randomised too), saved with
save_pretrained and loaded through convert.keymaps.vae_wan.vae_rules.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan as TorchWan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from flax import nnx

from convert.apply import check_rules
from convert.keymaps.vae_wan import vae_rules
from convert.safetensors_io import SafetensorsReader
from jaxvid.models.loading import abstract_params, fill_model, load_model
from jaxvid.models.vae_wan import (
    AutoencoderKLWan,
    WanVAEConfig,
    denormalize_latents,
    jitted,
    latents_from_moments,
    normalize_latents,
)

LAYER_TOL = 1e-5
MODEL_TOL = 1e-4


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_kwargs(cfg: WanVAEConfig) -> dict:
    return dict(
        base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample), latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(torch model, folder it was saved to) for the tiny config."""
    torch.manual_seed(0)
    model = TorchWan(**torch_kwargs(WanVAEConfig.tiny())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("wan_vae")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def pair(saved):
    """(torch model, jax model loaded through the key table)."""
    model, folder = saved
    cfg = WanVAEConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    return model, fill_model(AutoencoderKLWan, cfg, vae_rules(cfg), SafetensorsReader(folder))


def to_cl(x: torch.Tensor) -> jax.Array:
    """torch [B, C, T, H, W] -> jax channels-last [B, T, H, W, C]."""
    return jnp.asarray(x.numpy()).transpose(0, 2, 3, 4, 1)


def from_cl(y) -> np.ndarray:
    return np.asarray(y).transpose(0, 4, 1, 2, 3)


def torch_stream(module, chunks):
    """Run a diffusers block over chunks sharing one feat_cache, as AutoencoderKLWan does."""
    cache, outs = [None] * 8, []
    with torch.no_grad():
        for c in chunks:
            outs.append(module(c, feat_cache=cache, feat_idx=[0]))
    return torch.cat(outs, 2).numpy()


def jax_stream(module, chunks):
    cache, outs = None, []
    for c in chunks:
        y, cache = module(to_cl(c), cache)
        outs.append(from_cl(y))
    return np.concatenate(outs, 2)


# -- config -------------------------------------------------------------------------------------


def test_config_from_saved_json(saved):
    _, folder = saved
    cfg = WanVAEConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    assert cfg == WanVAEConfig.tiny()
    assert (cfg.spatial_compression, cfg.temporal_compression) == (8, 4)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"is_residual": True}, "is_residual"),
        ({"attn_scales": [0.5]}, "attn_scales"),
        ({"patch_size": 2}, "patch_size"),
        ({"dim_mult": "1244"}, "dim_mult"),  # unknown keys only warn (tests/test_config_keys.py)
        ({"latents_std": [1.0]}, "latents_std"),
        ({"scale_factor_spatial": 16}, "scale_factor_spatial"),
        ({"temperal_downsample": [True, True, True]}, "temporal_downsample"),
    ],
)
def test_config_rejects_unsupported(change, match):
    d = {"_class_name": "AutoencoderKLWan", "base_dim": 8, "z_dim": 4, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
    with pytest.raises(ValueError, match=match):
        WanVAEConfig.from_hf_config({**d, **change})


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"decoder_base_dim": 64, "num_res_blocks": 1, "temperal_downsample": [True, False, True]}],
    ids=["wan21", "variant"],
)
def test_key_table_matches_diffusers_layout(kwargs):
    """The table at real size against diffusers' model built on the meta device (no weights)."""
    with torch.device("meta"):
        ref = TorchWan(**kwargs)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}

    class MetaSource:
        def keys(self):
            return list(shapes)

        def shape(self, key):
            return shapes[key]

        def read(self, key):  # pragma: no cover - never read
            raise AssertionError(key)

    cfg = WanVAEConfig.from_hf_config(dict(ref.config))
    if not kwargs:
        assert cfg == WanVAEConfig.wan21()
    _, specs, _, _ = abstract_params(nnx.eval_shape(lambda: AutoencoderKLWan(cfg, rngs=nnx.Rngs(0))))
    rules = check_rules(vae_rules(cfg), MetaSource(), specs)
    assert len(rules) == len(shapes)


def test_load_model_through_registry(saved):
    _, folder = saved
    assert isinstance(load_model(folder), AutoencoderKLWan)


# -- layers -------------------------------------------------------------------------------------


def test_resnet_block_streaming(pair):
    ref, ours = pair
    # encoder.down_blocks[2] maps 8 -> 16 channels, so it has the 1x1x1 conv shortcut
    assert ours.encoder.down_blocks[2].conv_shortcut is not None
    torch.manual_seed(1)
    x = torch.randn(2, 8, 6, 8, 8)
    chunks = [x[:, :, :1], x[:, :, 1:5], x[:, :, 5:6]]  # a 1-frame chunk after a 4-frame one exercises the cache
    got = jax_stream(ours.encoder.down_blocks[2], chunks)
    want = torch_stream(ref.encoder.down_blocks[2], chunks)
    assert rel_l2(got, want) <= LAYER_TOL
    # one pass without a cache = diffusers' cache-free forward
    with torch.no_grad():
        whole = ref.encoder.down_blocks[2](x).numpy()
    assert rel_l2(from_cl(ours.encoder.down_blocks[2](to_cl(x))[0]), whole) <= LAYER_TOL


def test_attention_block(pair):
    ref, ours = pair
    torch.manual_seed(2)
    x = torch.randn(2, 32, 3, 4, 4)
    with torch.no_grad():
        want = ref.decoder.mid_block.attentions[0](x).numpy()
    assert rel_l2(from_cl(ours.decoder.mid_block.attentions[0](to_cl(x))), want) <= LAYER_TOL


@pytest.mark.parametrize(
    "path, dim, size, chunk_frames",
    [
        ("decoder.up_blocks.0.upsamplers.0", 32, 4, [1, 1, 1, 1]),  # upsample3d, one latent frame a chunk
        ("decoder.up_blocks.2.upsamplers.0", 16, 8, [1, 4, 4]),  # upsample2d
        ("encoder.down_blocks.3", 16, 16, [1, 4, 4]),  # downsample3d after the first (2d) stage
        ("encoder.down_blocks.5", 32, 8, [1, 2, 2]),  # second downsample3d sees 2-frame chunks
    ],
)
def test_resample_streaming(pair, path, dim, size, chunk_frames):
    ref, ours = pair
    t_mod, j_mod = ref, ours
    expect_mode = {"de": "upsample", "en": "downsample"}[path[:2]]
    for part in path.split("."):
        t_mod = t_mod[int(part)] if part.isdigit() else getattr(t_mod, part)
        j_mod = j_mod[int(part)] if part.isdigit() else getattr(j_mod, part)
    assert j_mod.mode.startswith(expect_mode) and t_mod.mode == j_mod.mode
    torch.manual_seed(3)
    x = torch.randn(1, dim, sum(chunk_frames), size, size)
    bounds = np.cumsum([0, *chunk_frames])
    chunks = [x[:, :, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    assert rel_l2(jax_stream(j_mod, chunks), torch_stream(t_mod, chunks)) <= LAYER_TOL


# -- whole model --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, frames", [(2, 9), (1, 1)])
def test_encode_parity(pair, batch, frames):
    ref, ours = pair
    torch.manual_seed(4)
    x = torch.rand(batch, 3, frames, 32, 32) * 2 - 1
    with torch.no_grad():
        want = ref._encode(x).numpy()
    got = np.asarray(jitted(ours, "encode_moments")(jnp.asarray(x.numpy())))
    assert got.shape == want.shape == (batch, 8, 1 + (frames - 1) // 4, 4, 4)
    assert rel_l2(got, want) <= MODEL_TOL


def test_latents_from_moments_matches_diagonal_gaussian():
    torch.manual_seed(7)
    moments = torch.randn(2, 8, 3, 4, 4) * 3
    posterior = DiagonalGaussianDistribution(moments)
    got_mean = np.asarray(latents_from_moments(jnp.asarray(moments.numpy())))
    np.testing.assert_array_equal(got_mean, posterior.mode().numpy())
    key = jax.random.key(0)
    sample = np.asarray(latents_from_moments(jnp.asarray(moments.numpy()), key=key))
    noise = np.asarray(jax.random.normal(key, got_mean.shape, jnp.float32))
    expect = posterior.mean.numpy() + posterior.std.numpy() * noise  # diffusers' sample() with this noise
    assert rel_l2(sample, expect) <= LAYER_TOL


@pytest.mark.parametrize("latent_frames", [3, 1])
def test_decode_parity(pair, latent_frames):
    ref, ours = pair
    torch.manual_seed(5)
    z = torch.randn(1, 4, latent_frames, 4, 4)
    with torch.no_grad():
        want = ref.decode(z).sample.numpy()
    got = np.asarray(jitted(ours, "decode")(jnp.asarray(z.numpy())))
    assert got.shape == want.shape == (1, 3, 1 + 4 * (latent_frames - 1), 32, 32)
    assert np.mean(np.abs(want) >= 1.0) < 0.05, "reference saturates; parity would be vacuous"
    assert rel_l2(got, want) <= MODEL_TOL


# -- normalisation and input checks -------------------------------------------------------------


def test_normalize_latents_matches_longcat_pipeline():
    cfg = WanVAEConfig.tiny()
    torch.manual_seed(6)
    z = torch.randn(2, 4, 3, 4, 4)
    # LongCat-Video pipeline_longcat_video.py normalize_latents / denormalize_latents
    mean = torch.tensor(cfg.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, 4, 1, 1, 1)
    want_norm = ((z - mean) * inv_std).numpy()
    want_denorm = (z / inv_std + mean).numpy()
    got_norm = np.asarray(normalize_latents(jnp.asarray(z.numpy()), cfg))
    got_denorm = np.asarray(denormalize_latents(jnp.asarray(z.numpy()), cfg))
    np.testing.assert_allclose(got_norm, want_norm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_denorm, want_denorm, rtol=1e-6, atol=1e-6)
    roundtrip = denormalize_latents(normalize_latents(jnp.asarray(z.numpy()), cfg), cfg)
    np.testing.assert_allclose(np.asarray(roundtrip), z.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="latents.shape"):
        normalize_latents(jnp.zeros((1, 16, 1, 2, 2)), cfg)


def test_bad_inputs_raise(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="F=6"):
        ours.encode(jnp.zeros((1, 3, 6, 32, 32)))
    with pytest.raises(ValueError, match="frames.shape"):
        ours.encode(jnp.zeros((1, 4, 5, 32, 32)))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(jnp.zeros((1, 3, 5, 36, 32)))
    with pytest.raises(ValueError, match="latents.shape"):
        ours.decode(jnp.zeros((1, 16, 2, 4, 4)))
