"""Peak memory of jaxvid-convert on a CogVideoX-5b-sized checkpoint (target: peak RSS <= 3 GB).

Writes a random CogVideoX-5b transformer in diffusers' sharded layout (bf16, the real key names
and shapes, ~11 GB; tensors are generated and written one at a time), converts it with
`python -m convert.cli` in a subprocess while sampling that process's resident memory, and prints
wall time and peak RSS. Everything lives in a temp folder that is removed at the end.

    python bench/convert_memory.py [--dir DIR] [--keep] [--layers N]

Needs about 25 GB free disk (source + converted copy).
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from jaxvid.demo import write_random_cogvideox  # noqa: E402
from jaxvid.models.cogvideox import CogVideoXConfig  # noqa: E402

log = logging.getLogger("bench.convert_memory")

TARGET_PEAK_RSS = 3 * 1024**3
GIB = 1024**3
SHARD_BYTES = 5 * 1024**3  # diffusers' default max_shard_size for this model gives two ~5 GB shards
NEEDED_DISK = 25 * 1024**3
SAMPLE_SECONDS = 0.05
POOL_SIZE = 1 << 24


def _rss_bytes(pid: int) -> int:
    """Resident set size of one process from /proc (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(workdir: Path, layers: int) -> dict[str, float]:
    cfg = CogVideoXConfig.cogvideox_5b(num_layers=layers)
    src, dst = workdir / "diffusers" / "transformer", workdir / "jaxvid"

    t0 = time.perf_counter()
    pool = (np.random.default_rng(0).standard_normal(POOL_SIZE, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    offset = [0]

    def values(key: str, shape: tuple[int, ...]) -> np.ndarray:
        # random-looking bf16 without generating 5.6 B normals: wrap around a fixed random pool
        n, start = int(np.prod(shape)), offset[0]
        offset[0] = (start + 104729) % POOL_SIZE
        head = pool[start : start + n]
        return np.concatenate([head, np.resize(pool, n - head.size)]).reshape(shape)

    write_random_cogvideox(src, cfg, dtype=ml_dtypes.bfloat16, max_shard_bytes=SHARD_BYTES, values=values)
    write_s = time.perf_counter() - t0
    src_bytes = _dir_bytes(src)
    log.info("wrote %.2f GB source (%d shards) in %.1f s", src_bytes / 1e9, len(list(src.glob("*.safetensors"))), write_s)

    cmd = [sys.executable, "-m", "convert.cli", str(src), str(dst), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT)
    peak_sampled = 0
    while proc.poll() is None:
        peak_sampled = max(peak_sampled, _rss_bytes(proc.pid))
        time.sleep(SAMPLE_SECONDS)
    wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed with exit status {proc.returncode}")
    # ru_maxrss of waited-for children, in KiB on Linux: the kernel's own high-water mark
    peak_kernel = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "params_billion": sum(int(np.prod(s)) for s in _shapes(cfg)) / 1e9,
        "source_gb": src_bytes / 1e9,
        "output_gb": _dir_bytes(dst) / 1e9,
        "write_s": write_s,
        "convert_wall_s": wall_s,
        "peak_rss_gib_sampled": peak_sampled / GIB,
        "peak_rss_gib": max(peak_kernel, peak_sampled) / GIB,
    }


def _shapes(cfg):
    from convert.keymaps.cogvideox import diffusers_shapes

    return diffusers_shapes(cfg).values()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="parent folder for the temp files (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--layers", type=int, default=42, help="transformer layers (42 = CogVideoX-5b)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    parent = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if args.layers == 42 and free < NEEDED_DISK:
        log.error("only %.1f GB free under %s; need %.0f GB", free / 1e9, parent, NEEDED_DISK / 1e9)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="jaxvid-convert-bench-", dir=parent))
    try:
        r = run(workdir, args.layers)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = r["peak_rss_gib"] * GIB <= TARGET_PEAK_RSS
    print(f"CogVideoX-5b-sized transformer ({args.layers} layers, {r['params_billion']:.2f} B params, bf16)")
    print(f"  source (diffusers, sharded): {r['source_gb']:.2f} GB, written in {r['write_s']:.1f} s")
    print(f"  converted (jaxvid/orbax):    {r['output_gb']:.2f} GB")
    print(f"  convert wall time:           {r['convert_wall_s']:.1f} s ({r['source_gb'] / r['convert_wall_s']:.2f} GB/s)")
    print(f"  convert peak RSS:            {r['peak_rss_gib']:.2f} GiB (sampled {r['peak_rss_gib_sampled']:.2f} GiB); "
          f"target <= {TARGET_PEAK_RSS / GIB:.0f} GiB: {'OK' if ok else 'OVER'}")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
