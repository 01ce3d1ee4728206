"""Cold compile of the tiled CogVideoX VAE decode under different XLA options (GPU).

    python bench/vae_compile.py --variants "default;xla_gpu_enable_triton_gemm=true,xla_gpu_exclude_nondeterministic_ops=false"
    python bench/vae_compile.py --smoke --variants "default;xla_backend_optimization_level=1"   # CPU check

The pipeline's own path (`CogVideoXPipeline._decode_tiled`: one program per tile shape, compiled side
by side by `CompiledFunction.prepare_many`, then the stitching program) on CogVideoX-5b's VAE (random
bf16 weights) for 49 x 480 x 720. Each variant runs in a fresh process with the compile caches off
and its options in $JAXVID_XLA_OPTIONS_VAE (so they reach the VAE's programs only, as a user would set
them). Prints compile seconds, the decode's median time, peak GiB and how far each variant's frames
are from the first variant's (a subsample of every 4th frame, 8th row and column). "default" is
jaxvid's own choice (compile_cache.GPU_STAGE_OPTIONS["vae"] since session 7; the session-7 table in
bench/results/session7_h200/1_vae_compile.json was measured before, so its "default" row is the
old one and its last row today's default).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(smoke: bool, repeats: int, sample_path: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    sys.path.insert(0, str(ROOT))
    from jaxvid.compile_cache import compiler_options
    from jaxvid.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig, CogVideoXVAETiling
    from jaxvid.pipelines.cogvideox import _decode_tile, _stitch_tiles
    from jaxvid.pipelines.loop import CompiledFunction
    from jaxvid.synthetic.random_weights import random_model

    bf16 = jnp.bfloat16
    if smoke:
        cfg = CogVideoXVAEConfig.tiny(dtype=jnp.float32)
        c, f, h, w = cfg.latent_channels, 3, 12, 12
        tiling = CogVideoXVAETiling(sample_min_height=32, sample_min_width=32,
                                    overlap_factor_height=1 / 6, overlap_factor_width=1 / 5)
    else:
        cfg = CogVideoXVAEConfig.cogvideox_5b(dtype=bf16, param_dtype=bf16)
        c, f, h, w = cfg.latent_channels, 13, 60, 90
        tiling = CogVideoXVAETiling.default(cfg)
    vae = random_model(AutoencoderKLCogVideoX, cfg)
    graphdef, state = nnx.split(vae)
    latents = jax.random.normal(jax.random.key(0), (1, f, c, h, w), cfg.dtype)  # the pipeline's [B, F, C, h, w]
    layout = vae.decode_layout((1, c, f, h, w), tiling)
    if layout is None:
        raise SystemExit("the latents fit one tile: nothing tiled to compile")
    scale = float(cfg.scaling_factor)
    decode_tile = CompiledFunction(_decode_tile, static_argnums=(0, 4, 5), name="VAE decode tile", stage="vae")
    stitch = CompiledFunction(_stitch_tiles, static_argnums=(0,), name="VAE stitch", stage="vae")

    def args(origin, size):
        return (graphdef, state, latents, (np.int32(origin[0]), np.int32(origin[1])), size, scale)

    def decode():
        tiles = {origin: decode_tile(*args(origin, size)) for origin, size in layout.shapes}
        return jax.block_until_ready(stitch(layout, tiles))

    t0 = time.perf_counter()
    tile_compile = decode_tile.prepare_many([args(o, s) for o, s in layout.shapes])
    frames = decode()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        frames = decode()
        times.append(time.perf_counter() - t0)
    np.save(sample_path, np.asarray(frames[0, ::4, ::8, ::8], np.float32))
    stats = jax.devices()[0].memory_stats() or {}
    return {"compile_s": compile_s, "tile_compile_s": tile_compile, "decode_s": statistics.median(times),
            "tile_shapes": len({s for _, s in layout.shapes}), "tiles": len(layout.shapes),
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "options": compiler_options(stage="vae"),
            "frames": list(frames.shape)}


def _variants(text: str) -> list[tuple[str, str]]:
    """"a;b=1,c=2" -> [(name, $JAXVID_XLA_OPTIONS_VAE value)]; "default" (or "") is no options."""
    out = []
    for item in (s.strip() for s in text.split(";")):
        if item or not out:
            out.append(("default", "") if item in ("", "default") else (item, item))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="default",
                    help='";"-separated $JAXVID_XLA_OPTIONS_VAE values ("default" = none); the first is the baseline')
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny VAE in fp32 (check the script on a CPU)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    ap.add_argument("--log-dir", default=None, help="keep each variant's stderr here")
    ap.add_argument("--xla-log", action="store_true",
                    help="log XLA's autotuners (TF_CPP_VMODULE) into the stderr kept by --log-dir")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(_worker(a.smoke, a.repeats, a.worker)), flush=True)
        return
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, options) in enumerate(_variants(a.variants)):
            sample = os.path.join(tmp, f"{i}.npy")
            env = dict(os.environ, JAXVID_XLA_OPTIONS_VAE=options, JAXVID_COMPILE_CACHE="off",
                       XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=str(ROOT))
            if a.xla_log:
                env.update(TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="conv_algorithm_picker=1,gemm_fusion_autotuner=1,"
                           "autotuner_util=1,gpu_compiler=1")
            cmd = [sys.executable, __file__, "--worker", sample, "--repeats", str(a.repeats)] + (["--smoke"] if a.smoke else [])
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
                out, err = p.stdout, p.stderr
                lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
                res = json.loads(lines[-1][7:]) if lines else {"error": (err.strip().splitlines() or ["?"])[-1][-300:]}
            except subprocess.TimeoutExpired as e:
                err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
                res = {"error": f"timeout after {a.timeout}s"}
            res["process_s"] = time.perf_counter() - t0
            if a.log_dir:
                Path(a.log_dir).mkdir(parents=True, exist_ok=True)
                (Path(a.log_dir) / f"vae_compile_{i}.log").write_text(err)
            if "error" not in res:
                got, base = np.load(sample), np.load(os.path.join(tmp, "0.npy"))
                res["max_abs_vs_first"] = float(np.max(np.abs(got - base)))
                res["mean_abs_vs_first"] = float(np.mean(np.abs(got - base)))
            rows.append({"variant": name, **res})
            print(f"{name}: {res}", flush=True)
    print(f"\n{'variant':52s} {'compile s':>9s} {'tiles s':>8s} {'decode s':>8s} {'peak GiB':>8s} {'max|d|':>8s} {'mean|d|':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant'][:52]:52s} ERROR {r['error']}")
        else:
            print(f"{r['variant'][:52]:52s} {r['compile_s']:9.1f} {r['tile_compile_s']:8.1f} {r['decode_s']:8.2f} "
                  f"{r['peak_gib']:8.1f} {r['max_abs_vs_first']:8.4f} {r['mean_abs_vs_first']:8.5f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
