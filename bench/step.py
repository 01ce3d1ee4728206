"""One denoising step of the real-size transformers on a GPU, jaxvid vs the PyTorch reference.

    python bench/step.py                       # every case, table on stdout
    python bench/step.py --cases cogvideox-2b --json step.json
    python bench/step.py --cases cogvideox-5b --step-cache 2 --no-torch   # pyramid attention broadcast
    python bench/step.py --cases "cogvideox-5b dense,longcat 720p bsa" --devices 1,2,4,8 --no-torch
    python bench/step.py --cases "cogvideox-5b,longcat 720p bsa" --precisions bf16,fp8   # 8-bit rows

--precisions bf16,fp8,...: one row per precision of each case (issue 19). "bf16": bf16 weights and
attention; "fp8": fp8 weights (the DiT linears in e4m3, jaxvid.models.fp8) and fp8 attention (the
plan's precision: the 8-bit kernel); "fp8-weights" / "fp8-attention": one of the two; "int8-fp8":
fp8 weights with int8-fp8 attention. Same random weights and inputs in every row; "rel L2" is each
row's step output against the bf16 row's (the cost of the precision in one step, random weights).

--devices 1,2,4,8: the same step on a ("cfg", "seq") device mesh of each size (jaxvid.parallel:
Ulysses over `seq`, `--mesh-cfg 2` puts the CFG halves on different devices; weights replicated),
one subprocess per count; the table adds speedup and efficiency = t(1) / (n * t(n)).
--check-unsharded also runs the plain single-device step and prints the rel. L2 difference (the
sharded code path checked on one GPU with --devices 1). --latent F,H,W shrinks the video.

Random bf16 weights (N(0, 0.02^2)), random inputs. Each measurement runs in its own subprocess so
JAX and PyTorch never share the GPU's memory. Printed per row: compile time (first call, JAX),
median ms per step over --repeats timed calls after a warm-up, peak device memory, and the ratio
to the PyTorch reference (diffusers 0.42.1 for CogVideoX, measured in the same run when diffusers
is importable, eager or with --torch-compile; LongCat's upstream numbers from ../shared/reference,
same H100 kind).

--step-cache N (CogVideoX cases): pyramid attention broadcast, recompute attention every N steps.
Times a step that computes attention (and returns the outputs to keep) and a step that reuses
them; "ms" is then the mean over one cycle ((N - 1) reusing + 1 computing steps). The quality
cost is measured as the relative L2 error of a reusing step's output (and of the kept attention
outputs) against the same step computed in full, the kept outputs coming from the step before
(timestep 500 -> 480, latents moved by 2% noise): with random weights a proxy, not a
video-quality number.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("bench.step")


@dataclass(frozen=True)
class StepCase:
    name: str
    model: str  # "cogvideox-2b" | "cogvideox-5b" | "longcat"
    batch: int
    latent: tuple[int, int, int]  # (frames, height, width) of the latent video
    text_tokens: int
    attention: str  # "dense" | "radial" | "bsa"
    reference_ms: float | None = None  # upstream PyTorch number from ../shared/reference


# Real sizes: CogVideoX 49 frames at 480x720 -> latent 13 x 60 x 90, CFG batch 2; LongCat 93 frames.
CASES: tuple[StepCase, ...] = (
    StepCase("cogvideox-2b dense", "cogvideox-2b", 2, (13, 60, 90), 226, "dense", 633.0),
    StepCase("cogvideox-2b radial", "cogvideox-2b", 2, (13, 60, 90), 226, "radial", 633.0),
    StepCase("cogvideox-5b dense", "cogvideox-5b", 2, (13, 60, 90), 226, "dense", 1825.0),
    StepCase("cogvideox-5b radial", "cogvideox-5b", 2, (13, 60, 90), 226, "radial", 1825.0),
    StepCase("longcat 480p dense", "longcat", 1, (24, 60, 104), 512, "dense", 4766.0),
    StepCase("longcat 720p dense", "longcat", 1, (24, 88, 160), 512, "dense", 15458.0),
    StepCase("longcat 720p bsa0.9375", "longcat", 1, (24, 88, 160), 512, "bsa", 7773.0),
)


# --precisions: name -> (weights, attention precision)
PRECISIONS: dict[str, tuple[str, str]] = {
    "bf16": ("bf16", "bf16"),
    "fp8": ("fp8", "fp8"),
    "fp8-weights": ("fp8", "bf16"),
    "fp8-attention": ("bf16", "fp8"),
    "int8-fp8": ("fp8", "int8-fp8"),
}


def parse_precisions(text: str) -> list[str]:
    """'bf16,fp8' -> ['bf16', 'fp8'] (order kept, duplicates dropped); ValueError naming what is known."""
    names = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in names if p not in PRECISIONS]
    if not names or unknown:
        raise ValueError(f"--precisions={text!r}: unknown {unknown or 'empty'}; expected comma-separated names "
                         f"from {list(PRECISIONS)}")
    return names


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---- JAX workers ------------------------------------------------------------------------------

def _jax_case(case: StepCase, repeats: int, smoke: bool = False, step_cache: int = 0, devices: int | None = None,
              mesh_cfg: int = 1, check_unsharded: bool = False, precision: str = "bf16",
              out_path: str | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jaxvid.synthetic.random_weights import random_model

    bf16 = jnp.bfloat16
    key = jax.random.key(1)
    weights, attention_precision = PRECISIONS[precision]
    f, h, w = case.latent
    if devices is not None and jax.default_backend() == "cpu" and jax.device_count() < devices:
        raise RuntimeError(f"--devices {devices} on CPU: run with XLA_FLAGS=--xla_force_host_platform_device_count=N")
    if case.model.startswith("cogvideox"):
        from jaxvid.attention.plan import AttentionPlan, Radial
        from jaxvid.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3D

        preset = CogVideoXConfig.cogvideox_2b if case.model == "cogvideox-2b" else CogVideoXConfig.cogvideox_5b
        cfg = preset(dtype=bf16, param_dtype=bf16)
        if smoke:  # tiny shapes, same code path: for checking this script on a CPU
            cfg = CogVideoXConfig.tiny(dtype=bf16, param_dtype=bf16, use_rotary_positional_embeddings=cfg.use_rotary_positional_embeddings)
            f, h, w = 3, 8, 8
            case = dataclasses.replace(case, text_tokens=cfg.max_text_seq_length)
        model = random_model(CogVideoXTransformer3D, cfg)
        plan = AttentionPlan(sparse=Radial(decay_factor=1.0, block_size=128)) if case.attention == "radial" else None
        if attention_precision != "bf16":
            plan = (plan or AttentionPlan.dense()).with_precision(attention_precision)
        x = jax.random.normal(key, (case.batch, f, cfg.in_channels, h, w), bf16)
        enc = jax.random.normal(key, (case.batch, case.text_tokens, cfg.text_embed_dim), bf16)
        t = jnp.full((case.batch,), 500, jnp.int32)
        args = (x, enc, t)

        def call(m, x, enc, t):
            return m(x, enc, t, attention=plan)
    else:
        from jaxvid.models.longcat import LongCatConfig, LongCatVideoTransformer3D

        cfg = LongCatConfig.longcat_video(dtype=bf16, param_dtype=bf16, enable_bsa=case.attention == "bsa",
                                          attention_precision=attention_precision)
        if smoke:
            cfg = LongCatConfig.tiny(dtype=bf16, param_dtype=bf16, enable_bsa=cfg.enable_bsa,
                                     attention_precision=attention_precision,
                                     bsa_params=dataclasses.replace(cfg.bsa_params, sparsity=0.5, chunk_3d_shape_q=(2, 2, 2), chunk_3d_shape_k=(2, 2, 2)))
            f, h, w = 4, 8, 8
        model = random_model(LongCatVideoTransformer3D, cfg)
        x = jax.random.normal(key, (case.batch, cfg.in_channels, f, h, w), bf16)
        enc = jax.random.normal(key, (case.batch, 1, case.text_tokens, cfg.caption_channels), bf16)
        mask = jnp.ones((case.batch, case.text_tokens), jnp.int32)
        t = jnp.full((case.batch,), 500.0, jnp.float32)
        args = (x, t, enc, mask)

        def call(m, x, t, enc, mask):
            return m(x, t, enc, mask)

    if weights == "fp8":
        from jaxvid.models.fp8 import quantize_model_fp8

        quantize_model_fp8(model)  # the same random weights, DiT linears in e4m3 + per-channel scales
    graphdef, state = nnx.split(model)
    if step_cache and case.model.startswith("cogvideox"):
        return _jax_step_cache(case, cfg, graphdef, state, args, plan, repeats, step_cache)
    if devices is not None:
        return _sharded_step(graphdef, state, call, args, repeats, devices, mesh_cfg, check_unsharded)
    step = jax.jit(lambda state, *a: call(nnx.merge(graphdef, state), *a))
    t0 = time.perf_counter()
    jax.block_until_ready(step(state, *args))
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(step(state, *args))
    ms = _median_ms(lambda: jax.block_until_ready(step(state, *args)), repeats)
    stats = jax.devices()[0].memory_stats() or {}
    if out_path:  # the step's output, for the driver's rel. L2 against the bf16 row
        import numpy as np

        np.save(out_path, np.asarray(out.astype(jnp.float32)))
    return {"impl": "jaxvid", "ms": ms, "compile_s": compile_s, "precision": precision,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}


def _jax_step_cache(case, cfg, graphdef, state, args, plan, repeats: int, n: int) -> dict:
    """Pyramid attention broadcast: one computing and one reusing step, and the reuse error."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    x, enc, t = args
    p = cfg.patch_size
    tokens = enc.shape[1] + x.shape[1] // (cfg.patch_size_t or 1) * (x.shape[3] // p) * (x.shape[4] // p)
    cache = jnp.zeros((cfg.num_layers, x.shape[0], tokens, cfg.inner_dim), x.dtype)
    step = jax.jit(lambda state, x, enc, t, cache, reuse: nnx.merge(graphdef, state)(
        x, enc, t, attention=plan, attention_cache=cache, reuse_attention=reuse))
    compute, reuse = jnp.asarray(False), jnp.asarray(True)
    t0 = time.perf_counter()
    _, kept = jax.block_until_ready(step(state, x, enc, t, cache, compute))
    compile_s = time.perf_counter() - t0
    ms_compute = _median_ms(lambda: jax.block_until_ready(step(state, x, enc, t, kept, compute)), repeats)
    ms_reuse = _median_ms(lambda: jax.block_until_ready(step(state, x, enc, t, kept, reuse)), repeats)
    x2 = (x.astype(jnp.float32) + 0.02 * jax.random.normal(jax.random.key(2), x.shape)).astype(x.dtype)
    t2 = jnp.full_like(t, 480)
    full, fresh = step(state, x2, enc, t2, kept, compute)
    cached, _ = step(state, x2, enc, t2, kept, reuse)

    def rel(a, b):  # slice by slice: the kept attention of 5b is ~9 GB, twice that in float32
        num = den = 0.0
        for i in range(a.shape[0]):
            ai, bi = a[i].astype(jnp.float32), b[i].astype(jnp.float32)
            num, den = num + float(jnp.sum((ai - bi) ** 2)), den + float(jnp.sum(bi * bi))
        return (num / den) ** 0.5

    err, attn_err = rel(cached, full), rel(kept, fresh)
    stats = jax.devices()[0].memory_stats() or {}
    return {"impl": "jaxvid", "ms": ((n - 1) * ms_reuse + ms_compute) / n, "compile_s": compile_s,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "step_cache": n, "ms_compute": ms_compute,
            "ms_reuse": ms_reuse, "reuse_rel_err": err, "attention_rel_err": attn_err}


def _sharded_step(graphdef, state, call, args, repeats: int, devices: int, mesh_cfg: int,
                  check_unsharded: bool) -> dict:
    """The step on a (cfg, seq) mesh of `devices` devices; optionally vs the plain single-device step."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxvid.parallel import describe_mesh, make_mesh, mesh_context, place_replicated

    def fn(state, *a):
        return call(nnx.merge(graphdef, state), *a)

    rel_l2 = None
    if check_unsharded:
        plain = np.asarray(jax.jit(fn)(state, *args), np.float32)
    mesh = make_mesh(devices, axes={"cfg": mesh_cfg, "seq": devices // mesh_cfg})
    state, args = place_replicated((state, args), mesh)
    with mesh_context(mesh):
        step = jax.jit(fn)
        t0 = time.perf_counter()
        out = jax.block_until_ready(step(state, *args))
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(step(state, *args))
        ms = _median_ms(lambda: jax.block_until_ready(step(state, *args)), repeats)
    if check_unsharded:
        got = np.asarray(out, np.float32)
        rel_l2 = float(np.linalg.norm(got - plain) / np.linalg.norm(plain))
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in mesh.devices.flat]
    return {"impl": "jaxvid", "ms": ms, "compile_s": compile_s, "peak_gib": max(peaks) / 2**30, "devices": devices,
            "mesh": describe_mesh(mesh), "rel_l2_vs_unsharded": rel_l2}


# ---- PyTorch worker (diffusers CogVideoX) -------------------------------------------------------

def _torch_case(case: StepCase, repeats: int, compile_model: bool = False) -> dict:
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jaxvid.models.cogvideox import CogVideoXConfig

    preset = CogVideoXConfig.cogvideox_2b if case.model == "cogvideox-2b" else CogVideoXConfig.cogvideox_5b
    hf = {k: v for k, v in preset().to_hf_config().items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = CogVideoXTransformer3DModel(**hf).to(torch.bfloat16).eval()
    f, h, w = case.latent
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(case.batch, f, hf["in_channels"], h, w, device=dev, dtype=bf16)
    enc = torch.randn(case.batch, case.text_tokens, hf["text_embed_dim"], device=dev, dtype=bf16)
    t = torch.full((case.batch,), 500, device=dev, dtype=torch.int64)
    rope = None
    if hf.get("use_rotary_positional_embeddings"):
        p = hf["patch_size"]
        # 480x720 is the base grid (sample_height/width), so the crop region is the whole grid.
        rope = get_3d_rotary_pos_embed(hf["attention_head_dim"], ((0, 0), (h // p, w // p)), (h // p, w // p), f, device=dev)

    fn = torch.compile(model) if compile_model else model

    def run():
        with torch.no_grad():
            fn(hidden_states=x, encoder_hidden_states=enc, timestep=t, image_rotary_emb=rope, return_dict=False)
        torch.cuda.synchronize()

    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0 if compile_model else None
    run()
    torch.cuda.reset_peak_memory_stats()
    ms = _median_ms(run, repeats)
    return {"impl": "diffusers+torch.compile" if compile_model else "diffusers", "ms": ms, "compile_s": compile_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


# ---- driver ------------------------------------------------------------------------------------

def _run_worker(kind: str, case: StepCase, repeats: int, timeout: int, smoke: bool = False,
                extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--cases", case.name, "--repeats", str(repeats)]
    cmd += ["--smoke"] if smoke else []
    cmd += list(extra)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if smoke and "--worker-devices" in extra:  # a CPU check of the sharded path: forced host devices
        n = extra[extra.index("--worker-devices") + 1]
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"impl": kind, "error": f"timeout after {timeout}s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    lines = (out.stderr or out.stdout).strip().splitlines()
    errors = [ln for ln in lines if "Error" in ln or "error" in ln] or lines[-1:]
    return {"impl": kind, "error": errors[-1][-300:] if errors else f"exit {out.returncode}"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names or model prefixes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--no-torch", action="store_true", help="skip the diffusers reference")
    ap.add_argument("--torch-compile", action="store_true",
                    help="the diffusers reference through torch.compile (its compile time is not in ms)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per measurement subprocess")
    ap.add_argument("--smoke", action="store_true", help="tiny configs and shapes (check the script on a CPU)")
    ap.add_argument("--step-cache", type=int, default=0, metavar="N",
                    help="CogVideoX: pyramid attention broadcast, attention recomputed every N steps (0: off)")
    ap.add_argument("--devices", default=None,
                    help="comma-separated device counts, e.g. 1,2,4,8: the step on a device mesh of each size")
    ap.add_argument("--mesh-cfg", type=int, choices=(1, 2), default=1,
                    help="with --devices: 2 = the CFG halves (batch 2) on different devices, seq = the rest")
    ap.add_argument("--check-unsharded", action="store_true",
                    help="with --devices: also run the plain single-device step and report the rel. L2 difference")
    ap.add_argument("--latent", default=None, help="F,H,W latent size replacing the cases' (a smaller check)")
    ap.add_argument("--precisions", default="bf16",
                    help=f"comma-separated rows per case, from {list(PRECISIONS)} (weights / attention; see above)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-devices", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        precisions = parse_precisions(args.precisions)
    except ValueError as e:
        ap.error(str(e))
    if args.worker and len(precisions) != 1:
        ap.error("--worker takes exactly one --precisions entry")
    device_counts = _device_counts(ap, args)
    wanted = [s.strip() for s in args.cases.split(",") if s.strip()]
    cases = [c for c in CASES if c.name in wanted or any(c.name.startswith(w) for w in wanted)]
    if not cases:
        ap.error(f"--cases: no case matches {wanted}; known: {[c.name for c in CASES]}")
    if args.latent:
        try:
            latent = tuple(int(x) for x in args.latent.split(","))
        except ValueError:
            latent = ()
        if len(latent) != 3 or min(latent) < 1:
            ap.error(f"--latent={args.latent!r}; expected three positive ints F,H,W")
        cases = [dataclasses.replace(c, latent=latent) for c in cases]

    if args.worker:
        case = cases[0]
        if args.worker == "jax":
            res = _jax_case(case, args.repeats, args.smoke, args.step_cache, args.worker_devices, args.mesh_cfg,
                            args.check_unsharded, precisions[0], args.worker_out)
        else:
            res = _torch_case(case, args.repeats, args.torch_compile)
        print("RESULT " + json.dumps(res), flush=True)
        return

    if device_counts:
        _scaling(cases, device_counts, args, precisions)
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    torch_done: dict[str, dict] = {}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        for case in cases:
            outputs: dict[str, str] = {}
            for precision in precisions:
                extra: tuple[str, ...] = ("--precisions", precision)
                extra += ("--step-cache", str(args.step_cache)) if args.step_cache else ()
                extra += ("--latent", args.latent) if args.latent else ()
                if len(precisions) > 1 and not args.step_cache:
                    outputs[precision] = os.path.join(tmp, f"{len(rows)}.npy")
                    extra += ("--worker-out", outputs[precision])
                res = _run_worker("jax", case, args.repeats, args.timeout, args.smoke, extra)
                if "error" not in res and precision != "bf16" and "bf16" in outputs:
                    res["rel_l2_vs_bf16"] = _rel_l2_files(outputs[precision], outputs["bf16"])
                ref = None
                if case.model.startswith("cogvideox") and not args.no_torch and not args.smoke:
                    if case.model not in torch_done:
                        torch_done[case.model] = _run_worker("torch", case, args.repeats, args.timeout, extra=(
                            ("--torch-compile",) if args.torch_compile else ()))
                    ref = torch_done[case.model]
                rows.append({"case": case.name, "precision": precision, "jaxvid": res, "torch_same_run": ref,
                             "reference_ms": case.reference_ms})
                log.info("%s [%s]: %s", case.name, precision, res)

    if not args.no_torch and not args.smoke:
        print(f"torch: diffusers 0.42.1 {'through torch.compile' if args.torch_compile else 'eager'} (CogVideoX rows); "
              "ref: upstream's numbers (bench/results/reference)")
    hdr = (f"{'case':26s} {'precision':>13s} {'jaxvid ms':>10s} {'compile s':>9s} {'peak GiB':>8s} {'torch ms':>9s} "
           f"{'torch GiB':>9s} {'x torch':>7s} {'ref ms':>7s} {'x ref':>6s} {'rel L2 vs bf16':>14s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        j, t = r["jaxvid"], r["torch_same_run"] or {}
        if "error" in j:
            print(f"{r['case']:26s} {r['precision']:>13s} ERROR {j['error']}")
            continue
        tm = t.get("ms")
        x_t = f"{tm / j['ms']:.2f}" if tm else "-"
        x_r = f"{r['reference_ms'] / j['ms']:.2f}" if r["reference_ms"] else "-"
        tms = f"{tm:9.1f}" if tm else f"{'-':>9s}"
        tgib = f"{t.get('peak_gib', 0):9.1f}" if tm else f"{'-':>9s}"
        rel = f"{j['rel_l2_vs_bf16']:.4f}" if j.get("rel_l2_vs_bf16") is not None else "-"
        print(
            f"{r['case']:26s} {r['precision']:>13s} {j['ms']:10.1f} {j['compile_s']:9.1f} {j['peak_gib']:8.1f} {tms} "
            f"{tgib} {x_t:>7s} {(r['reference_ms'] or 0):7.0f} {x_r:>6s} {rel:>14s}"
        )
        if t.get("error"):
            print(f"{'':26s} torch error: {t['error']}")
        if j.get("step_cache"):
            print(f"{'':26s} step cache every {j['step_cache']}: computing step {j['ms_compute']:.1f} ms, reusing "
                  f"step {j['ms_reuse']:.1f} ms; reuse rel L2 error: output {j['reuse_rel_err']:.2e}, attention "
                  f"{j['attention_rel_err']:.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


def _rel_l2_files(path: str, ref_path: str) -> float | None:
    """Relative L2 of one saved step output against another (None if either is missing)."""
    import numpy as np

    if not (os.path.exists(path) and os.path.exists(ref_path)):
        return None
    a, b = np.load(path).astype(np.float64), np.load(ref_path).astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _device_counts(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    if args.devices is None:
        return []
    try:
        counts = [int(x) for x in args.devices.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or any(n % args.mesh_cfg for n in counts):
        ap.error(f"--devices={args.devices!r}; expected comma-separated positive ints (multiples of --mesh-cfg="
                 f"{args.mesh_cfg})")
    return counts


def _scaling(cases: list[StepCase], counts: list[int], args: argparse.Namespace,
             precisions: tuple[str, ...] | list[str] = ("bf16",)) -> None:
    """One worker per (case, precision, device count); step time, speedup and efficiency against the
    smallest count (rows of a precision other than bf16 are named "<case> [<precision>]")."""
    rows = []
    for case, precision in [(c, p) for c in cases for p in precisions]:
        base = None
        label = case.name if precision == "bf16" else f"{case.name} [{precision}]"
        for n in counts:
            extra = ("--worker-devices", str(n), "--mesh-cfg", str(args.mesh_cfg), "--precisions", precision)
            extra += ("--check-unsharded",) if args.check_unsharded else ()
            extra += ("--latent", args.latent) if args.latent else ()
            res = _run_worker("jax", case, args.repeats, args.timeout, args.smoke, extra)
            if "error" not in res and base is None:
                base = (n, res["ms"])
            if "error" not in res and base:
                speedup = base[1] / res["ms"]
                res["speedup"], res["efficiency"] = speedup, speedup * base[0] / n
            latent = "smoke" if args.smoke else "x".join(map(str, case.latent))
            rows.append({"case": label, "latent": latent, "devices": n, "jaxvid": res})
            log.info("%s on %d device(s): %s", label, n, res)
    hdr = (f"{'case':26s} {'latent':>12s} {'mesh':>32s} {'ms':>9s} {'speedup':>7s} {'effic.':>6s} {'compile s':>9s} "
           f"{'peak GiB':>8s} {'rel L2':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        j = r["jaxvid"]
        if "error" in j:
            print(f"{r['case']:26s} {r['devices']} device(s): ERROR {j['error']}")
            continue
        rel = j.get("rel_l2_vs_unsharded")
        print(f"{r['case']:26s} {r['latent']:>12s} {j['mesh'][:32]:>32s} {j['ms']:9.1f} "
              f"{j.get('speedup', float('nan')):7.2f} {j.get('efficiency', float('nan')):6.2f} {j['compile_s']:9.1f} "
              f"{j['peak_gib']:8.1f} {'-' if rel is None else format(rel, '.1e'):>8s}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
