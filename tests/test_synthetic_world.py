"""The synthetic world (jaxvid/synthetic/world.py), its detector and the NNX -> source-key export.

The detector is checked against the world's own ground truth (the scene that was rendered), and
the export against jaxvid's real loader (the written safetensors must load back to the same
parameters through the key tables).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from jaxvid.synthetic import world
from jaxvid.synthetic.detect import detect, detect_one


def test_captions_follow_the_template():
    one = world.Scene("black", (world.ShapeSpec("red", "circle", "right", 10, 10),))
    assert world.caption(one) == "a red circle moving right on a black background"
    two = world.Scene("gray", (world.ShapeSpec("green", "square", "still", 10, 10),
                               world.ShapeSpec("white", "triangle", "up", 30, 30)))
    assert world.caption(two) == "a green square standing still and a white triangle moving up on a gray background"


def test_scene_rejects_invisible_or_unknown_shapes():
    with pytest.raises(ValueError, match="invisible"):
        world.Scene("white", (world.ShapeSpec("white", "circle", "left", 10, 10),))
    with pytest.raises(ValueError, match="colour"):
        world.ShapeSpec("purple", "circle", "left", 10, 10)


def test_held_out_combinations_are_composable_from_training_parts():
    combos = world.one_shape_combos()
    assert len(combos) == 210 and set(world.HELD_OUT) <= set(combos)
    train = [c for c in combos if c not in set(world.HELD_OUT)]
    for held in world.HELD_OUT:  # every pair of attributes of a held-out combo occurs in training
        for i, j in itertools.combinations(range(4), 2):
            assert any(t[i] == held[i] and t[j] == held[j] for t in train), (held, i, j)
    for values, k in ((world.COLOURS, 0), (world.SHAPES, 1), (world.MOTIONS, 2), (world.BACKGROUNDS, 3)):
        assert {h[k] for h in world.HELD_OUT} == set(values)


def test_training_stream_is_seeded_and_skips_held_out():
    a = [s for _, s in zip(range(300), world.iterate_scenes(7))]
    b = [s for _, s in zip(range(300), world.iterate_scenes(7))]
    assert a == b
    assert not any(world.is_held_out(s) for s in a)
    assert any(len(s.shapes) == 2 for s in a)
    np.testing.assert_array_equal(world.render_batch(a[:4]), world.render_batch(b[:4]))


def test_render_draws_the_shape_where_it_should_be():
    scene = world.Scene("gray", (world.ShapeSpec("blue", "square", "right", 12.0, 20.0),))
    video = world.render(scene)
    assert video.shape == (world.FRAMES, world.SIZE, world.SIZE, 3) and video.dtype == np.uint8
    blue = np.all(video == np.array([0, 0, 255], np.uint8), axis=-1)
    for f in range(world.FRAMES):
        ys, xs = np.nonzero(blue[f])
        assert len(xs) == world.SHAPE_SIZE ** 2  # a SHAPE_SIZE-pixel square at integer centre
        assert xs.mean() + 0.5 == pytest.approx(12.0 + world.SPEED * f)
        assert ys.mean() + 0.5 == pytest.approx(20.0)


def test_detector_reads_every_one_shape_combination_of_the_world():
    rng = np.random.default_rng(0)
    combos = world.one_shape_combos()
    videos = world.render_batch([world.scene_from_combo(c, rng) for c in combos])
    wrong = []
    for combo, video in zip(combos, videos):
        d = detect_one(video)
        if d is None or (d.colour, d.shape, d.motion) != combo[:3]:
            wrong.append((combo, d))
    assert not wrong, wrong[:3]


def test_detector_reads_two_shape_scenes():
    rng = np.random.default_rng(1)
    scenes = [world.sample_scene(rng, two_shape_prob=1.0, allow_held_out=True) for _ in range(60)]
    for scene, video in zip(scenes, world.render_batch(scenes)):
        background, found = detect(video)
        assert background == scene.background
        assert sorted((d.colour, d.shape, d.motion) for d in found) == sorted(
            (s.colour, s.shape, s.motion) for s in scene.shapes)


def test_detector_sees_nothing_in_a_plain_video():
    for background in world.BACKGROUNDS.values():
        assert detect_one(np.broadcast_to(np.asarray(background, np.uint8), (9, 48, 48, 3)).copy()) is None


def test_export_round_trips_through_the_real_loader(tmp_path):
    """NNX params -> source keys -> safetensors -> jaxvid.models.loading.load_model -> the same params."""
    from flax import nnx

    from convert.keymaps.cogvideox import diffusers_shapes, transformer_rules
    from convert.keymaps.t5 import encoder_rules
    from convert.keymaps.vae_cogvideox import vae_rules
    from convert.safetensors_io import write_safetensors
    from jaxvid.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3D
    from jaxvid.models.loading import load_model, model_specs
    from jaxvid.models.t5 import T5Config, T5Encoder
    from jaxvid.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
    from jaxvid.synthetic.cogvideox import _t5_hf_config, _vae_hf_config, _write_json, source_shapes
    from jaxvid.synthetic.export import flat_params, to_source

    tcfg = CogVideoXConfig.tiny(use_rotary_positional_embeddings=False, num_layers=2)  # Conv2d patch + bias
    vcfg = CogVideoXVAEConfig.tiny()
    t5cfg = T5Config.tiny()
    cases = [
        ("transformer", CogVideoXTransformer3D(tcfg, rngs=nnx.Rngs(0)), transformer_rules(tcfg), diffusers_shapes(tcfg),
         {**tcfg.to_hf_config()}),
        ("vae", AutoencoderKLCogVideoX(vcfg, rngs=nnx.Rngs(1)), vae_rules(vcfg), None, _vae_hf_config(vcfg)),
        ("text_encoder", T5Encoder(t5cfg, rngs=nnx.Rngs(2)), encoder_rules(t5cfg), None, _t5_hf_config(t5cfg)),
    ]
    for name, model, rules, shapes, hf_config in cases:
        if shapes is None:
            shapes = source_shapes(rules, model_specs(type(model), model.cfg))
        folder = tmp_path / name
        folder.mkdir()
        write_safetensors(folder / "model.safetensors", to_source(model, rules, shapes))
        _write_json(folder / "config.json", hf_config)
        loaded = flat_params(load_model(folder))
        original = flat_params(model)
        assert loaded.keys() == original.keys()
        for key in original:
            np.testing.assert_array_equal(loaded[key], original[key], err_msg=f"{name}: {key}")


def _tokenizer(tmp_path):
    from jaxvid.synthetic.train import _tokenizer

    return _tokenizer(tmp_path / "tokenizer")


def test_device_render_matches_the_numpy_world():
    """The on-device renderer (training batches) draws exactly what world.render_batch draws."""
    import jax.numpy as jnp

    from jaxvid.synthetic.device_data import render, scene_arrays

    rng = np.random.default_rng(3)
    scenes = [world.sample_scene(rng, two_shape_prob=0.5, allow_held_out=True) for _ in range(24)]
    got = np.asarray(render(**{k: jnp.asarray(v) for k, v in scene_arrays(scenes).items()}))
    np.testing.assert_array_equal(got, world.render_batch(scenes).astype(np.float32))


def test_caption_table_rows_are_the_tokenized_world_captions(tmp_path):
    from jaxvid.synthetic.device_data import CaptionTable, caption_index

    tokenize = _tokenizer(tmp_path)
    table = CaptionTable.build(tokenize)
    rng = np.random.default_rng(4)
    scenes = [world.sample_scene(rng, two_shape_prob=0.5, allow_held_out=True) for _ in range(40)]
    for scene in scenes:
        row = caption_index([(list(world.COLOURS).index(s.colour), world.SHAPES.index(s.shape),
                              world.MOTIONS.index(s.motion)) for s in scene.shapes],
                            list(world.BACKGROUNDS).index(scene.background))
        assert CaptionTable.text(row) == world.caption(scene)
        np.testing.assert_array_equal(table.ids[row], tokenize([world.caption(scene)]).input_ids[0])
    np.testing.assert_array_equal(table.ids[-1], tokenize([""]).input_ids[0])


def test_device_batches_are_seeded_and_read_back_as_their_captions(tmp_path):
    """Each sampled video, read by the detector, shows what its caption says; no held-out combination occurs."""
    import jax
    import jax.numpy as jnp

    from jaxvid.synthetic.device_data import CaptionTable, sample_batch

    table = CaptionTable.build(_tokenizer(tmp_path))
    rows = {tuple(r): i for i, r in enumerate(table.ids)}
    ids = jnp.asarray(table.ids)
    make = jax.jit(lambda key, dropout: sample_batch(key, 24, ids, dropout=dropout, two_shape_prob=0.5))
    pixels, tokens, masks = (np.asarray(x) for x in make(jax.random.key(0), 0.0))
    again = make(jax.random.key(0), 0.0)
    np.testing.assert_array_equal(pixels, np.asarray(again[0]))
    assert pixels.shape == (24, 3, world.FRAMES, world.SIZE, world.SIZE) and masks.shape == (24, world.FRAMES,
                                                                                             world.SIZE, world.SIZE)
    held = {f"a {c} {s} {'standing still' if m == 'still' else 'moving ' + m} on a {b} background"
            for c, s, m, b in world.HELD_OUT}
    two = 0
    for b in range(24):
        cap = CaptionTable.text(rows[tuple(tokens[b])])
        video = np.round((pixels[b].transpose(1, 2, 3, 0) + 1.0) * 127.5).astype(np.uint8)
        background, found = detect(video)
        said = sorted(cap.split(" on a ")[0].split(" and "))
        seen = sorted(f"a {d.colour} {d.shape} {'standing still' if d.motion == 'still' else 'moving ' + d.motion}"
                      for d in found)
        assert cap.endswith(f"on a {background} background") and said == seen, (cap, seen)
        assert not any(h.split(" on a ")[0] in cap and cap.endswith(h.split(" on a ")[1]) for h in held), cap
        two += len(found) == 2
    assert 0 < two < 24
    # dropout replaces captions by "" (the table's last row)
    _, dropped, _ = make(jax.random.key(1), 0.999)
    assert (np.asarray(dropped) == table.ids[-1]).all()


def test_latent_mask_follows_the_causal_vae_frame_grouping():
    pytest.importorskip("optax")
    from jaxvid.synthetic.train import latent_mask

    rng = np.random.default_rng(0)
    masks = rng.random((2, 9, 16, 16)) < 0.02
    got = np.asarray(latent_mask(masks, 4, 4))
    groups = [[0], [1, 2, 3, 4], [5, 6, 7, 8]]  # latent frame j <- pixel frames, as the causal VAE encodes them
    want = np.zeros((2, 3, 4, 4), bool)
    for b in range(2):
        for j, frames in enumerate(groups):
            for f in frames:
                for y, x in zip(*np.nonzero(masks[b, f])):
                    want[b, j, y // 4, x // 4] = True
    np.testing.assert_array_equal(got, want)


def test_latent_pool_rows_are_the_encoded_training_videos():
    """The DiT's latent pool holds, row-aligned, the VAE encoding (scaled means), latent mask and caption row
    of the videos device_data draws for its seed: chunk c is sample_indexed_batch(fold_in(key, c))."""
    pytest.importorskip("optax")
    import dataclasses

    import jax
    from flax import nnx

    from jaxvid.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
    from jaxvid.synthetic.device_data import EMPTY_CAPTION, sample_indexed_batch
    from jaxvid.synthetic.train import TrainConfig, latent_mask, latent_pool

    vcfg = CogVideoXVAEConfig(latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
                              sample_height=world.SIZE, sample_width=world.SIZE, scaling_factor=0.5)
    vae = AutoencoderKLCogVideoX(vcfg, rngs=nnx.Rngs(0))
    cfg = TrainConfig(seed=3, pool=5, pool_chunk=3, two_shape_prob=0.5)
    pool = latent_pool(cfg, vae)
    assert len(pool) == 6 and pool.latents.shape == (6, 3, 4, world.SIZE // 4, world.SIZE // 4)
    assert pool.masks.shape == (6, 3, world.SIZE // 4, world.SIZE // 4)
    for c in (1,):  # the second chunk: its rows are offset by pool_chunk and its key folds in 1
        pixels, captions, masks = sample_indexed_batch(jax.random.fold_in(jax.random.key(cfg.seed * 4 + 5), c), 3,
                                                       two_shape_prob=0.5)
        want = np.asarray(vae.encode(pixels).mean).transpose(0, 2, 1, 3, 4) * 0.5
        rows = slice(3 * c, 3 * c + 3)
        np.testing.assert_allclose(np.asarray(pool.latents[rows]), want, rtol=1e-4, atol=1e-5)  # jit vs eager
        np.testing.assert_array_equal(np.asarray(pool.masks[rows]), np.asarray(latent_mask(masks, 4, 4)))
        np.testing.assert_array_equal(np.asarray(pool.captions[rows]), np.asarray(captions))
    assert (np.asarray(pool.captions) != EMPTY_CAPTION).all()
    assert dataclasses.is_dataclass(pool)
