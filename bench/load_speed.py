"""Where loading time goes: file bytes, raw host->device copies, and jaxvid's loader, per component.

    python bench/load_speed.py --folder /tmp/jaxvid-e2e/cogvideox-2b     # a folder bench/e2e.py wrote
    python bench/load_speed.py --folder DIR --threads 4,8,16
    python bench/load_speed.py --folder DIR --jaxvid-only --compile-cache /tmp/cc   # twice: the 2nd
                                                     # process loads with every program in the cache

Rows (each a pass over the same safetensors files, page cache warm after the first):
`read` (every byte of the files read into one reused buffer: the storage / page-cache floor, as
`cat folder/* > /dev/null`), `device_put xN` (every tensor's mapped bytes to the device as stored,
N threads, no layout change: the floor of any loader that copies tensor by tensor), `torch cuda`
(safetensors' own `load_file(device="cuda")`, what diffusers' loading costs per component, when torch
sees a GPU) and `jaxvid` (`load_model`, the loader the pipelines use: layout change, casts, stacked
layers) and `jaxvid check_model` (the part of it that reads no weight: config, abstract model,
key/shape checks). Columns: seconds per component, GB and GB/s for the whole folder.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

COMPONENTS = ("text_encoder", "transformer", "vae")


def _files(folder: Path, component: str) -> list[Path]:
    return sorted((folder / component).glob("*.safetensors"))


def read_files(folder: Path, component: str) -> float:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in _files(folder, component):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0


def device_put_all(folder: Path, component: str, threads: int) -> float:
    import jax

    from convert.safetensors_io import SafetensorsReader

    reader = SafetensorsReader(folder / component)
    device = jax.devices()[0]
    t0 = time.perf_counter()

    def one(key: str):
        return jax.block_until_ready(jax.device_put(reader.read_mapped(key), device, may_alias=False))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        arrays = list(pool.map(one, reader.keys()))
    seconds = time.perf_counter() - t0
    del arrays
    return seconds


def torch_load(folder: Path, component: str) -> float | None:
    try:
        import torch
        from safetensors.torch import load_file
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    t0 = time.perf_counter()
    tensors = [load_file(str(f), device="cuda") for f in _files(folder, component)]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del tensors
    torch.cuda.empty_cache()
    return seconds


def jaxvid_load(folder: Path, component: str, dtype: str) -> float:
    import jax

    from jaxvid.models.loading import load_model

    t0 = time.perf_counter()
    model = load_model(folder / component, dtype=dtype)
    from flax import nnx

    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - t0
    del model
    return seconds


def jaxvid_check(folder: Path, component: str, dtype: str) -> float:
    from jaxvid.models.loading import check_model

    t0 = time.perf_counter()
    check_model(folder / component, dtype=dtype)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", required=True, help="a diffusers CogVideoX folder (bench/e2e.py writes one)")
    ap.add_argument("--threads", default="8", help="comma-separated thread counts for the device_put rows")
    ap.add_argument("--dtype", default="bf16", help="dtype jaxvid loads as")
    ap.add_argument("--repeat", type=int, default=2, help="passes of the jaxvid row (the first compiles)")
    ap.add_argument("--jaxvid-only", action="store_true", help="only the jaxvid rows (check_model, load_model)")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="JAX's persistent compilation cache in DIR (jaxvid.compile_cache), as the CLI uses it")
    args = ap.parse_args(argv)
    if args.compile_cache:
        from jaxvid.compile_cache import enable_compile_cache

        enable_compile_cache(args.compile_cache)
    folder = Path(args.folder)
    comps = [c for c in COMPONENTS if _files(folder, c)]
    if not comps:
        ap.error(f"--folder {folder}: no */*.safetensors of {COMPONENTS}")
    gb = sum(f.stat().st_size for c in comps for f in _files(folder, c)) / 1e9
    rows: list[tuple[str, list[float | None]]] = []
    if not args.jaxvid_only:
        rows.append(("read (cold or warm)", [read_files(folder, c) for c in comps]))
        rows.append(("read (warm)", [read_files(folder, c) for c in comps]))
        for n in (int(t) for t in args.threads.split(",")):
            rows.append((f"device_put x{n}", [device_put_all(folder, c, n) for c in comps]))
        rows.append(("torch cuda", [torch_load(folder, c) for c in comps]))
    rows.append(("jaxvid check_model (no reads)", [jaxvid_check(folder, c, args.dtype) for c in comps]))
    for i in range(args.repeat):
        rows.append((f"jaxvid load_model #{i + 1}", [jaxvid_load(folder, c, args.dtype) for c in comps]))
    print(f"{folder}: {gb:.2f} GB in {', '.join(comps)}")
    print("| row | " + " | ".join(comps) + " | total s | GB/s |")
    print("|---" * (len(comps) + 3) + "|")
    for name, secs in rows:
        if any(s is None for s in secs):
            print(f"| {name} | " + " | ".join("-" for _ in comps) + " | - | - |")
            continue
        total = sum(secs)
        print(f"| {name} | " + " | ".join(f"{s:.2f}" for s in secs) + f" | {total:.2f} | {gb / total:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
