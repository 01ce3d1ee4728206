"""CogVideoX VAE parity against diffusers' AutoencoderKLCogVideoX (tiny random config, fp32, CPU).

The diffusers model is saved with save_pretrained and loaded through jaxvid's key table, so the
table is tested too. Shapes are small but cover: the scanned frame batches (7 latents -> 3, 2, 2;
25 frames -> 9, 8, 8), odd/even temporal up/down sampling, and spatial tiling with overlap on
both axes (3 x 3 tiles of 4 distinct shapes, blended).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from convert.keymaps.vae_cogvideox import vae_rules  # noqa: E402
from convert.safetensors_io import SafetensorsReader  # noqa: E402
from jaxvid.models.loading import fill_model  # noqa: E402
from jaxvid.models.vae_cogvideox import (  # noqa: E402
    AutoencoderKLCogVideoX,
    CogVideoXVAEConfig,
    CogVideoXVAETiling,
)

# Tiles of 16 px (4 latents) overlapping by 1/4 in height and 1/2 in width: on a 32 x 24 video
# this gives 3 x 3 tiles with edge tiles of other shapes, and blends of 1-2 latents / 4-8 px.
TILE = dict(sample_min_height=16, sample_min_width=16, overlap_factor_height=1 / 4, overlap_factor_width=1 / 2)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers model, jaxvid model) sharing random weights (norm affines randomised too)."""
    cfg = CogVideoXVAEConfig.tiny()
    torch.manual_seed(0)
    pt = diffusers.AutoencoderKLCogVideoX(
        block_out_channels=cfg.block_out_channels,
        latent_channels=cfg.latent_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        sample_height=cfg.sample_height,
        sample_width=cfg.sample_width,
        down_block_types=("CogVideoXDownBlock3D",) * len(cfg.block_out_channels),
        up_block_types=("CogVideoXUpBlock3D",) * len(cfg.block_out_channels),
    ).eval()
    with torch.no_grad():
        for name, p in pt.named_parameters():
            if p.ndim == 1:  # biases and norm affines start at 0 / 1: make them matter
                p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("vae_cogvideox")
    pt.save_pretrained(path)
    jcfg = CogVideoXVAEConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    assert jcfg == cfg
    jx = fill_model(AutoencoderKLCogVideoX, jcfg, vae_rules(jcfg), SafetensorsReader(path))
    return pt, jx


def _rand(*shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encoder_resnet_block_parity(models):
    pt, jx = models
    # First down block's resnet; the second block's first resnet changes width (1x1x1 shortcut).
    for pt_block, jx_block, cin in (
        (pt.encoder.down_blocks[0].resnets[0], jx.encoder.down_blocks[0].resnets[0], 8),
        (pt.encoder.down_blocks[1].resnets[0], jx.encoder.down_blocks[1].resnets[0], 8),
    ):
        x1, x2 = _rand(1, cin, 5, 8, 8, seed=1), _rand(1, cin, 4, 8, 8, seed=2)
        with torch.no_grad():
            r1, cache = pt_block(x1)
            r2, _ = pt_block(x2, conv_cache=cache)  # second frame batch, through the conv cache
        j1, jcache = jx_block(jnp.asarray(x1.permute(0, 2, 3, 4, 1).numpy()))
        j2, _ = jx_block(jnp.asarray(x2.permute(0, 2, 3, 4, 1).numpy()), None, jcache)
        for j, r in ((j1, r1), (j2, r2)):
            assert rel_l2(jnp.transpose(j, (0, 4, 1, 2, 3)), r.numpy()) <= 1e-5


def test_decoder_resnet_block_parity(models):
    pt, jx = models
    pt_block, jx_block = pt.decoder.up_blocks[1].resnets[0], jx.decoder.up_blocks[1].resnets[0]
    f = _rand(1, 16, 5, 8, 8, seed=3)  # odd frame count: zq frame 0 maps to frame 0 alone
    zq = _rand(1, 4, 3, 4, 4, seed=4)
    with torch.no_grad():
        ref, _ = pt_block(f, zq=zq)
    out, _ = jx_block(jnp.asarray(f.permute(0, 2, 3, 4, 1).numpy()), jnp.asarray(zq.permute(0, 2, 3, 4, 1).numpy()))
    assert rel_l2(jnp.transpose(out, (0, 4, 1, 2, 3)), ref.numpy()) <= 1e-5


def test_decode_untiled_jit(models):
    pt, jx = models
    z = torch.randn(1, 4, 7, 8, 8, generator=torch.Generator().manual_seed(5))  # batches 3, 2, 2
    with torch.no_grad():
        ref = pt.decode(z).sample.numpy()
    out = nnx.jit(lambda m, z: m.decode(z))(jx, jnp.asarray(z.numpy()))
    assert out.shape == ref.shape == (1, 3, 25, 32, 32)
    assert rel_l2(out, ref) <= 1e-4


def test_encode_untiled_jit(models):
    pt, jx = models
    x = _rand(1, 3, 25, 16, 16, seed=6)  # batches 9, 8, 8 frames
    with torch.no_grad():
        ref = pt.encode(x).latent_dist
    post = nnx.jit(lambda m, x: m.encode(x))(jx, jnp.asarray(x.numpy()))
    assert post.mean.shape == tuple(ref.mean.shape) == (1, 4, 7, 4, 4)
    assert rel_l2(post.mean, ref.mean.numpy()) <= 1e-4
    assert rel_l2(post.logvar, ref.logvar.numpy()) <= 1e-4


@pytest.fixture()
def tiled_pt(models):
    pt, _ = models
    pt.enable_tiling(
        tile_sample_min_height=TILE["sample_min_height"],
        tile_sample_min_width=TILE["sample_min_width"],
        tile_overlap_factor_height=TILE["overlap_factor_height"],
        tile_overlap_factor_width=TILE["overlap_factor_width"],
    )
    yield pt
    pt.disable_tiling()


@pytest.mark.slow  # one of the slowest on 2 cores (issue 16 item 17); -m 'not slow' skips
def test_decode_tiled(models, tiled_pt):
    _, jx = models
    z = torch.randn(1, 4, 3, 8, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = tiled_pt.decode(z).sample.numpy()
        tiled_pt.use_tiling = False
        untiled = tiled_pt.decode(z).sample.numpy()
    # Tiling really happens at these sizes: tiles see less context, so the result differs.
    assert rel_l2(untiled, ref) > 1e-2
    out = nnx.jit(lambda m, z: m.decode(z, tiling=CogVideoXVAETiling(**TILE)))(jx, jnp.asarray(z.numpy()))
    assert out.shape == ref.shape == (1, 3, 9, 32, 24)
    assert rel_l2(out, ref) <= 1e-4


@pytest.mark.slow  # four decoder compiles (in parallel threads)
def test_decode_tiled_one_program_per_tile_shape(models, tiled_pt):
    """The pipelines' tiled decode: one compiled program per tile shape (origin traced), reused for
    every tile of that shape, then a stitching program; diffusers' tiled_decode is the reference."""
    from jaxvid.pipelines.cogvideox import _decode_tile
    from jaxvid.pipelines.loop import CompiledFunction

    _, jx = models
    z = torch.randn(1, 4, 3, 8, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = tiled_pt.decode(z).sample.numpy()
    layout = jx.decode_layout(tuple(z.shape), CogVideoXVAETiling(**TILE))
    assert layout is not None and len(layout.shapes) == 9 and len(layout.groups()) == 4
    assert jx.decode_layout((1, 4, 3, 4, 4), CogVideoXVAETiling(**TILE)) is None  # fits one tile
    assert jx.decode_layout(tuple(z.shape), None) is None

    graphdef, state = nnx.split(jx)
    latents = jnp.asarray(z.numpy()).transpose(0, 2, 1, 3, 4)  # the pipeline's [B, F, C, h, w]
    decode_tile = CompiledFunction(_decode_tile, static_argnums=(0, 4, 5), name="tile")

    def args(origin, size):
        return graphdef, state, latents, (np.int32(origin[0]), np.int32(origin[1])), size, 1.0

    decode_tile.prepare_many([args(o, s) for o, s in layout.shapes])
    assert decode_tile.num_compiled == 4  # one executable per tile shape, not per tile
    tiles = {o: decode_tile(*args(o, s)) for o, s in layout.shapes}
    assert decode_tile.num_compiled == 4
    out = jax.jit(AutoencoderKLCogVideoX.stitch_decoded, static_argnums=1)(tiles, layout)
    assert out.shape == ref.shape == (1, 3, 9, 32, 24)
    assert rel_l2(out, ref) <= 1e-4


@pytest.mark.slow  # one of the slowest on 2 cores (issue 16 item 17); -m 'not slow' skips
def test_encode_tiled(models, tiled_pt):
    _, jx = models
    x = _rand(1, 3, 9, 32, 24, seed=8)
    with torch.no_grad():
        ref = tiled_pt.encode(x).latent_dist
        tiled_pt.use_tiling = False
        untiled = tiled_pt.encode(x).latent_dist
    assert rel_l2(untiled.mean.numpy(), ref.mean.numpy()) > 1e-2
    post = nnx.jit(lambda m, x: m.encode(x, tiling=CogVideoXVAETiling(**TILE)))(jx, jnp.asarray(x.numpy()))
    assert post.mean.shape == tuple(ref.mean.shape) == (1, 4, 3, 8, 6)
    assert rel_l2(post.mean, ref.mean.numpy()) <= 1e-4
    assert rel_l2(post.logvar, ref.logvar.numpy()) <= 1e-4


def test_presets_and_config_errors():
    assert CogVideoXVAEConfig.cogvideox_2b().scaling_factor == pytest.approx(1.15258426)
    assert CogVideoXVAEConfig.cogvideox_5b().scaling_factor == pytest.approx(0.7)
    assert CogVideoXVAEConfig.cogvideox_2b().spatial_compression == 8
    tiling = CogVideoXVAETiling.default(CogVideoXVAEConfig.cogvideox_2b())
    assert (tiling.sample_min_height, tiling.sample_min_width) == (240, 360)
    with pytest.raises(ValueError, match="use_quant_conv"):
        CogVideoXVAEConfig.from_hf_config({"use_quant_conv": True})
    with pytest.raises(ValueError, match="norm_eps"):  # unknown keys only warn (tests/test_config_keys.py)
        CogVideoXVAEConfig.from_hf_config({"norm_eps": "1e-6"})
    with pytest.raises(ValueError, match="norm_num_groups"):
        CogVideoXVAEConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ValueError, match="overlap_factor_width"):
        CogVideoXVAETiling(sample_min_height=16, sample_min_width=16, overlap_factor_width=1.0)


def test_bad_inputs_raise():
    model = nnx.eval_shape(lambda: AutoencoderKLCogVideoX(CogVideoXVAEConfig.tiny(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="z: expected"):
        model.decode(jnp.zeros((1, 3, 2, 4, 4)))
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(jnp.zeros((1, 3, 1, 10, 8)))


# ------------------------------------------------------------- tiling geometry (issue 16, item 10)

def _upstream_decode_geometry(t: CogVideoXVAETiling, s: int) -> dict:
    """diffusers' tiled_decode numbers (autoencoder_kl_cogvideox.py), for one axis pair."""
    lat = (int(t.sample_min_height / s), int(t.sample_min_width / s))
    return dict(
        overlap=(int(lat[0] * (1 - t.overlap_factor_height)), int(lat[1] * (1 - t.overlap_factor_width))),
        blend=(int(t.sample_min_height * t.overlap_factor_height), int(t.sample_min_width * t.overlap_factor_width)),
        row_limit=(t.sample_min_height - int(t.sample_min_height * t.overlap_factor_height),
                   t.sample_min_width - int(t.sample_min_width * t.overlap_factor_width)),
    )


def test_released_default_tiling_has_upstream_geometry():
    """For the released VAEs' default tiling, each tile keeps upstream's row_limit and blends as upstream."""
    for cfg in (CogVideoXVAEConfig.cogvideox_2b(), CogVideoXVAEConfig.cogvideox_5b(),
                CogVideoXVAEConfig.cogvideox_2b(sample_height=768, sample_width=1360)):
        tiling = CogVideoXVAETiling.default(cfg)
        model = nnx.eval_shape(lambda: AutoencoderKLCogVideoX(CogVideoXVAEConfig.tiny(), rngs=nnx.Rngs(0)))
        model.cfg = cfg
        grid = model._decode_grid(tiling)
        up = _upstream_decode_geometry(tiling, cfg.spatial_compression)
        assert grid.stride == up["overlap"] and grid.blend == up["blend"] and grid.out_stride == up["row_limit"]


def _nearest_up(s: int):
    """A decoder stand-in that is exact under any tiling: every latent becomes an s x s patch."""
    return lambda z: jnp.repeat(jnp.repeat(z, s, axis=2), s, axis=3)


def _mean_pool(s: int):
    """An encoder stand-in that is exact under any tiling: every s x s patch becomes its mean."""
    def pool(v):
        return v.reshape(v.shape[0], v.shape[1], v.shape[2] // s, s, v.shape[3] // s, s, -1).mean((3, 5))
    return pool


@pytest.mark.parametrize("tile", [TILE, dict(sample_min_height=16, sample_min_width=16),
                                  dict(sample_min_height=16, sample_min_width=12, overlap_factor_height=0.5),
                                  dict(sample_min_height=8, sample_min_width=20, overlap_factor_width=0.6)],
                         ids=["test_tiles", "default_overlap", "half_height", "narrow"])
def test_tiled_output_has_untiled_size_and_content(tile):
    """run_tiled with a pointwise stand-in must equal the untiled result at every size: right size,
    tiles on the right grid positions, blend weights summing to one (fails on upstream's geometry)."""
    from jaxvid.models.vae_cogvideox import run_tiled

    model = nnx.eval_shape(lambda: AutoencoderKLCogVideoX(CogVideoXVAEConfig.tiny(), rngs=nnx.Rngs(0)))
    tiling = CogVideoXVAETiling(**tile)
    dec, enc = model._decode_grid(tiling), model._encode_grid(tiling)
    s = model.cfg.spatial_compression
    rng = np.random.default_rng(0)
    # Jitted: run eagerly, every tile slice of every size would compile a program of its own.
    tiled_decode = jax.jit(lambda z: run_tiled(_nearest_up(s), z, dec))
    tiled_encode = jax.jit(lambda v: run_tiled(_mean_pool(s), v, enc))
    for h, w in [(8, 8), (5, 7), (9, 3), (13, 11), (4, 4), (1, 6)]:
        z = jnp.asarray(rng.standard_normal((1, 2, h, w, 3)), jnp.float32)
        untiled = _nearest_up(s)(z)
        tiled = tiled_decode(z)
        assert tiled.shape == untiled.shape, (h, w)
        np.testing.assert_allclose(tiled, untiled, rtol=1e-6, atol=1e-6)
        # encode: pixels -> latents, the stand-in averages each s x s patch
        tiled_enc = tiled_encode(untiled)
        assert tiled_enc.shape == z.shape, (h, w)
        np.testing.assert_allclose(tiled_enc, z, rtol=1e-5, atol=1e-5)


def test_default_tiling_keeps_the_requested_size(models):
    """The pipeline's default tiling on small videos (32 x 32 came out 36 x 34): sizes as untiled."""
    _, jx = models
    tiling = CogVideoXVAETiling.default(jx.cfg)
    # The tiled runs are real (jitted: eager op-by-op dispatch was most of this test's time); the
    # untiled sizes they must equal come from tracing the untiled model (the shape is all we compare).
    decode = nnx.jit(lambda m, z: m.decode(z, tiling=tiling))
    encode = nnx.jit(lambda m, x: m.encode(x, tiling=tiling).mean)
    for h, w in [(8, 8), (5, 7)]:
        z = jnp.asarray(np.random.default_rng(h).standard_normal((1, 4, 1, h, w)), jnp.float32)
        untiled = nnx.eval_shape(lambda m, z: m.decode(z), jx, z).shape
        assert decode(jx, z).shape == untiled == (1, 3, 1, 4 * h, 4 * w)
    x = jnp.asarray(np.random.default_rng(9).uniform(-1, 1, (1, 3, 1, 32, 28)), jnp.float32)
    untiled = nnx.eval_shape(lambda m, x: m.encode(x).mean, jx, x).shape
    assert encode(jx, x).shape == untiled == (1, 4, 1, 8, 7)
