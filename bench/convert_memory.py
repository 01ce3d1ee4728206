"""Peak memory of jaxvid-convert on a real-sized checkpoint (target: peak RSS <= 3 GB).

--model cogvideox (default): a random CogVideoX-5b transformer in diffusers' sharded layout (bf16,
the real key names and shapes, ~11 GB). --model longcat: a random LongCat-Video checkpoint folder
whose dit/ is the 13.6B LongCatVideoTransformer3DModel (bf16, ~27 GB, sharded with index.json;
key names and torch shapes are jaxvid's key table run backwards from `LongCatConfig.longcat_video()`)
plus tiny tokenizer/, scheduler/ and lora/ folders, converted as a whole folder as users do.
Tensors are generated and written one at a time (the writer stays small). The folder is converted
with `python -m jaxvid.cli.convert` in a subprocess while sampling that process's resident memory; wall
time and peak RSS are printed. Everything lives in a temp folder that is removed at the end.

    python bench/convert_memory.py [--model cogvideox|longcat] [--dir DIR] [--keep] [--layers N]

Needs free disk for the source plus the converted copy (~25 GB for CogVideoX-5b, ~60 GB for
LongCat); with less, LongCat runs with as many blocks as fit and says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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

from jaxvid.models.cogvideox import CogVideoXConfig  # noqa: E402
from jaxvid.synthetic.cogvideox import write_random_cogvideox  # noqa: E402

log = logging.getLogger("bench.convert_memory")

TARGET_PEAK_RSS = 3 * 1024**3
GIB = 1024**3
SHARD_BYTES = 5 * 1024**3  # diffusers' default max_shard_size for this model gives two ~5 GB shards
NEEDED_DISK = 25 * 1024**3
DISK_MARGIN = 5 * 1024**3  # left free for everyone else on the machine
LONGCAT_DEPTH = 48
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
    write_random_cogvideox(src, cfg, dtype=ml_dtypes.bfloat16, max_shard_bytes=SHARD_BYTES, values=_bf16_pool_values())
    write_s = time.perf_counter() - t0
    src_bytes = _dir_bytes(src)
    log.info("wrote %.2f GB source (%d shards) in %.1f s", src_bytes / 1e9, len(list(src.glob("*.safetensors"))), write_s)

    r = _measure_convert(src, dst)
    return {
        "params_billion": sum(int(np.prod(s)) for s in _shapes(cfg)) / 1e9,
        "source_gb": src_bytes / 1e9,
        "output_gb": _dir_bytes(dst) / 1e9,
        "write_s": write_s,
        **r,
    }


def _measure_convert(src: Path, dst: Path) -> dict[str, float]:
    """Run `python -m jaxvid.cli.convert src dst` in a subprocess; wall time and peak RSS (sampled and kernel's)."""
    cmd = [sys.executable, "-m", "jaxvid.cli.convert", str(src), str(dst), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT)
    peak_sampled = 0
    while proc.poll() is None:
        peak_sampled = max(peak_sampled, _rss_bytes(proc.pid))
        time.sleep(SAMPLE_SECONDS)
    wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed with exit status {proc.returncode}")
    # ru_maxrss of waited-for children, in KiB on Linux: the kernel's own high-water mark. It covers
    # every child this process waited for; the benchmark starts only this one.
    peak_kernel = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "convert_wall_s": wall_s,
        "peak_rss_gib_sampled": peak_sampled / GIB,
        "peak_rss_gib": max(peak_kernel, peak_sampled) / GIB,
    }


def _bf16_normal_values(seed: int = 0):
    """values(key, shape): fresh N(0, 0.02^2) per tensor, cast to bf16 (compresses like real weights)."""
    rng = np.random.default_rng(seed)

    def values(key: str, shape: tuple[int, ...]) -> np.ndarray:
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(0.02)
        return x.astype(ml_dtypes.bfloat16)

    return values


def _bf16_pool_values():
    """values(key, shape): random-looking bf16 without generating billions of normals (wraps a fixed pool)."""
    pool = (np.random.default_rng(0).standard_normal(POOL_SIZE, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    offset = [0]

    def values(key: str, shape: tuple[int, ...]) -> np.ndarray:
        n, start = int(np.prod(shape)), offset[0]
        offset[0] = (start + 104729) % POOL_SIZE
        head = pool[start : start + n]
        return np.concatenate([head, np.resize(pool, n - head.size)]).reshape(shape)

    return values


# ---------------------------------------------------------------------------------------------
# LongCat-Video
# ---------------------------------------------------------------------------------------------


def longcat_hf_config(depth: int = LONGCAT_DEPTH) -> dict:
    """dit/config.json of the released LongCat-Video DiT (upstream's keys), with `depth` blocks."""
    return {
        "_class_name": "LongCatVideoTransformer3DModel", "_diffusers_version": "0.35.1",
        "adaln_tembed_dim": 512, "bsa_params": {"sparsity": 0.9375, "chunk_3d_shape_q": [4, 4, 4],
                                                "chunk_3d_shape_k": [4, 4, 4]},
        "caption_channels": 4096, "cp_split_hw": [1, 1], "depth": depth, "enable_bsa": False,
        "enable_flashattn2": False, "enable_flashattn3": False, "enable_xformers": False,
        "frequency_embedding_size": 256, "hidden_size": 4096, "in_channels": 16, "mlp_ratio": 4, "num_heads": 32,
        "out_channels": 16, "patch_size": [1, 2, 2], "text_tokens_zero_pad": True,
    }


def longcat_source_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of upstream's dit/ state dict with its torch shape: the key table run backwards.

    Each rule's target shape (one slice of a stacked parameter) is mapped through the inverse of its
    transform, which for LongCat's table is always an axis permutation (identity, linear_T, conv3d).
    """
    from convert.keymaps.longcat import transformer_rules
    from jaxvid.models.loading import model_specs
    from jaxvid.models.longcat import LongCatConfig, LongCatVideoTransformer3D

    cfg = LongCatConfig.from_hf_config(hf_config)
    if hf_config["depth"] == LONGCAT_DEPTH:
        assert cfg == LongCatConfig.longcat_video(), "bench config drifted from the released preset"
    cfg = dataclasses.replace(cfg, dtype=np.dtype(ml_dtypes.bfloat16), param_dtype=np.dtype(ml_dtypes.bfloat16))
    specs = model_specs(LongCatVideoTransformer3D, cfg)
    out: dict[str, tuple[int, ...]] = {}
    for rule in transformer_rules(cfg):
        target = tuple(specs[rule.target_path].shape)
        if rule.target_index is not None:
            target = target[1:]
        markers = tuple(range(len(target)))
        perm = tuple(rule.transform.shape_fn(markers))
        if sorted(perm) != list(markers):
            raise ValueError(f"{rule.source}: transform {rule.transform.name} is not a permutation")
        source = [0] * len(target)
        for out_axis, in_axis in enumerate(perm):
            source[in_axis] = target[out_axis]
        out[rule.source] = tuple(source)
    return out


def write_sharded(folder: Path, config: dict, shapes: dict[str, tuple[int, ...]], values, *,
                  dtype=ml_dtypes.bfloat16, max_shard_bytes: int = SHARD_BYTES) -> None:
    """config.json + diffusers-style shards and index.json, written shard by shard, tensor by tensor."""
    from convert.safetensors_io import write_safetensors_streaming

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    dtype = np.dtype(dtype)
    shards: list[dict[str, tuple[tuple[int, ...], np.dtype]]] = [{}]
    size = 0
    for key, shape in sorted(shapes.items()):
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = (shape, dtype)
        size += nbytes
    stem, weight_map = "diffusion_pytorch_model", {}
    for k, shard in enumerate(shards, start=1):
        name = f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(folder / name, shard, lambda key: values(key, shapes[key]).astype(dtype, copy=False),
                                    metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        log.info("wrote %s (%d tensors)", name, len(shard))
    total = sum(int(np.prod(s, dtype=np.int64)) * dtype.itemsize for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_longcat_extras(root: Path) -> None:
    """tokenizer/, scheduler/ and lora/ as in the release (tiny stand-ins; they are copied, not converted)."""
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}))
    (root / "lora").mkdir()
    shutil.copy(REPO_ROOT / "tests" / "data" / "longcat_extra" / "lora_a.safetensors",
                root / "lora" / "cfg_step_lora.safetensors")


def longcat_bytes(depth: int) -> int:
    shapes = longcat_source_shapes(longcat_hf_config(depth))
    return sum(int(np.prod(s, dtype=np.int64)) * 2 for s in shapes.values())


def run_longcat(workdir: Path, depth: int) -> dict[str, float]:
    config = longcat_hf_config(depth)
    shapes = longcat_source_shapes(config)
    src, dst = workdir / "LongCat-Video", workdir / "LongCat-Video-jaxvid"
    t0 = time.perf_counter()
    # Fresh normals, not the cheaper repeating pool: orbax compresses its groups (zstd), and repeats
    # would make the output (and the conversion) look smaller and faster than with real weights.
    write_sharded(src / "dit", config, shapes, _bf16_normal_values())
    _write_longcat_extras(src)
    write_s = time.perf_counter() - t0
    src_bytes = _dir_bytes(src / "dit")
    log.info("wrote %.2f GB dit/ (%d shards) in %.1f s", src_bytes / 1e9,
             len(list((src / "dit").glob("*.safetensors"))), write_s)
    r = _measure_convert(src, dst)
    return {
        "params_billion": sum(int(np.prod(s)) for s in shapes.values()) / 1e9,
        "source_gb": src_bytes / 1e9,
        "n_shards": len(list((src / "dit").glob("*.safetensors"))),
        "output_gb": _dir_bytes(dst / "dit") / 1e9,
        "write_s": write_s,
        **r,
    }


def _shapes(cfg):
    from convert.keymaps.cogvideox import diffusers_shapes

    return diffusers_shapes(cfg).values()


def _print_result(title: str, r: dict[str, float]) -> bool:
    ok = r["peak_rss_gib"] * GIB <= TARGET_PEAK_RSS
    print(title)
    shards = f", {r['n_shards']} shards + index.json" if "n_shards" in r else ""
    print(f"  source (diffusers, sharded): {r['source_gb']:.2f} GB{shards}, written in {r['write_s']:.1f} s")
    print(f"  converted (jaxvid/orbax):    {r['output_gb']:.2f} GB")
    print(f"  convert wall time:           {r['convert_wall_s']:.1f} s ({r['source_gb'] / r['convert_wall_s']:.2f} GB/s)")
    print(f"  convert peak RSS:            {r['peak_rss_gib']:.2f} GiB (sampled {r['peak_rss_gib_sampled']:.2f} GiB); "
          f"target <= {TARGET_PEAK_RSS / GIB:.0f} GiB: {'OK' if ok else 'OVER'}")
    return ok


def _longcat_depth_that_fits(free: int, wanted: int) -> int:
    """The most DiT blocks (<= wanted) whose source + converted copy + margin fit in `free` bytes."""
    one, two = longcat_bytes(1), longcat_bytes(2)
    per_block = two - one
    top = one - per_block  # bytes outside the blocks
    usable = free - DISK_MARGIN
    # source + converted copy; orbax compresses (~0.8x on bf16 weights), 2x leaves room to spare
    fits = int((usable / 2.0 - top) // per_block)
    return max(0, min(wanted, fits))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("cogvideox", "longcat"), default="cogvideox",
                        help="cogvideox: CogVideoX-5b transformer (~11 GB); longcat: LongCat-Video folder, dit ~27 GB")
    parser.add_argument("--dir", default=None, help="parent folder for the temp files (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--layers", type=int, default=None,
                        help="transformer layers (default: the real model's, 42 for CogVideoX-5b, 48 for LongCat)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    parent = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if args.model == "cogvideox":
        layers = args.layers or 42
        if layers == 42 and free < NEEDED_DISK:
            log.error("only %.1f GB free under %s; need %.0f GB", free / 1e9, parent, NEEDED_DISK / 1e9)
            return 1
    else:
        wanted = args.layers or LONGCAT_DEPTH
        layers = _longcat_depth_that_fits(free, wanted)
        need = 2.0 * longcat_bytes(wanted) + DISK_MARGIN
        log.info("%.1f GB free under %s; LongCat with %d blocks needs ~%.0f GB", free / 1e9, parent, wanted, need / 1e9)
        if layers < 1:
            log.error("only %.1f GB free under %s; not even one LongCat block fits", free / 1e9, parent)
            return 1
        if layers < wanted:
            log.warning("disk is short: running LongCat with %d of %d blocks (the real model needs ~%.0f GB free)",
                        layers, wanted, need / 1e9)
    workdir = Path(tempfile.mkdtemp(prefix="jaxvid-convert-bench-", dir=parent))
    try:
        r = run(workdir, layers) if args.model == "cogvideox" else run_longcat(workdir, layers)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.model == "cogvideox":
        title = f"CogVideoX-5b-sized transformer ({layers} layers, {r['params_billion']:.2f} B params, bf16)"
    else:
        if layers == LONGCAT_DEPTH:
            size = "real size"
        elif layers < (args.layers or LONGCAT_DEPTH):
            size = f"REDUCED from {args.layers or LONGCAT_DEPTH} blocks: disk too small"
        else:
            size = f"--layers {layers}; the real model has {LONGCAT_DEPTH}"
        title = (f"LongCat-Video checkpoint folder, dit/ {layers} blocks ({size}), {r['params_billion']:.2f} B params, "
                 f"bf16; + tokenizer/, scheduler/, lora/")
    return 0 if _print_result(title, r) else 2


if __name__ == "__main__":
    sys.exit(main())
