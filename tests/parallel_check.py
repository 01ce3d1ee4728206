"""Sharded == single-device checks on forced CPU devices, run as ONE subprocess by tests/test_parallel.py.

XLA_FLAGS must be set before jax starts (the test workers have started it already), so this script
sets --xla_force_host_platform_device_count=8 itself and prints one JSON object:
{case: {"rel_l2": ..., "max_abs": ..., "devices": n}}. Every case compares the sharded run of a tiny
model with the same model's plain single-device run (no mesh) on the same weights and inputs.

    python tests/parallel_check.py           the suite's set: attend() (dense, radial, BSA, BSA with a
                                             longer key sequence) on 1, 2, 4 and 8 devices, and the
                                             whole tiny models on 8 devices (cfg=2 x seq=4 and seq=8)
    python tests/parallel_check.py --full    also every model x plan on 1, 2, 4 and 8 devices, FSDP
                                             weights and the VAE decode split (minutes on 2 cores)
"""
from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                           " --xla_cpu_use_fusion_emitters=false").strip()  # compile time is the cost here
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxvid.attention import AttentionPlan  # noqa: E402
from jaxvid.parallel import make_mesh, mesh_context, place_replicated, shard_spatial, shard_weights_fsdp  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _errors(out, ref) -> dict[str, float]:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return {"rel_l2": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), "max_abs": float(np.abs(out - ref).max())}


def _run(fn, graphdef, state, args, mesh, fsdp=False):
    """jit(fn)(graphdef, state, *args) traced and run under `mesh` (None: plain single device)."""
    jitted = jax.jit(fn, static_argnums=0)
    if mesh is None:
        return jax.tree.map(np.asarray, jitted(graphdef, state, *args))
    state = shard_weights_fsdp(state, mesh, min_elements=0) if fsdp else place_replicated(state, mesh)
    with mesh_context(mesh):
        return jax.tree.map(np.asarray, jitted(graphdef, state, *place_replicated(args, mesh)))


def attention_cases(device_counts):
    """attend() alone, every scheme in one jitted function per device count (compiles are the cost)."""
    from jaxvid.attention import BSA, Dense, Radial, VideoLayout, attend

    rng = np.random.default_rng(3)

    def qkv(seq_q, seq_k, heads):
        return tuple(jnp.asarray(rng.standard_normal((2, s, heads, 16)), jnp.float32) for s in (seq_q, seq_k, seq_k))

    cog = VideoLayout(frames=8, height=4, width=4, text_tokens=4, text_first=True)  # 132 tokens, 3 heads
    lc_q, lc_k = VideoLayout(frames=4, height=4, width=4), VideoLayout(frames=6, height=4, width=4)
    bsa = BSA(sparsity=0.5, chunk_3d_shape_q=(2, 2, 2), chunk_3d_shape_k=(2, 2, 2))
    cases = {  # name -> (inputs, attend kwargs)
        "dense": (qkv(132, 132, 3), dict(spec=Dense())),
        "radial": (qkv(132, 132, 3), dict(spec=Radial(block_size=64), layout=cog)),
        "bsa": (qkv(64, 64, 4), dict(spec=bsa, layout=lc_q)),
        "bsa-longer-keys": (qkv(64, 96, 4), dict(spec=bsa, layout=lc_q, kv_layout=lc_k)),
    }

    def all_cases(_, __, inputs):
        return {name: attend(*inputs[name], **kw) for name, (_, kw) in cases.items()}

    inputs = {name: arrays for name, (arrays, _) in cases.items()}
    ref = _run(all_cases, None, None, (inputs,), None)
    out = {}
    for n in device_counts:
        got = _run(all_cases, None, None, (inputs,), make_mesh(n))
        for name in cases:
            out[f"attend/{name}/seq={n}"] = {**_errors(got[name], ref[name]), "devices": n}
    return out


def cogvideox_cases(device_counts, *, full: bool):
    """Tiny CogVideoX, 3 heads (like CogVideoX-2b's 30 they do not divide 2, 4 or 8: padded heads).

    Without `full` only the radial plan (layer 0 dense, layer 1 radial) on cfg=2 x seq=4."""
    from jaxvid.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3D

    cfg = CogVideoXConfig.tiny(num_attention_heads=3)
    graphdef, state = nnx.split(CogVideoXTransformer3D(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    # 8 latent frames of 8 x 8: 4 text + 128 video tokens; the radial mask (block 64) is not full
    x = jnp.asarray(rng.standard_normal((2, 8, cfg.in_channels, 8, 8)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, cfg.max_text_seq_length, cfg.text_embed_dim)), jnp.float32)
    t = jnp.asarray([500.0, 500.0])
    plans = {"radial": AttentionPlan.radial_cogvideox(block_size=64, dense_layers=1)}
    if full:
        plans["dense"] = None
    out = {}
    for name, plan in plans.items():
        def fwd(graphdef, state, x, text, t, plan=plan):
            return nnx.merge(graphdef, state)(x, text, t, attention=plan)

        ref = _run(fwd, graphdef, state, (x, text, t), None)
        for n in device_counts if full else []:
            out[f"cogvideox/{name}/seq={n}"] = {**_errors(_run(fwd, graphdef, state, (x, text, t),
                                                               make_mesh(n)), ref), "devices": n}
        # CFG parallel: the batch of 2 over cfg=2, tokens over seq=4
        mesh = make_mesh(8, axes={"cfg": 2, "seq": 4})
        out[f"cogvideox/{name}/cfg=2,seq=4"] = {**_errors(_run(fwd, graphdef, state, (x, text, t), mesh), ref),
                                                "devices": 8}
    return out


def longcat_cases(device_counts, *, full: bool):
    """Tiny LongCat (4 heads). Without `full`: BSA with 2 conditioning frames on seq=8 only."""
    from jaxvid.models.longcat import LongCatConfig, LongCatVideoTransformer3D

    cfg = LongCatConfig.tiny()
    graphdef, state = nnx.split(LongCatVideoTransformer3D(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    # 4 latent frames of 8 x 8 -> grid (4, 4, 4): 64 tokens, 8 BSA chunks of 2 x 2 x 2, top-4 kept
    x = jnp.asarray(rng.standard_normal((2, cfg.in_channels, 4, 8, 8)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, 1, 6, cfg.caption_channels)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    t = jnp.asarray([700.0, 700.0])
    bsa = AttentionPlan.bsa_longcat(sparsity=0.5, chunk_3d_shape_q=(2, 2, 2), chunk_3d_shape_k=(2, 2, 2))
    runs = (("dense", AttentionPlan.dense(), 0), ("bsa", bsa, 0), ("bsa-cond2", bsa, 2)) if full else \
        (("bsa-cond2", bsa, 2),)
    out = {}
    for name, plan, nc in runs:
        def fwd(graphdef, state, x, y, mask, t, plan=plan, nc=nc):
            return nnx.merge(graphdef, state)(x, t, y, mask, num_cond_latents=nc, attention=plan)

        args = (x, y, mask, t)
        ref = _run(fwd, graphdef, state, args, None)
        for n in device_counts:
            out[f"longcat/{name}/seq={n}"] = {**_errors(_run(fwd, graphdef, state, args, make_mesh(n)), ref),
                                              "devices": n}
        if name == "bsa":
            mesh = make_mesh(8, axes={"cfg": 2, "seq": 4})
            out["longcat/bsa/cfg=2,seq=4"] = {**_errors(_run(fwd, graphdef, state, args, mesh), ref), "devices": 8}
            out["longcat/bsa/seq=4,fsdp"] = {**_errors(_run(fwd, graphdef, state, args, make_mesh(4), fsdp=True),
                                                       ref), "devices": 4}
    return out


def vae_cases(n):
    """CogVideoX VAE decode with the latent height split over n devices (XLA's spatial partitioning)."""
    from jaxvid.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig

    vae = AutoencoderKLCogVideoX(CogVideoXVAEConfig.tiny(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(vae)
    z = jnp.asarray(np.random.default_rng(2).standard_normal((1, vae.cfg.latent_channels, 3, 8, 8)), jnp.float32)

    def dec(graphdef, state, z):
        return nnx.merge(graphdef, state).decode(shard_spatial(z, axis=3))

    ref = _run(dec, graphdef, state, (z,), None)
    return {f"vae_cogvideox/height-split/devices={n}": {**_errors(_run(dec, graphdef, state, (z,), make_mesh(n)),
                                                                  ref), "devices": n}}


def pipeline_cases():
    """Both pipelines end to end (text encoder, jitted loop, VAE decode) with and without a mesh."""
    import tempfile
    from pathlib import Path

    from jaxvid.pipelines.cogvideox import CogVideoXPipeline
    from jaxvid.pipelines.longcat import LongCatPipeline
    from jaxvid.synthetic.cogvideox import write_tiny_pipeline
    from jaxvid.synthetic.longcat import write_tiny_longcat

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        pipe = CogVideoXPipeline.from_pretrained(write_tiny_pipeline(Path(tmp) / "cog"))
        kw = dict(num_frames=9, height=64, width=64, num_inference_steps=2, seed=0, output_type="np", progress=False,
                  attention=AttentionPlan.radial_cogvideox(block_size=64, dense_layers=1, dense_timesteps=1))
        ref = pipe("a panda", **kw)
        got = pipe("a panda", **kw, mesh=make_mesh(8, axes={"cfg": 2, "seq": 4}))
        out["pipeline_cogvideox/radial/cfg=2,seq=4/latents"] = {**_errors(got.latents, ref.latents), "devices": 8}
        out["pipeline_cogvideox/radial/cfg=2,seq=4/frames"] = {**_errors(got.frames, ref.frames), "devices": 8}
        out["pipeline_cogvideox/progress_ticks"] = {"rel_l2": 0.0 if len(pipe.progress.step_times) == 2 else 1.0,
                                                     "max_abs": 0.0, "devices": 8}

        pipe = LongCatPipeline.from_pretrained(write_tiny_longcat(Path(tmp) / "lc", seed=0), progress=False)
        pipe.enable_bsa(sparsity=0.5, chunk_3d_shape_q=(1, 2, 2), chunk_3d_shape_k=(1, 2, 2))
        kw = dict(height=64, width=64, num_frames=9, num_inference_steps=2, seed=1, output_type="np")
        ref = pipe.generate_t2v("a cat", **kw)
        pipe.use_mesh(make_mesh(8))
        got = pipe.generate_t2v("a cat", **kw)
        out["pipeline_longcat/bsa/seq=8/latents"] = {**_errors(got.latents, ref.latents), "devices": 8}
        out["pipeline_longcat/bsa/seq=8/frames"] = {**_errors(got.frames, ref.frames), "devices": 8}
        out["pipeline_longcat/progress_ticks"] = {"rel_l2": 0.0 if len(pipe.progress.step_times) == 2 else 1.0,
                                                   "max_abs": 0.0, "devices": 8}
    return out


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    results = {} if "--pipelines" in sys.argv else attention_cases([1, 2, 4, 8])
    if "--full" in sys.argv:
        results |= cogvideox_cases([1, 2, 4, 8], full=True) | longcat_cases([1, 2, 4, 8], full=True)
        results |= vae_cases(8) | pipeline_cases()
    elif "--pipelines" in sys.argv:
        results = pipeline_cases()
    else:
        results |= cogvideox_cases([], full=False) | longcat_cases([8], full=False)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
