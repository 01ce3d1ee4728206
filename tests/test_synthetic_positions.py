"""The default model's DiT knows absolute positions (jaxvid.synthetic.train: model_configs,
init_position_table), checked against diffusers, the reference the shipped folder is read by.

With 3D RoPE alone the DiT only sees relative offsets, so from pure noise it cannot draw a shape
where the caption's motion puts it; the session-6 model failed that way. The default model adds
diffusers' learned position table (`use_learned_positional_embeddings`, CogVideoX-5b-I2V's option).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def test_position_table_starts_as_diffusers_patch_embed_table():
    """init_position_table == the table diffusers' CogVideoXPatchEmbed builds for the same config
    (zeros over the 226 text slots, the 3D sincos table with the config's interpolation scales)."""
    from flax import nnx

    from jaxvid.models.cogvideox import CogVideoXTransformer3D
    from jaxvid.synthetic.train import init_position_table, model_configs

    tcfg, _, _ = model_configs(dit_layers=1, dit_heads=1)
    assert tcfg.use_learned_positional_embeddings and tcfg.use_rotary_positional_embeddings
    model = CogVideoXTransformer3D(tcfg, rngs=nnx.Rngs(0))
    init_position_table(model)
    from diffusers.models.embeddings import CogVideoXPatchEmbed

    ref = CogVideoXPatchEmbed(
        patch_size=tcfg.patch_size, in_channels=tcfg.in_channels, embed_dim=tcfg.inner_dim,
        text_embed_dim=tcfg.text_embed_dim, bias=tcfg.patch_bias, sample_width=tcfg.sample_width,
        sample_height=tcfg.sample_height, sample_frames=tcfg.sample_frames,
        temporal_compression_ratio=tcfg.temporal_compression_ratio, max_text_seq_length=tcfg.max_text_seq_length,
        spatial_interpolation_scale=tcfg.spatial_interpolation_scale,
        temporal_interpolation_scale=tcfg.temporal_interpolation_scale,
        use_positional_embeddings=False, use_learned_positional_embeddings=True,
    ).pos_embedding.numpy()
    got = np.asarray(model.patch_embed.pos_embedding[...])
    assert got.shape == ref.shape == (1, 226 + 3 * 12 * 12, tcfg.inner_dim)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="use_learned_positional_embeddings"):
        init_position_table(CogVideoXTransformer3D(model_configs(dit_layers=1, dit_heads=1, absolute_positions=False)[0],
                                                   rngs=nnx.Rngs(0)))


def test_written_transformer_runs_like_diffusers_with_its_position_table(tmp_path):
    """The default model's transformer (a trained-looking position table, not the init) written as the
    training script writes it, loaded by diffusers and run with CogVideoXPipeline's own rotary
    embeddings, gives jaxvid's output; and the table matters (the output moves when it is zeroed)."""
    import jax.numpy as jnp
    from flax import nnx

    from convert.keymaps.cogvideox import diffusers_shapes, transformer_rules
    from convert.safetensors_io import write_safetensors
    from jaxvid.models.cogvideox import CogVideoXTransformer3D
    from jaxvid.synthetic.cogvideox import _DIFFUSERS_VERSION, _write_json
    from jaxvid.synthetic.export import to_source
    from jaxvid.synthetic.train import init_position_table, model_configs

    tcfg, _, _ = model_configs(dit_layers=1, dit_heads=1)
    model = CogVideoXTransformer3D(tcfg, rngs=nnx.Rngs(1))
    init_position_table(model)
    rng = np.random.default_rng(0)
    table = np.asarray(model.patch_embed.pos_embedding[...])
    model.patch_embed.pos_embedding[...] = jnp.asarray(table + 0.1 * rng.standard_normal(table.shape, np.float32))
    (tmp_path / "transformer").mkdir()
    write_safetensors(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors",
                      to_source(model, transformer_rules(tcfg), diffusers_shapes(tcfg)))
    _write_json(tmp_path / "transformer" / "config.json", {**tcfg.to_hf_config(), "_diffusers_version": _DIFFUSERS_VERSION})
    ref = diffusers.CogVideoXTransformer3DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.float32).eval()

    class _Pipe:  # what _prepare_rotary_positional_embeddings reads of a pipeline
        vae_scale_factor_spatial = 4
        transformer = ref

    rope = diffusers.CogVideoXPipeline._prepare_rotary_positional_embeddings(_Pipe(), 48, 48, 3, torch.device("cpu"))
    x = rng.standard_normal((2, 3, 8, 12, 12), np.float32)
    text = rng.standard_normal((2, 226, 64), np.float32)
    t = np.array([999, 50])
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(text), torch.from_numpy(t), image_rotary_emb=rope,
                   return_dict=False)[0].numpy()
    got = np.asarray(model(jnp.asarray(x), jnp.asarray(text), jnp.asarray(t)))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    model.patch_embed.pos_embedding[...] = jnp.zeros_like(model.patch_embed.pos_embedding[...])
    moved = np.asarray(model(jnp.asarray(x), jnp.asarray(text), jnp.asarray(t)))
    assert np.abs(moved - want).max() > 1e-2 * scale
