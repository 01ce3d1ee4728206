"""`jaxvid demo`: the end-to-end smoke run on a tiny random CogVideoX checkpoint.

It writes a random diffusers-layout pipeline folder (`jaxvid.synthetic.cogvideox.write_random_pipeline`),
converts it, loads it and runs one jitted forward pass, logging every stage.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxvid.models.cogvideox import CogVideoXConfig
from jaxvid.synthetic.cogvideox import write_random_pipeline

log = logging.getLogger(__name__)


def add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `demo` subcommand (its handler is `args.func`)."""
    demo = subparsers.add_parser(
        "demo",
        help="build a tiny random CogVideoX checkpoint, convert it, load it and run a forward pass",
        description="Writes a tiny random CogVideoX pipeline folder in diffusers' layout (numpy only), converts it "
        "with jaxvid-convert, loads it with load_transformer and runs one jitted forward pass, logging what it did.",
    )
    demo.add_argument("--out", default=None, help="keep the files in this folder (default: a temp folder, removed)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    demo.set_defaults(func=_run)
    return demo


def _run(args: argparse.Namespace) -> int:
    summary = run_demo(args.out, seed=args.seed)
    log.info("demo finished: output %s, %d parameters, timings %s",
             summary["output_shape"], summary["params"], {k: round(v, 3) for k, v in summary["timings"].items()})
    return 0


def run_demo(out: str | os.PathLike | None = None, *, seed: int = 0) -> dict[str, Any]:
    """Build a tiny random CogVideoX pipeline folder, convert it, load it, run one forward pass.

    Everything it does is logged (shapes, timings). Returns a summary dict. With `out` None the
    files go to a temporary folder that is removed afterwards.
    """
    if out is None:
        with tempfile.TemporaryDirectory(prefix="jaxvid-demo-") as tmp:
            return run_demo(tmp, seed=seed)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxvid.cli.convert import convert_path
    from jaxvid.models import load_transformer
    from jaxvid.models.loading import count_params

    out = Path(out)
    cfg = CogVideoXConfig.tiny(num_layers=4, num_attention_heads=4, attention_head_dim=32, sample_height=16, sample_width=16)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    src = write_random_pipeline(out / "diffusers", cfg, seed=seed)
    timings["write_diffusers"] = time.perf_counter() - t0
    log.info("1. wrote a random diffusers CogVideoX pipeline folder at %s (%.2f s)", src, timings["write_diffusers"])

    t0 = time.perf_counter()
    dst = convert_path(src, out / "jaxvid", overwrite=True, show_progress=False)
    timings["convert"] = time.perf_counter() - t0
    log.info("2. converted it with jaxvid-convert into %s (%.2f s)", dst, timings["convert"])

    t0 = time.perf_counter()
    model = load_transformer(dst)
    timings["load"] = time.perf_counter() - t0
    n_params = count_params(model)
    log.info("3. loaded %s: %d layers, %d parameters (%.2f s)", type(model).__name__, cfg.num_layers, n_params, timings["load"])

    b, f, h, w, n_text = 2, 3, 16, 16, cfg.max_text_seq_length
    keys = jax.random.split(jax.random.key(seed), 2)
    hidden = jax.random.normal(keys[0], (b, f, cfg.in_channels, h, w), jnp.float32)
    text = jax.random.normal(keys[1], (b, n_text, cfg.text_embed_dim), jnp.float32)
    timestep = jnp.array([999, 500], jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, hidden, text, timestep):
        return nnx.merge(graphdef, state)(hidden, text, timestep)

    t0 = time.perf_counter()
    sample = jax.block_until_ready(forward(state, hidden, text, timestep))
    timings["compile_and_run"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sample = jax.block_until_ready(forward(state, hidden, text, timestep))
    timings["run"] = time.perf_counter() - t0
    tokens = n_text + f * (h // cfg.patch_size) * (w // cfg.patch_size)
    log.info(
        "4. forward: hidden_states %s + encoder_hidden_states %s + timestep %s -> %s (%d joint tokens); "
        "compile+run %.2f s, run %.4f s on %s",
        tuple(hidden.shape), tuple(text.shape), tuple(timestep.shape), tuple(sample.shape), tokens,
        timings["compile_and_run"], timings["run"], jax.devices()[0].platform,
    )

    direct = load_transformer(src / "transformer")
    reference = jax.block_until_ready(jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(nnx.state(direct), hidden, text, timestep))
    max_diff = float(jnp.max(jnp.abs(sample - reference)))
    log.info("5. same output when loading the diffusers folder directly: max |diff| = %.3g", max_diff)
    if not np.isfinite(np.asarray(sample)).all() or max_diff > 1e-5:
        raise RuntimeError(f"demo check failed: finite={bool(np.isfinite(np.asarray(sample)).all())}, max |diff|={max_diff}")
    return {"output_shape": tuple(sample.shape), "params": n_params, "timings": timings, "max_diff": max_diff, "out": str(out)}
