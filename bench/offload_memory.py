"""Device memory of CogVideoX under each offload policy, each policy in a fresh process (XLA's peak
cannot be reset), checked against the bytes of the weights each policy keeps on the device.

    python bench/offload_memory.py                         # 5b widths, 4 DiT + 4 T5 layers, 9 x 160 x 240
    python bench/offload_memory.py --limit-gib 3           # and each policy again with only 3 GiB usable
    python bench/offload_memory.py --tiny                  # the tiny pipeline (CPU: no peaks, checks skipped)

The folder (written once into --dir) has CogVideoX-5b's transformer and T5-XXL at full width with
fewer layers (--layers, --t5-layers) and the real 5b VAE, random N(0, 0.02) bf16 weights, so a run
takes seconds; the claims it checks scale with the weights. Per policy it reports: the weights
each component keeps on the device and in pinned host memory (and those it reads from the
checkpoint at each use: the text encoder under every policy but "none"), the load time, XLA's
peak right after loading, the
peak of the whole run (load + encode + denoise + decode) and the bytes in use after it. Checks
(exit code 1 if one fails, GPU only), with `slack` = --slack-mib:

- after loading, peak <= the weights the policy keeps on the device + the device loader's bytes in
  flight (loading.MAX_BYTES_IN_FLIGHT, only when it loads anything) + slack: parked weights load
  straight into pinned host memory (under "model" the device holds nothing after loading);
- after the run, bytes in use <= those weights + slack: no text-encoder copy, no loop buffer, no
  decode input survives the call (donated carry, dropped references);
- run peaks: blocks <= model + slack and model <= text <= none + slack;
- with --limit-gib N: the policies whose peak was above N GiB are shown, and each run with
  XLA_PYTHON_CLIENT_MEM_FRACTION set so that only N GiB are usable reports whether it completed.

Writes a JSON of every row with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GIB = 1 << 30
MIB = 1 << 20
POLICIES = ("none", "text", "model", "blocks")
COMPONENTS = ("text_encoder", "transformer", "vae")
ON_DEMAND = "on_demand"  # the "memory kind" reported for weights read from the checkpoint at each use


def write_folder(folder: Path, layers: int, t5_layers: int, tiny: bool) -> Path:
    """A diffusers CogVideoX folder: 5b widths with `layers` DiT and `t5_layers` T5 layers, bf16."""
    import shutil

    from jaxvid.models.cogvideox import CogVideoXConfig
    from jaxvid.models.t5 import T5Config
    from jaxvid.models.vae_cogvideox import CogVideoXVAEConfig
    from jaxvid.synthetic import cogvideox as synth

    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if tiny:
        synth.write_tiny_pipeline(tmp)
        tmp.rename(folder)
        return folder
    synth.write_random_full_pipeline(tmp, CogVideoXConfig.cogvideox_5b(num_layers=layers),
                                     CogVideoXVAEConfig.cogvideox_5b(), T5Config.t5_v1_1_xxl(num_layers=t5_layers),
                                     values=synth.pooled_random_values(1 << 22))
    tmp.rename(folder)
    return folder


def _bytes_by_kind(tree) -> dict[str, int]:
    import jax

    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            kind = leaf.sharding.memory_kind or "device"
            out[kind] = out.get(kind, 0) + leaf.nbytes
    return out


def _in_use() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


def worker(args: argparse.Namespace) -> dict:
    import jax

    from jaxvid.compile_cache import enable_compile_cache
    from jaxvid.pipelines.cogvideox import CogVideoXPipeline
    from jaxvid.pipelines.memory import peak_memory_bytes

    enable_compile_cache(args.cache_dir)
    t0 = time.perf_counter()
    pipe = CogVideoXPipeline.from_pretrained(args.folder, dtype="fp32" if args.tiny else "bf16", offload=args.worker)
    comps = {name: getattr(pipe, name) for name in COMPONENTS}
    kept = {name: c for name, c in comps.items() if c.on_demand is None}
    jax.block_until_ready([c.state for c in kept.values()])
    # a component read on demand (the text encoder under every policy but "none") is kept nowhere
    weights = {name: _bytes_by_kind(c.state) if name in kept else {ON_DEMAND: c.on_demand.nbytes}
               for name, c in comps.items()}
    row = {"policy": args.worker, "effective_policy": pipe.offload.policy, "load_s": time.perf_counter() - t0,
           "weights": weights,
           "peak_after_load": peak_memory_bytes(), "in_use_after_load": _in_use()}
    out = pipe("a panda playing a guitar", num_frames=args.frames, height=args.height, width=args.width,
               num_inference_steps=args.steps, guidance_scale=6.0, seed=0, progress=False)
    del out
    row.update(peak=peak_memory_bytes(), in_use_after_run=_in_use(), timings=pipe.last_timings,
               total_s=time.perf_counter() - t0)
    return row


def run_policy(args: argparse.Namespace, policy: str, limit_gib: float | None) -> dict:
    env = dict(os.environ)
    if limit_gib is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{limit_gib / args.gpu_gib:.4f}"
    cmd = [sys.executable, __file__, "--worker", policy, "--folder", str(args.folder), "--cache-dir",
           str(args.cache_dir), "--frames", str(args.frames), "--height", str(args.height), "--width",
           str(args.width), "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"policy": policy, "limit_gib": limit_gib, "completed": False, "error": " | ".join(tail)}
    return {**json.loads(lines[-1][4:]), "limit_gib": limit_gib, "completed": True}


def device_weights(row: dict) -> int:
    return sum(w.get("device", 0) for w in row["weights"].values())


def check(rows: dict[str, dict], slack: int) -> list[tuple[str, bool]]:
    from jaxvid.models.loading import MAX_BYTES_IN_FLIGHT

    results = []
    for policy, row in rows.items():
        if not row.get("completed") or row.get("peak") is None:
            continue
        on_device = device_weights(row)
        # the device loader (loading.load_arrays) keeps up to MAX_BYTES_IN_FLIGHT of tensors in flight;
        # a policy that parks everything never calls it
        in_flight = MAX_BYTES_IN_FLIGHT if on_device else 0
        results.append((f"{policy}: peak after load {row['peak_after_load'] / GIB:.2f} GiB <= device weights "
                        f"{on_device / GIB:.2f} GiB + {in_flight / GIB:g} GiB loader in flight + slack",
                        row["peak_after_load"] <= on_device + in_flight + slack))
        results.append((f"{policy}: in use after the run {row['in_use_after_run'] / GIB:.2f} GiB <= device weights "
                        f"+ slack", row["in_use_after_run"] <= on_device + slack))
    peaks = {p: r["peak"] for p, r in rows.items() if r.get("completed") and r.get("peak") is not None}
    for lower, higher in (("blocks", "model"), ("model", "text"), ("text", "none")):
        if lower in peaks and higher in peaks:
            results.append((f"peak {lower} {peaks[lower] / GIB:.2f} <= {higher} {peaks[higher] / GIB:.2f} GiB + slack",
                            peaks[lower] <= peaks[higher] + slack))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "jaxvid_offload_memory")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--t5-layers", type=int, default=4)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--height", type=int, default=160)
    p.add_argument("--width", type=int, default=240)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--limit-gib", type=float, default=None)
    p.add_argument("--gpu-gib", type=float, default=float(os.environ.get("BENCH_GPU_GIB", "139.8")))
    p.add_argument("--slack-mib", type=float, default=256.0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("ROW " + json.dumps(worker(args)), flush=True)
        return 0
    name = "tiny" if args.tiny else f"5b_L{args.layers}_T5L{args.t5_layers}"
    args.folder = write_folder(args.dir / name, args.layers, args.t5_layers, args.tiny)
    args.cache_dir = args.dir / "compile-cache"
    policies = [q for q in args.policies.split(",") if q]
    rows = {q: run_policy(args, q, None) for q in policies}
    limited = {q: run_policy(args, q, args.limit_gib) for q in policies} if args.limit_gib else {}
    print(f"CogVideoX {name}, {args.frames} x {args.height} x {args.width}, {args.steps} steps, CFG 6, bf16")
    print("| policy | device weights GiB | host weights GiB | read on demand GiB | peak after load GiB | run peak GiB "
          "| in use after GiB | load s | steps s | total s |" + (f" fits in {args.limit_gib:g} GiB |" if limited else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if limited else ""))

    def gib(x):
        return "-" if x is None else f"{x / GIB:.2f}"

    for q, row in rows.items():
        if not row.get("completed"):
            print(f"| {q} | failed: {row['error']} |")
            continue
        host = sum(w.get("pinned_host", 0) for w in row["weights"].values())
        on_demand = sum(w.get(ON_DEMAND, 0) for w in row["weights"].values())
        fits = ""
        if limited:
            fits = " yes |" if limited[q].get("completed") else f" no ({limited[q].get('error', '')[-120:]}) |"
        print(f"| {q} | {gib(device_weights(row))} | {gib(host)} | {gib(on_demand)} | {gib(row['peak_after_load'])} "
              f"| {gib(row['peak'])} | {gib(row['in_use_after_run'])} | {row['load_s']:.2f} "
              f"| {row['timings'].get('steps', 0):.2f} | {row['total_s']:.1f} |{fits}")
    results = check(rows, int(args.slack_mib * MIB))
    for text, ok in results:
        print(("PASS " if ok else "FAIL ") + text)
    if not results:
        print("no device memory statistics on this backend: nothing to check")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "limited": limited, "checks": results}, indent=2))
    failed = [q for q, r in rows.items() if not r.get("completed")]
    return 1 if failed or not all(ok for _, ok in results) else 0


if __name__ == "__main__":
    sys.exit(main())
