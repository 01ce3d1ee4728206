"""jaxvid.parallel: mesh options, and sharded == single-device outputs on 8 forced CPU devices.

The multi-device checks run in ONE subprocess (tests/parallel_check.py): XLA_FLAGS must be set
before jax starts, and this worker has started it already. Each case compares a sharded run with the
plain single-device run of the same code on the same weights and inputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxvid.parallel import (
    describe_mesh,
    make_mesh,
    mesh_context,
    mesh_from_options,
    padded_heads,
    parse_mesh_spec,
    sequence_parallel,
)
from jaxvid.parallel.sharding import _fsdp_spec

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # fp32 relative L2, sharded vs single device


def _check(*args: str) -> dict[str, dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel_check.py"), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_all_close(results: dict[str, dict[str, float]], expected: list[str]) -> None:
    missing = sorted(set(expected) - set(results))
    assert not missing, f"cases not run: {missing}"
    bad = {k: v for k, v in results.items() if not v["rel_l2"] <= TOL}
    assert not bad, f"sharded != single device (rel L2 > {TOL}): {bad}"


def test_sharded_equals_single_device():
    """attend() dense / radial (3 heads, padded) / BSA (also with a longer key sequence) on 1, 2, 4, 8
    devices; tiny CogVideoX (radial plan, 3 heads) on cfg=2 x seq=4; tiny LongCat (BSA, 2
    conditioning frames) on seq=8."""
    results = _check()
    expected = [f"attend/{name}/seq={n}" for name in ("dense", "radial", "bsa", "bsa-longer-keys")
                for n in (1, 2, 4, 8)]
    expected += ["cogvideox/radial/cfg=2,seq=4", "longcat/bsa-cond2/seq=8"]
    _assert_all_close(results, expected)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("JAXVID_PARALLEL_FULL") != "1",
                    reason="full device-count matrix takes minutes on CPU: JAXVID_PARALLEL_FULL=1 to run")
def test_full_matrix():
    """Every tiny model x plan on 1, 2, 4 and 8 devices, CFG parallel, FSDP weights, VAE decode split."""
    results = _check("--full")
    expected = [f"cogvideox/{p}/seq={n}" for p in ("dense", "radial") for n in (1, 2, 4, 8)]
    expected += [f"longcat/{p}/seq={n}" for p in ("dense", "bsa", "bsa-cond2") for n in (1, 2, 4, 8)]
    expected += ["longcat/bsa/cfg=2,seq=4", "longcat/bsa/seq=4,fsdp", "vae_cogvideox/height-split/devices=8"]
    _assert_all_close(results, expected)


def test_parse_mesh_spec():
    assert parse_mesh_spec("cfg=2,seq=4") == {"cfg": 2, "seq": 4}
    assert parse_mesh_spec(" seq = 8 ") == {"seq": 8}
    for bad, match in (("tp=2", "not axis=size"), ("cfg=0", "positive integer"), ("cfg=2,cfg=2", "twice"),
                       ("", "axis=size pairs"), ("seq", "not axis=size"), ("seq=x", "positive integer")):
        with pytest.raises(ValueError, match=match):
            parse_mesh_spec(bad)


def test_make_mesh_checks_devices():
    n = jax.device_count()
    mesh = make_mesh(1)
    assert dict(mesh.shape) == {"cfg": 1, "seq": 1}
    assert "cfg=1 x seq=1" in describe_mesh(mesh) and describe_mesh(None).startswith("no mesh")
    assert mesh_from_options(None, None) is None
    assert dict(mesh_from_options(None, "seq=1").shape) == {"cfg": 1, "seq": 1}
    with pytest.raises(ValueError, match=rf"--devices={n + 1}; only {n} device"):
        make_mesh(n + 1)
    with pytest.raises(ValueError, match="--devices=0"):
        make_mesh(0)
    with pytest.raises(ValueError, match="product of the mesh axes"):
        make_mesh(1, axes={"cfg": 1, "seq": 2})
    with pytest.raises(ValueError, match="does not divide"):
        mesh_from_options(1, "cfg=2")
    with pytest.raises(ValueError, match="jax.sharding.Mesh"):
        with mesh_context("seq=2"):
            pass


def test_heads_padding_and_fsdp_layout():
    assert [padded_heads(30, n) for n in (1, 2, 4, 8)] == [30, 30, 32, 32]
    assert padded_heads(48, 8) == 48
    # stacked [layers, d_in, d_out]: never the layer axis; the largest dimension that divides
    assert tuple(_fsdp_spec((42, 3072, 12288), 8, "seq", 0)) == (None, None, "seq")
    assert tuple(_fsdp_spec((42, 3072), 8, "seq", 0)) == (None, "seq")
    assert tuple(_fsdp_spec((42, 30), 8, "seq", 0)) == ()  # nothing divides: replicated
    assert tuple(_fsdp_spec((4096,), 8, "seq", 0)) == ()  # vectors stay replicated


def test_one_device_mesh_runs_the_shard_map_path():
    """A 1-device mesh goes through shard_map (what the single-GPU check exercises) and matches."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 10, 3, 8)) for i in range(3))
    plain = jax.nn.dot_product_attention(q, k, v)
    seen = []

    def attn(q, k, v):
        seen.append(q.shape)
        return jax.nn.dot_product_attention(q, k, v)

    def run(q, k, v):
        return sequence_parallel(attn, q, k, v)

    with mesh_context(make_mesh(1)):
        out = jax.jit(run)(q, k, v)
        sharded_jaxpr = str(jax.make_jaxpr(run)(q, k, v))
    assert jnp.allclose(out, plain, atol=1e-6, rtol=0)
    assert seen[0] == (1, 10, 3, 8)
    assert "shard_map" in sharded_jaxpr
    assert "shard_map" not in str(jax.make_jaxpr(run)(q, k, v))  # no mesh: the plain call


def test_cli_fsdp_needs_a_mesh(tmp_path, caplog):
    """--fsdp without --devices/--mesh is an error (exit 2, one line naming both) before any model loads."""
    import logging

    from jaxvid.cli import main
    from jaxvid.synthetic.longcat import write_tiny_longcat

    folder = write_tiny_longcat(tmp_path / "lc")
    with caplog.at_level(logging.ERROR):
        rc = main(["generate", "--model", str(folder), "--prompt", "x", "--fsdp", "--output", str(tmp_path / "x.mp4")])
    assert rc == 2
    assert "--fsdp shards the weights over a device mesh; add --devices N" in caplog.text
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("argv, message", [
    (["--devices", "99"], "--devices=99; only"),
    (["--devices", "0"], "--devices=0; expected a positive integer"),
    (["--mesh", "tp=2"], "'tp=2' is not axis=size"),
    (["--devices", "1", "--mesh", "cfg=2,seq=2"], "uses 4 devices; --devices=1"),
    (["--devices", "1", "--mesh", "cfg=2"], "--mesh cfg=2 does not divide --devices=1"),
])
def test_cli_device_options_fail_before_loading(tmp_path, argv, message, caplog):
    """--devices / --mesh are checked against the visible devices before any model is written or loaded."""
    import argparse
    import logging

    from jaxvid.cli.generate import add_generate_parser

    parser = argparse.ArgumentParser(prog="jaxvid")
    add_generate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["generate", "--output", str(tmp_path / "x.mp4"), *argv])
    with caplog.at_level(logging.ERROR):
        assert args.func(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(message in e for e in errors), errors
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["cogvideox-radial", "longcat-bsa"])
def test_gpu_one_device_mesh_matches_unsharded(model):
    """On one GPU: the sharded code path (1-device mesh: shard_map around the Mosaic radial / BSA
    kernels, token constraints) against the plain run of the same bf16 model and inputs."""
    import numpy as np
    from flax import nnx

    from jaxvid.attention import AttentionPlan

    rng = np.random.default_rng(0)
    bf16 = jnp.bfloat16
    if model == "cogvideox-radial":
        from jaxvid.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3D

        cfg = CogVideoXConfig.tiny(attention_head_dim=64, num_attention_heads=2, dtype=bf16, param_dtype=bf16)
        net = CogVideoXTransformer3D(cfg, rngs=nnx.Rngs(0))
        plan = AttentionPlan.radial_cogvideox(block_size=128, dense_layers=1)  # 8 x 16 + 4 tokens: 2 blocks
        args = (jnp.asarray(rng.standard_normal((2, 8, cfg.in_channels, 8, 8)), bf16),
                jnp.asarray(rng.standard_normal((2, cfg.max_text_seq_length, cfg.text_embed_dim)), bf16),
                jnp.asarray([500.0, 500.0]))

        def fwd(graphdef, state, x, text, t):
            return nnx.merge(graphdef, state)(x, text, t, attention=plan).astype(jnp.float32)
    else:
        from jaxvid.models.longcat import LongCatConfig, LongCatVideoTransformer3D

        cfg = LongCatConfig.tiny(hidden_size=128, num_heads=2, dtype=bf16)
        net = LongCatVideoTransformer3D(cfg, rngs=nnx.Rngs(0))
        plan = AttentionPlan.bsa_longcat(sparsity=0.5)  # grid 8 x 8 x 8, chunks of 4 x 4 x 4: top 4 of 8
        args = (jnp.asarray(rng.standard_normal((1, cfg.in_channels, 8, 16, 16)), bf16),
                jnp.asarray(rng.standard_normal((1, 1, 6, cfg.caption_channels)), bf16),
                jnp.ones((1, 6), jnp.int32), jnp.asarray([700.0]))

        def fwd(graphdef, state, x, y, mask, t):
            return nnx.merge(graphdef, state)(x, t, y, mask, attention=plan).astype(jnp.float32)

    graphdef, state = nnx.split(net)
    plain = np.asarray(jax.jit(fwd, static_argnums=0)(graphdef, state, *args))
    with mesh_context(make_mesh(1)):
        sharded = np.asarray(jax.jit(fwd, static_argnums=0)(graphdef, state, *args))
        assert "shard_map" in str(jax.make_jaxpr(fwd, static_argnums=0)(graphdef, state, *args))
    rel = float(np.linalg.norm(sharded - plain) / np.linalg.norm(plain))
    print(f"{model}: 1-device mesh vs unsharded, bf16 GPU: rel L2 {rel:.2e}")
    assert np.isfinite(sharded).all() and rel <= 5e-3
