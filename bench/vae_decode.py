"""VAE decode at real video sizes on a GPU: time and peak memory (random bf16 weights).

    python bench/vae_decode.py                 # CogVideoX 49 x 480x720 (tiled, untiled), Wan 93 x 480x832
    python bench/vae_decode.py --smoke         # tiny configs on a CPU, same code path

Each case runs in its own subprocess so peak memory is per case. Prints compile time (first call),
median decode time of --repeats calls and the device's peak bytes in use.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeCase:
    name: str
    vae: str  # "cogvideox" | "wan"
    latent: tuple[int, int, int, int]  # (C, F', H', W')
    tiled: bool = False


CASES = (
    DecodeCase("cogvideox-5b 49x480x720 tiled", "cogvideox", (16, 13, 60, 90), tiled=True),
    DecodeCase("cogvideox-5b 49x480x720 untiled", "cogvideox", (16, 13, 60, 90)),
    # CogVideoX 1.5 shares the 5b VAE architecture; 81 frames at its model card's 768 x 1360
    DecodeCase("cogvideox1.5 81x768x1360 tiled", "cogvideox", (16, 21, 96, 170), tiled=True),
    DecodeCase("wan2.1 93x480x832", "wan", (16, 24, 60, 104)),
)


def _case(case: DecodeCase, repeats: int, smoke: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jaxvid.synthetic.random_weights import random_model

    bf16 = jnp.bfloat16
    c, f, h, w = case.latent
    if case.vae == "cogvideox":
        from jaxvid.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig, CogVideoXVAETiling

        cfg = (CogVideoXVAEConfig.tiny if smoke else CogVideoXVAEConfig.cogvideox_5b)(dtype=bf16, param_dtype=bf16)
        if smoke:
            c, f, h, w = cfg.latent_channels, 3, 8, 8
        model = random_model(AutoencoderKLCogVideoX, cfg)
        tiling = CogVideoXVAETiling.default(cfg) if case.tiled else None
        if smoke and tiling is not None:
            tiling = CogVideoXVAETiling(sample_min_height=32, sample_min_width=32,
                                        overlap_factor_height=1 / 6, overlap_factor_width=1 / 5)

        def call(m, z):
            return m.decode(z, tiling=tiling)
    else:
        from jaxvid.models.vae_wan import AutoencoderKLWan, WanVAEConfig

        cfg = (WanVAEConfig.tiny if smoke else WanVAEConfig.wan21)(dtype=bf16, param_dtype=bf16)
        if smoke:
            c, f, h, w = cfg.z_dim, 3, 8, 8
        model = random_model(AutoencoderKLWan, cfg)

        def call(m, z):
            return m.decode(z)

    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda s, z: call(nnx.merge(graphdef, s), z))
    z = jax.random.normal(jax.random.key(0), (1, c, f, h, w), bf16)
    t0 = time.perf_counter()
    out = jax.block_until_ready(decode(state, z))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(decode(state, z))
        times.append((time.perf_counter() - t0) * 1e3)
    stats = jax.devices()[0].memory_stats() or {}
    return {"out_shape": list(out.shape), "ms": statistics.median(times), "compile_s": compile_s,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(c.name for c in CASES))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny configs (check the script on a CPU)")
    ap.add_argument("--json")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.cases.split(",") if s.strip()]
    cases = [c for c in CASES if any(c.name.startswith(w) for w in wanted)]
    if not cases:
        ap.error(f"--cases: no case matches {wanted}; known: {[c.name for c in CASES]}")
    if args.worker:
        print("RESULT " + json.dumps(_case(cases[0], args.repeats, args.smoke)), flush=True)
        return
    rows = []
    for case in cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "1", "--cases", case.name,
               "--repeats", str(args.repeats)] + (["--smoke"] if args.smoke else [])
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            errors = [ln for ln in p.stderr.splitlines() if "Error" in ln] or p.stderr.strip().splitlines()[-1:] or ["?"]
            res = json.loads(lines[-1][7:]) if lines else {"error": errors[-1][-300:]}
        except subprocess.TimeoutExpired:
            res = {"error": f"timeout after {args.timeout}s"}
        rows.append({"case": case.name, **res})
        print(f"{case.name}: {res}", flush=True)
    print(f"{'case':34s} {'out shape':>22s} {'ms':>9s} {'compile s':>9s} {'peak GiB':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:34s} ERROR {r['error']}")
        else:
            print(f"{r['case']:34s} {str(tuple(r['out_shape'])):>22s} {r['ms']:9.1f} {r['compile_s']:9.1f} {r['peak_gib']:8.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
