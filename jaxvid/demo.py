"""The end-to-end smoke run behind `jaxvid demo`, and random diffusers-layout CogVideoX checkpoints.

`write_random_cogvideox` writes config.json + safetensors exactly as diffusers'
`save_pretrained` lays them out (key names, torch shapes, optional sharding with an index), from
numpy alone: no torch or diffusers needed. The benchmark bench/convert_memory.py uses it too.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convert.keymaps.cogvideox import diffusers_shapes
from convert.safetensors_io import write_safetensors_streaming
from jaxvid.models.cogvideox import CogVideoXConfig

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_VERSION = "0.42.1"
# A CogVideoX DDIM scheduler config, copied verbatim by the converter like any weight-free component.
_SCHEDULER_CONFIG = {
    "_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": _DIFFUSERS_VERSION, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0,
    "timestep_spacing": "trailing", "trained_betas": None,
}


def _random_tensor(rng: np.random.Generator, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Weights ~ N(0, 0.02^2); norm scales ~ 1 so activations stay in range."""
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    if "norm" in key and key.endswith(".weight"):
        x += np.float32(1.0)
    return x


def write_random_cogvideox(
    folder: str | os.PathLike,
    cfg: CogVideoXConfig,
    *,
    seed: int = 0,
    dtype: Any = np.float32,
    max_shard_bytes: int | None = None,
    values: Callable[[str, tuple[int, ...]], np.ndarray] | None = None,
) -> Path:
    """Write a random CogVideoX transformer in diffusers' folder layout; returns the folder.

    With `max_shard_bytes`, tensors go to `diffusion_pytorch_model-0000k-of-0000n.safetensors`
    files plus `diffusion_pytorch_model.safetensors.index.json`, as diffusers shards. Tensors are
    generated and written one at a time (peak memory: one tensor). `values(key, shape)` replaces
    the default N(0, 0.02^2) float32 generator (the benchmark uses a cheaper one).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    config = {**cfg.to_hf_config(), "_diffusers_version": _DIFFUSERS_VERSION}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = dict(sorted(diffusers_shapes(cfg).items()))
    shards: list[dict[str, tuple[tuple[int, ...], np.dtype]]] = [{}]
    size = 0
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = (shape, dtype)
        size += nbytes
    rng = np.random.default_rng(seed)

    def produce(key: str) -> np.ndarray:
        x = values(key, shapes[key]) if values is not None else _random_tensor(rng, key, shapes[key])
        return x.astype(dtype, copy=False)

    if len(shards) == 1 and not max_shard_bytes:
        write_safetensors_streaming(folder / WEIGHTS_NAME, shards[0], produce, metadata={"format": "pt"})
        return folder
    weight_map: dict[str, str] = {}
    stem = WEIGHTS_NAME.removesuffix(".safetensors")
    for k, shard in enumerate(shards, start=1):
        name = f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(folder / name, shard, produce, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        log.info("wrote shard %s (%d tensors)", name, len(shard))
    total = sum(int(np.prod(s, dtype=np.int64)) * dtype.itemsize for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{WEIGHTS_NAME}.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_random_pipeline(folder: str | os.PathLike, cfg: CogVideoXConfig, *, seed: int = 0) -> Path:
    """A minimal diffusers pipeline folder: model_index.json, transformer/ (random) and scheduler/."""
    folder = Path(folder)
    write_random_cogvideox(folder / "transformer", cfg, seed=seed)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_SCHEDULER_CONFIG, indent=2))
    index = {
        "_class_name": "CogVideoXPipeline", "_diffusers_version": _DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


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
