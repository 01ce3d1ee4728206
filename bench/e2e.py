"""Time to first video: one prompt -> mp4, each configuration in a fresh process, one diffusers folder.

    python bench/e2e.py --model 5b --steps 5                    # diffusers, jaxvid cold and warm cache
    python bench/e2e.py --model 2b --steps 5 --frames 13 --height 240 --width 360 --configs jaxvid-cold,jaxvid-warm
    python bench/e2e.py --smoke                                 # the tiny pipeline on a CPU (jaxvid and diffusers)
    python bench/e2e.py --model longcat --steps 2 --configs jaxvid-cold,jaxvid-warm,jaxvid-warm:blocks@20
    python bench/e2e.py --model longcat --smoke                 # the tiny LongCat pipeline on a CPU

Configurations: `diffusers` (eager, bf16, vae.enable_tiling()), `diffusers-compile` (the
transformer through torch.compile), `jaxvid-cold` (an empty persistent compilation cache),
`jaxvid-warm` (the cache the cold run filled). A suffix `:POLICY` sets jaxvid's offload policy
(`jaxvid-warm:blocks`; none / text (default) / model / blocks) and `@N` makes only N GiB of the GPU
usable (XLA_PYTHON_CLIENT_MEM_FRACTION, from BENCH_GPU_GIB = the GPU's size, default 139.8 for an
H200): `jaxvid-warm:model@16`; `/radial` runs jaxvid with radial attention as `--attention radial --preset
auto` does (`jaxvid-warm/radial`: its first run in a cache filled by dense runs compiles the radial
denoiser, so list it twice for a warm row).

The folder is CogVideoX-2b or -5b at real size (T5-XXL, VAE, transformer) with random
N(0, 0.02) bf16 weights (norm scales 1; drawn from a fixed random pool, so writing 20 GB takes
seconds), the tiny 100-piece T5 tokenizer (spiece.model for jaxvid, tokenizer.json for
transformers), DDIM; both libraries read the same files. Kept in --dir between runs.

LongCat-Video (`--model longcat`, jaxvid only): a real-size folder in upstream's layout (dit/ 13.6B,
text_encoder/ umT5-XXL, vae/ Wan 2.1, the tiny tokenizer, scheduler/; jaxvid.synthetic.longcat
.write_random_longcat, ~39 GB of bf16 from the same random pool), t2v as `jaxvid generate` runs it
(guidance 4, 93 x 480 x 832 by default); `/bsa` runs block sparse attention as the CLI's `--bsa`
does (parameters by resolution: 480p 0.875, 4x4x8). Upstream's LongCat pipeline cannot run beside
it: it is not on PyPI and the GPU machine has no network, so the table is followed by the
reference step of upstream's own DiT code (bench/results/reference/peer_torch_step_h100.json, H100)
where the shape is 480p 93 frames.

Columns (seconds): load (from_pretrained until the weights are on the GPU), compile (jaxvid: every
compile or persistent-cache load; torch.compile: first step minus the median step), steps (prompt
encoding + denoising, compile excluded), decode (tiled VAE decode + to uint8, compile excluded),
write (mp4 through OpenCV for both when it is installed), total (wall from the start of loading to
the written file; imports excluded), peak GiB (torch.cuda.max_memory_allocated / XLA's
peak_bytes_in_use; 0 on a CPU). The JSON rows add per-step seconds, the peak right after loading
and, for jaxvid, how many XLA programs were compiled, how many came from the cache and, of those, how
many were read from jaxvid's executable store without tracing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

PROMPT = "A panda, dressed in a small red jacket, plays a guitar by a calm lake at sunset."
POOL_SIZE = 1 << 24
GIB = 1024**3
COLUMNS = ("load", "compile", "steps", "decode", "write", "total", "peak_gib")


# ------------------------------------------------------------------------------ the folder


def write_folder(folder: Path, model: str, smoke: bool) -> Path:
    """A diffusers CogVideoX pipeline folder (or an upstream-layout LongCat-Video folder for
    model="longcat") at real size (the tiny one with `smoke`), random bf16 weights."""
    from jaxvid.models.cogvideox import CogVideoXConfig
    from jaxvid.models.t5 import T5Config
    from jaxvid.models.vae_cogvideox import CogVideoXVAEConfig
    from jaxvid.synthetic import cogvideox as synth

    if (folder / ("scheduler" if model == "longcat" else "model_index.json")).exists():
        return folder  # complete: the folder appears only by the rename below
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if model == "longcat":
        from jaxvid.synthetic import longcat

        if smoke:
            longcat.write_tiny_longcat(tmp, loras=False)
        else:
            longcat.write_random_longcat(tmp, values=synth.pooled_random_values(POOL_SIZE))
    elif smoke:
        synth.write_tiny_pipeline(tmp)
        synth.write_tokenizer_json(tmp / "tokenizer")  # transformers 5 reads tokenizer.json as it is
    else:
        tcfg = CogVideoXConfig.cogvideox_5b() if model == "5b" else CogVideoXConfig.cogvideox_2b()
        vcfg = CogVideoXVAEConfig.cogvideox_5b() if model == "5b" else CogVideoXVAEConfig.cogvideox_2b()
        synth.write_random_full_pipeline(tmp, tcfg, vcfg, T5Config.t5_v1_1_xxl(), max_shard_bytes=5 * 10**9,
                                         values=synth.pooled_random_values(POOL_SIZE))
    tmp.rename(folder)
    return folder


# ------------------------------------------------------------------------------ writers and workers


def write_mp4(frames, path: Path, fps: int = 8) -> None:
    """uint8 [F, H, W, 3] RGB -> mp4 with OpenCV (the same writer for both libraries), else jaxvid's."""
    try:
        import cv2
    except ImportError:
        from jaxvid import video

        video.save(frames, path, fps=fps)
        return
    h, w = frames.shape[1:3]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        out.write(f[..., ::-1])
    out.release()


def _jax_peak_gib() -> float:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / GIB


def run_jaxvid(args: argparse.Namespace) -> dict:
    import jax

    from jaxvid.compile_cache import CompileCounter, enable_compile_cache
    from jaxvid.pipelines.cogvideox import CogVideoXPipeline

    events: dict[str, float] = {}

    def on_duration(event: str, duration: float, **_: object) -> None:  # where compile time goes, by JAX event
        events[event] = events.get(event, 0.0) + duration

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    with CompileCounter() as counter:
        t0 = time.perf_counter()
        jax.devices()  # CUDA start, reported apart from reading weights
        device_init = time.perf_counter() - t0
        enable_compile_cache(args.cache_dir)
        if args.model == "longcat":
            res = _run_longcat(args, t0)
            return {**res, "total": time.perf_counter() - t0, "peak_gib": _jax_peak_gib(),
                    "programs_compiled": counter.compiled, "programs_from_cache": counter.cache_hits,
                    "programs_without_tracing": counter.executable_hits, "device_init": device_init,
                    "jax_event_seconds": {k: round(v, 3) for k, v in sorted(events.items(), key=lambda kv: -kv[1])[:25]}}
        dtype = "fp32" if args.smoke else "bf16"
        offload = args.worker.split("@")[0].partition(":")[2].partition("/")[0] or None
        pipe = CogVideoXPipeline.from_pretrained(args.folder, dtype=dtype, offload=offload)
        jax.block_until_ready(pipe.transformer.state)
        load = time.perf_counter() - t0
        peak_load = _jax_peak_gib()
        pipe.enable_vae_tiling()
        attention = None
        if args.worker.split("@")[0].partition(":")[0].endswith("/radial"):
            from jaxvid.attention.plan import AttentionPlan
            from jaxvid.attention.presets import radial_preset

            preset = radial_preset(args.frames)  # the CLI's --attention radial --preset auto
            attention = AttentionPlan.radial_cogvideox(dense_layers=preset.dense_layers,
                                                       dense_timesteps=preset.dense_timesteps)
        out = pipe(PROMPT, num_frames=args.frames, height=args.height, width=args.width,
                   num_inference_steps=args.steps, guidance_scale=6.0, seed=0, progress=False,
                   attention=attention)
        frames = out.frames[0]
        t = pipe.last_timings
        t1 = time.perf_counter()
        write_mp4(frames, Path(args.out))
        write = time.perf_counter() - t1
    return {"load": load, "compile": t["compile"], "steps": t["encode"] + t["steps"], "decode": t["decode"],
            "write": write, "total": time.perf_counter() - t0, "peak_gib": _jax_peak_gib(),
            "peak_after_load_gib": peak_load, "per_step": t["per_step"],
            "decode_compile": pipe._decode.last_compile_seconds, "programs_compiled": counter.compiled,
            "programs_from_cache": counter.cache_hits, "programs_without_tracing": counter.executable_hits, "offload": pipe.offload.policy, "frames": list(frames.shape),
            "device_init": device_init, "timings": dict(t),
            "jax_event_seconds": {k: round(v, 3) for k, v in sorted(events.items(), key=lambda kv: -kv[1])[:25]}}


def _run_longcat(args: argparse.Namespace, t0: float) -> dict:
    """One LongCat-Video t2v video (jaxvid), from loading the folder to the written mp4; the caller
    adds total, peak and the compile counts. `load` counts from the worker's start (CUDA start too),
    as for CogVideoX."""
    import jax
    import jax.numpy as jnp

    from jaxvid.pipelines.longcat import LongCatPipeline

    config = args.worker.split("@")[0]
    offload = config.partition("/")[0].partition(":")[2] or None
    pipe = LongCatPipeline.from_pretrained(args.folder, dtype=jnp.float32 if args.smoke else jnp.bfloat16,
                                           offload=offload, progress=False)
    jax.block_until_ready(pipe.components["dit"].state)
    load = time.perf_counter() - t0
    peak_load = _jax_peak_gib()
    if config.partition("/")[2] == "bsa":
        pipe.enable_bsa_by_resolution()  # the CLI's --bsa: parameters by resolution
    t1 = time.perf_counter()
    out = pipe.generate_t2v(PROMPT, num_frames=args.frames, height=args.height, width=args.width,
                            num_inference_steps=args.steps, seed=0, output_type="latent")
    jax.block_until_ready(out.latents)
    call = time.perf_counter() - t1
    t = dict(pipe.last_timings)
    encode_compile = pipe._encode_text.last_compile_seconds
    t2 = time.perf_counter()
    frames = pipe._finish(out.latents, "uint8").frames[0]  # VAE decode + uint8, as generate_t2v does
    decode_compile = pipe._vae_decode.last_compile_seconds
    decode = time.perf_counter() - t2 - decode_compile
    t3 = time.perf_counter()
    write_mp4(frames, Path(args.out), fps=out.fps)
    write = time.perf_counter() - t3
    return {"load": load, "compile": t["compile"] + encode_compile + decode_compile,
            "steps": call - t["compile"] - encode_compile, "decode": decode, "write": write,
            "peak_after_load_gib": peak_load, "per_step": t["per_step"], "decode_compile": decode_compile,
            "attention": pipe.last_attention, "offload": pipe.offload.policy, "frames": list(frames.shape),
            "timings": t}


def run_diffusers(args: argparse.Namespace, compiled: bool) -> dict:
    import numpy as np
    import torch
    from diffusers import CogVideoXPipeline

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    dtype = torch.float32 if args.smoke else torch.bfloat16
    pipe = CogVideoXPipeline.from_pretrained(args.folder, torch_dtype=dtype).to("cuda" if cuda else "cpu")
    sync()
    load = time.perf_counter() - t0
    peak_load = torch.cuda.max_memory_allocated() / GIB if cuda else 0.0
    pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        pipe.transformer = torch.compile(pipe.transformer)
    marks: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        sync()
        marks.append(time.perf_counter())
        return kwargs

    t_call = time.perf_counter()
    with torch.no_grad():
        latents = pipe(PROMPT, num_frames=args.frames, height=args.height, width=args.width,
                       num_inference_steps=args.steps, guidance_scale=6.0, output_type="latent",
                       generator=torch.Generator("cuda" if cuda else "cpu").manual_seed(0),
                       callback_on_step_end=on_step_end).frames
        sync()
        call = time.perf_counter() - t_call
        steps = np.diff([t_call] + marks)
        median = float(np.median(steps[1:])) if len(steps) > 1 else float(steps[0])
        compile_s = max(float(steps[0]) - median, 0.0) if compiled else 0.0
        t1 = time.perf_counter()
        video = pipe.decode_latents(latents)
        frames = pipe.video_processor.postprocess_video(video=video, output_type="np")[0]
        frames = np.round(np.clip(frames, 0, 1) * 255).astype(np.uint8)
        sync()
        decode = time.perf_counter() - t1
    t2 = time.perf_counter()
    write_mp4(frames, Path(args.out))
    write = time.perf_counter() - t2
    return {"load": load, "compile": compile_s, "steps": call - compile_s, "decode": decode, "write": write,
            "total": time.perf_counter() - t0, "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else 0.0,
            "peak_after_load_gib": peak_load, "per_step": median, "frames": list(frames.shape)}


def _worker(args: argparse.Namespace) -> None:
    config = args.worker.split("@")[0].partition(":")[0]
    if config == "diffusers":
        res = run_diffusers(args, compiled=False)
    elif config == "diffusers-compile":
        res = run_diffusers(args, compiled=True)
    elif args.profile:  # where the wall time of a jaxvid run goes, Python side (cProfile, to the log folder)
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        res = prof.runcall(run_jaxvid, args)
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("cumulative").print_stats(70)
        stats.sort_stats("tottime").print_stats(40)
        Path(args.profile).write_text(text.getvalue())
    else:
        res = run_jaxvid(args)
    print("RESULT " + json.dumps(res, default=str), flush=True)


# ------------------------------------------------------------------------------ driver

_KNOWN = ("diffusers", "diffusers-compile", "jaxvid-cold", "jaxvid-warm")


def _check_config(config: str, model: str = "5b") -> None:
    name, _, limit = config.partition("@")
    name, _, attention = name.partition("/")
    base, _, policy = name.partition(":")
    if base not in _KNOWN:
        raise SystemExit(f"--configs: {config!r}; expected one of {_KNOWN}, optionally with :POLICY, /radial and @GiB")
    if model == "longcat":
        if base.startswith("diffusers"):
            raise SystemExit(f"--configs: {config!r}; --model longcat runs jaxvid only (upstream's LongCat pipeline "
                             "is not installable here)")
        if attention and attention != "bsa":
            raise SystemExit(f"--configs: {config!r}; --model longcat takes /bsa (the CLI's --bsa), not /{attention}")
    elif attention and (attention != "radial" or base.startswith("diffusers")):
        raise SystemExit(f"--configs: {config!r}; /radial (the CLI's --attention radial --preset auto) is for jaxvid only")
    if policy and (base.startswith("diffusers") or policy not in ("none", "text", "model", "blocks")):
        raise SystemExit(f"--configs: {config!r}; :POLICY is none/text/model/blocks, for jaxvid only")
    if limit:
        try:
            if float(limit) <= 0:
                raise ValueError
        except ValueError:
            raise SystemExit(f"--configs: {config!r}; @N needs a positive number of GiB") from None


def _file_stem(config: str) -> str:
    return config.replace(":", "-").replace("@", "_").replace("/", "+")


def _run_config(config: str, args: argparse.Namespace, folder: Path, workdir: Path, timeout: float) -> dict:
    name, _, limit = config.partition("@")
    base = name.partition("/")[0].partition(":")[0]
    env = dict(os.environ)
    cache = Path(args.cache_dir) if args.cache_dir else workdir / "jax-compile-cache"
    if base == "jaxvid-cold":
        shutil.rmtree(cache, ignore_errors=True)
    if limit:
        total = float(os.environ.get("BENCH_GPU_GIB", "139.8"))
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{float(limit) / total:.4f}"
    if args.smoke:
        env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--folder", str(folder),
           "--cache-dir", str(cache), "--steps", str(args.steps), "--frames", str(args.frames),
           "--height", str(args.height), "--width", str(args.width), "--model", args.model,
           "--out", str(workdir / f"{_file_stem(config)}.mp4")]
    cmd += ["--smoke"] if args.smoke else []
    log_dir = Path(args.log_dir) if args.log_dir else workdir
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{_file_stem(config)}.log"
    if args.profile and base.startswith("jaxvid"):
        cmd += ["--profile", str(log_dir / f"{_file_stem(config)}.prof.txt")]
    if args.log_dir:
        cmd += ["--verbose"]
        env["JAX_LOG_COMPILES"] = "1"
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:  # a file, not a pipe: what a killed worker wrote is kept
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:  # subprocess.run kills the worker
            return {"error": f"timeout after {timeout:.0f} s (log: {log_path})"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        tail = [ln for ln in log_path.read_text().strip().splitlines() if ln.strip()][-3:]
        return {"error": " | ".join(tail)[-400:]}
    return {**json.loads(lines[-1][len("RESULT "):]), "process_s": time.perf_counter() - t0}


def format_table(rows: list[dict], title: str) -> str:
    head = f"| config | {' | '.join(c.replace('_gib', ' GiB') for c in COLUMNS)} |"
    lines = [title, "", head, "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | ERROR: {r['error']} |")
            continue
        lines.append(f"| {r['config']} | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def longcat_reference(rows: list[dict], frames: int, height: int, width: int) -> str:
    """Our LongCat rows' step time beside upstream's own DiT step (CFG batch 2) where the shape is
    the reference's (480p, 93 frames); a line saying there is none otherwise."""
    path = REPO_ROOT / "bench" / "results" / "reference" / "peer_torch_step_h100.json"
    case = "LongCat DiT step B2 480p 93f CFG"
    refs = {r["case"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
    if (frames, height, width) != (93, 480, 832) or case not in refs:
        return f"(no upstream reference step for {frames} x {height} x {width}; {path.name} has 480p 93 frames)"
    ref = refs[case]
    lines = ["", f"per step vs upstream's LongCat DiT ({case}, eager PyTorch, H100, {path.name}: "
             f"{ref['ms'] / 1000:.3f} s/step, peak {ref['peak_gib']:.1f} GiB for the DiT alone)", "",
             "| config | s / step | x upstream | peak GiB |", "|---|---|---|---|"]
    for r in rows:
        if "per_step" in r:
            lines.append(f"| {r['config']} | {r['per_step']:.3f} | {r['per_step'] * 1000 / ref['ms']:.2f} | "
                         f"{r['peak_gib']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("2b", "5b", "longcat"), default="5b")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--frames", type=int, default=None, help="default 49, LongCat 93 (9 with --smoke)")
    ap.add_argument("--height", type=int, default=None, help="default 480 (32 with --smoke)")
    ap.add_argument("--width", type=int, default=None, help="default 720, LongCat 832 (32 with --smoke)")
    ap.add_argument("--configs", default=None,
                    help="comma-separated: diffusers, diffusers-compile, jaxvid-cold, jaxvid-warm[:POLICY][/radial]"
                    "[@GiB] (LongCat: jaxvid only, /bsa); default diffusers,jaxvid-cold,jaxvid-warm "
                    "(LongCat: jaxvid-cold,jaxvid-warm,jaxvid-warm/bsa)")
    ap.add_argument("--dir", default=None, help="work folder, kept (default: a temp folder, removed at the end)")
    ap.add_argument("--json", default=None, help="write the title and rows here")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration (a cold 5b run needs >= 300)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run: each configuration gets at most what is left, and those "
                    "that would start with under 20 s left are skipped (rows say so)")
    ap.add_argument("--smoke", action="store_true", help="the tiny pipeline, fp32, on a CPU")
    ap.add_argument("--log-dir", default=None,
                    help="keep each worker's log here (CONFIG.log: INFO logging and every XLA compile with its "
                    "time); also kept for a run that times out")
    ap.add_argument("--profile", nargs="?", const=True, default=None,
                    help="profile each jaxvid run with cProfile (text next to its log; see --log-dir)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None,
                    help="jaxvid's persistent compilation cache (default: DIR/jax-compile-cache); jaxvid-cold empties it")
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps={args.steps}; expected a positive int")
    longcat = args.model == "longcat"
    defaults = (9, 32, 32) if args.smoke else (93, 480, 832) if longcat else (49, 480, 720)
    args.frames, args.height, args.width = (v if v is not None else d for v, d in
                                            zip((args.frames, args.height, args.width), defaults))
    if args.worker:
        if args.verbose:
            import logging

            logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
        _worker(args)
        return 0
    if args.configs is None:
        args.configs = "jaxvid-cold,jaxvid-warm,jaxvid-warm/bsa" if longcat else "diffusers,jaxvid-cold,jaxvid-warm"
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        _check_config(c, args.model)
    import tempfile

    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="jaxvid-e2e-"))
    workdir.mkdir(parents=True, exist_ok=True)
    name = "tiny" if args.smoke else args.model
    title = (f"CogVideoX-{name}, {args.frames} x {args.height} x {args.width}, {args.steps} steps, CFG 6, DDIM, "
             f"random {'fp32' if args.smoke else 'bf16'} weights")
    if longcat:
        title = (f"LongCat-Video{' tiny' if args.smoke else ''} t2v, {args.frames} x {args.height} x {args.width}, "
                 f"{args.steps} steps, CFG 4, flow matching, random {'fp32' if args.smoke else 'bf16'} weights")
    try:
        t0 = time.perf_counter()
        folder = write_folder(workdir / (f"longcat-{'tiny' if args.smoke else 'video'}" if longcat
                                         else f"cogvideox-{name}"), args.model, args.smoke)
        print(f"folder {folder} ready in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        for config in configs:
            timeout = float(args.timeout)
            if args.budget is not None:
                timeout = min(timeout, args.budget - (time.perf_counter() - t0))
            if timeout < 20:
                res = {"config": config, "error": "skipped: --budget spent"}
            else:
                res = {"config": config, **_run_config(config, args, folder, workdir, timeout)}
            print(json.dumps(res), flush=True)
            rows.append(res)
            if args.json:  # after every row, so a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps({"title": title, "rows": rows}, indent=1))
        print(format_table(rows, title), flush=True)
        if longcat and not args.smoke:
            print(longcat_reference(rows, args.frames, args.height, args.width), flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
