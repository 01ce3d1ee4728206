"""What verifying crc32 checksums costs when reading a converted checkpoint (CPU).

Writes a checkpoint of `--tensors` bf16 tensors of `--dim` x `--dim` (default 64 x 2048 x 2048 =
0.54 GB, the size of two CogVideoX-5B transformer blocks' worth of weights in bf16), then reads
every tensor with CheckpointReader(verify_checksums=False/True), alternating, `--repeats` times,
and prints the median times and the overhead.

    PYTHONPATH=. python bench/checksum_cost.py [--dim 2048] [--tensors 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.checkpoint import CheckpointReader, CheckpointWriter

log = logging.getLogger("bench.checksum_cost")


def read_all(path: Path, verify: bool) -> float:
    t0 = time.perf_counter()
    reader = CheckpointReader(path, verify_checksums=verify)
    for key in reader.keys():
        reader.read(key)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="jaxvid-checksum-"))
    try:
        rng = np.random.default_rng(0)
        with CheckpointWriter(tmp / "ckpt", class_name="Bench", config={}) as writer:
            for i in range(args.tensors):
                writer.add(f"w{i}", rng.standard_normal((args.dim, args.dim), np.float32).astype(ml_dtypes.bfloat16))
            path = writer.commit()
        times: dict[bool, list[float]] = {False: [], True: []}
        read_all(path, False)  # warm the page cache: both variants then read from memory
        for _ in range(args.repeats):
            for verify in (False, True):
                times[verify].append(read_all(path, verify))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        gb = args.tensors * args.dim * args.dim * 2 / 1e9
        log.info("%.2f GB bf16 in %d tensors: read %.2f s, with crc32 %.2f s: +%.1f%%", gb, args.tensors, off, on,
                 100 * (on - off) / off)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
