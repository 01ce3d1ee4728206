"""Block-sparse attention kernel vs cuDNN dense attention on real model shapes (one GPU).

    python bench/attention.py                                  # every case in bench/specs.py
    python bench/attention.py --cases longcat720p-bsa0.9375-4x4x4 --json attn.json
    python bench/attention.py --cases cogvx2b-dense --sweep    # every TuningConfig that fits
    python bench/attention.py --cases longcat720p-bsa0.9375-4x4x4 --kernel-only --precisions fp8 int8-fp8

Per case and part: median ms over --repeats timed calls after a warm-up, useful TFLOP/s
(4 * B * H * S^2 * D * density / t, S the padded length the kernel runs on) and that rate over
cuDNN dense's (`jax.nn.dot_product_attention(implementation="cudnn")`, same shapes, same run).
Parts: "kernel" (the block-sparse kernel on ready index tables), and for BSA also "select"
(pooling straight from (T, H, W) order + scores + top-k), "select+kernel" (both, on q/k/v already
in chunk order: what a caller that keeps tokens in chunk order pays) and "e2e" (`bsa_attention`:
select, permute q/k/v into chunk order, kernel, permute the output back). Random bf16 inputs
("-smooth" cases: spatially correlated q/k); "dense" cases also check the kernel against cuDNN.
--precisions adds 8-bit rows beside the bf16 kernel ("kernel-fp8", "kernel-int8-fp8": the Sage-style
kernel of pallas_kernels/block_sparse_mgpu_fp8.py, its quantization step included in the time; and
".../pv-bf16": the fallback with a bf16 P.V), each with its relative L2 against the bf16 kernel's
output on the same tables (a fp32 reference does not fit at 720p). A variant that fails to compile
gets a NaN row with the error, so the table always prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.specs import SPECS, AttentionSpec, spec_by_name  # noqa: E402

log = logging.getLogger("bench.attention")


@dataclasses.dataclass
class Row:
    case: str
    part: str
    ms: float
    density: float
    tflops: float
    vs_cudnn_rate: float | None
    note: str = ""


def median_ms(fn, *args, repeats: int, sync=jax.block_until_ready) -> float:
    """Median wall-clock ms of `sync(fn(*args))` over `repeats` calls after two warm-up calls (the
    first compiles). `sync` waits for the result: JAX's by default; a torch caller passes one that
    calls torch.cuda.synchronize(), so both frameworks are timed the same way."""
    sync(fn(*args))  # compile + warm-up
    sync(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cudnn_dense_ms(q, k, v, *, repeats: int) -> float:
    """Median ms of cuDNN's dense attention (`jax.nn.dot_product_attention(implementation="cudnn")`)
    on q, k, v [B, S, H, D]: the rate every kernel row is compared with."""
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    return median_ms(dense, q, k, v, repeats=repeats)


def make_qkv(spec: AttentionSpec, seed: int = 0):
    """Random bf16 q, k, v [B, S, H, D]; for inputs="smooth", q and k are 0.8 x a unit-variance
    field box-averaged over 4 x 8 x 8 tokens of the (T, H, W) grid plus 0.6 x white noise."""
    shape = (spec.batch, spec.padded_seq, spec.heads, spec.head_dim)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    if spec.inputs == "random":
        return tuple(jax.random.normal(k, shape, jnp.bfloat16) for k in keys)
    return (_smooth(spec, keys[0]), _smooth(spec, keys[1]), jax.random.normal(keys[2], shape, jnp.bfloat16))


@functools.partial(jax.jit, static_argnums=0)
def _smooth(spec: AttentionSpec, key):
    grid = (spec.batch, *spec.latent, spec.heads, spec.head_dim)
    a, b = jax.random.split(key)
    x = jax.random.normal(a, grid, jnp.float32)
    for axis, width in ((1, 4), (2, 8), (3, 8)):  # separable box filter
        window = tuple(width if d == axis else 1 for d in range(len(grid)))
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1,) * len(grid), "SAME")
    x = x / jnp.std(x)
    x = 0.8 * x + 0.6 * jax.random.normal(b, grid, jnp.float32)
    return x.reshape(spec.batch, -1, spec.heads, spec.head_dim).astype(jnp.bfloat16)


def pair_overlap(indices, counts) -> float:
    """Mean share of a query block's key blocks that its neighbour (blocks 2p, 2p + 1) also picked."""
    n_kv = int(jnp.max(indices)) + 1
    listed = jnp.arange(indices.shape[-1]) < counts[..., None]
    chosen = jnp.zeros(indices.shape[:-1] + (n_kv,), bool)
    chosen = jax.vmap(lambda c, i, m: c.at[i].max(m))(
        chosen.reshape(-1, n_kv), indices.reshape(-1, indices.shape[-1]), listed.reshape(-1, listed.shape[-1]))
    pairs = chosen.reshape(-1, 2, n_kv)
    shared = jnp.sum(pairs[:, 0] & pairs[:, 1], -1)
    return float(jnp.mean(shared / jnp.maximum(jnp.sum(pairs, (1, 2)) / 2, 1)))


def static_tables(spec: AttentionSpec):
    """(kv_indices, kv_counts, density) for radial and dense specs (shared by batch and heads)."""
    from pallas_kernels.reference import block_mask_to_indices

    n = spec.padded_seq // spec.block
    if spec.pattern == "dense":
        mask = np.ones((n, n), bool)
    else:
        from jaxvid.attention.radial import radial_block_mask
        mask = np.asarray(radial_block_mask(spec.radial_frames, spec.tokens_per_frame,
                                            block_size=spec.block, text_tokens=spec.text_tokens))
        if mask.shape != (n, n):
            raise ValueError(f"{spec.name}: radial mask {mask.shape} != ({n}, {n})")
    indices, counts = block_mask_to_indices(mask[None, None])
    return jnp.asarray(indices), jnp.asarray(counts), float(mask.mean())


def flops(spec: AttentionSpec, density: float) -> float:
    return 4.0 * spec.batch * spec.heads * spec.padded_seq ** 2 * spec.head_dim * density


def bench_case(spec: AttentionSpec, *, impl: str, repeats: int, cudnn_cache: dict, sweep: bool,
               precisions: tuple[str, ...] = (), kernel_only: bool = False) -> list[Row]:
    from pallas_kernels.api import block_sparse_attention
    from pallas_kernels.heuristics import tuning_space

    q, k, v = make_qkv(spec)
    key = (spec.batch, spec.padded_seq, spec.heads, spec.head_dim)
    if key not in cudnn_cache:
        cudnn_cache[key] = cudnn_dense_ms(q, k, v, repeats=repeats)
    cudnn_ms = cudnn_cache[key]
    cudnn_rate = flops(spec, 1.0) / cudnn_ms / 1e9
    rows = [Row(spec.name, "cudnn-dense", cudnn_ms, 1.0, cudnn_rate, 1.0)]

    def row(part, ms, density, note=""):
        rate = flops(spec, density) / ms / 1e9
        return Row(spec.name, part, ms, density, rate, rate / cudnn_rate, note)

    kv_len = spec.seq if spec.padded_seq != spec.seq else None
    if spec.pattern == "bsa" and kernel_only:
        from jaxvid.attention.bsa import select_blocks

        indices, counts = jax.jit(lambda q, k: select_blocks(
            q, k, spec.latent, spec.latent, sparsity=spec.sparsity, chunk_3d_shape_q=spec.chunk,
            chunk_3d_shape_k=spec.chunk))(q, k)
        density = float(jnp.mean(counts)) / (spec.padded_seq // spec.block)
    elif spec.pattern == "bsa":
        from jaxvid.attention.bsa import bsa_attention, select_blocks, to_chunk_order

        sel_kwargs = dict(sparsity=spec.sparsity, chunk_3d_shape_q=spec.chunk, chunk_3d_shape_k=spec.chunk)
        select = jax.jit(lambda q, k: select_blocks(q, k, spec.latent, spec.latent, **sel_kwargs))
        indices, counts = select(q, k)
        density = float(jnp.mean(counts)) / (spec.padded_seq // spec.block)
        rows.append(row("select", median_ms(select, q, k, repeats=repeats), density,
                        f"pair overlap {pair_overlap(indices, counts):.2f}"))
        q_c, k_c, v_c = (to_chunk_order(x, spec.latent, spec.chunk) for x in (q, k, v))
        sel_kernel = jax.jit(lambda q, k, q_c, k_c, v_c: block_sparse_attention(
            q_c, k_c, v_c, *select_blocks(q, k, spec.latent, spec.latent, **sel_kwargs),
            block_q=spec.block, block_kv=spec.block, implementation=impl))
        rows.append(row("select+kernel", median_ms(sel_kernel, q, k, q_c, k_c, v_c, repeats=repeats), density))
        del q_c, k_c, v_c
        e2e = jax.jit(lambda q, k, v: bsa_attention(q, k, v, spec.latent, spec.latent,
                                                    implementation=impl, **sel_kwargs))
        rows.append(row("e2e", median_ms(e2e, q, k, v, repeats=repeats), density))
    else:
        indices, counts, density = static_tables(spec)

    configs = [None]
    if sweep and impl == "mosaic":
        configs += tuning_space(head_dim=spec.head_dim, block_q=spec.block, block_kv=spec.block)
    for cfg in configs:
        kernel = jax.jit(lambda q, k, v, i, c, cfg=cfg: block_sparse_attention(
            q, k, v, i, c, block_q=spec.block, block_kv=spec.block, kv_len=kv_len,
            implementation=impl, config=cfg))
        try:
            ms = median_ms(kernel, q, k, v, indices, counts, repeats=repeats)
        except Exception as err:  # a sweep reports configs that fail to compile and goes on
            if cfg is None:
                raise
            rows.append(Row(spec.name, "kernel", float("nan"), density, 0.0, None, f"{cfg}: {err!r:.80}"))
            continue
        note = "" if cfg is None else f"num_slots={cfg.num_slots} sched={cfg.use_schedule_barrier} tile={cfg.kv_tile}"
        rows.append(row("kernel", ms, density, note))
        log.info("%s kernel (%s): %.2f ms", spec.name, note or "default config", ms)
        if cfg is None and spec.pattern == "dense":
            rows[-1].note = _check_against_cudnn(kernel, spec, q, k, v, indices, counts, kv_len)
    if precisions:
        rows += _precision_rows(spec, q, k, v, indices, counts, kv_len, density, row, precisions, repeats)
    return rows


def _precision_rows(spec, q, k, v, indices, counts, kv_len, density, row, precisions, repeats) -> list[Row]:
    """8-bit kernel rows beside the bf16 kernel: time (quantization included) and rel. L2 vs bf16."""
    from pallas_kernels.api import block_sparse_attention
    from pallas_kernels.block_sparse_mgpu_fp8 import block_sparse_attention_mgpu_fp8

    base = block_sparse_attention(q, k, v, indices, counts, block_q=spec.block, block_kv=spec.block,
                                  kv_len=kv_len).astype(jnp.float32)
    out_rows = []
    for precision in precisions:
        if precision == "bf16":
            continue
        for pv in ("fp8", "bf16"):
            part = f"kernel-{precision}" + ("" if pv == "fp8" else "/pv-bf16")
            fn = jax.jit(lambda q, k, v, i, c, precision=precision, pv=pv: block_sparse_attention_mgpu_fp8(
                q, k, v, i, c, block_q=spec.block, block_kv=spec.block, kv_len=kv_len, precision=precision, pv=pv))
            try:
                ms = median_ms(fn, q, k, v, indices, counts, repeats=repeats)
                out = fn(q, k, v, indices, counts).astype(jnp.float32)
                rel = float(jnp.linalg.norm(out - base) / jnp.linalg.norm(base))
                note = f"rel L2 vs bf16 kernel {rel:.3f}, NaN {int(jnp.isnan(out).sum())}, incl. quantize"
                out_rows.append(row(part, ms, density, note))
                log.info("%s %s: %.2f ms, %s", spec.name, part, ms, note)  # shows even if a later row is cut off
            except Exception as err:  # report and go on: the table must print
                log.exception("%s %s failed", spec.name, part)
                out_rows.append(Row(spec.name, part, float("nan"), density, 0.0, None,
                                    f"FAILED {type(err).__name__}: {' '.join(str(err).split())[:160]}"))
    return out_rows


def _check_against_cudnn(kernel, spec, q, k, v, indices, counts, kv_len) -> str:
    out = kernel(q, k, v, indices, counts).astype(jnp.float32)
    lengths = jnp.full((spec.batch,), kv_len or spec.padded_seq, jnp.int32)
    ref = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", query_seq_lengths=None,
                                       key_value_seq_lengths=lengths).astype(jnp.float32)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    return f"rel L2 vs cuDNN {rel:.1e}, NaN {int(jnp.isnan(out).sum())}"


def format_table(rows: list[Row], device: str) -> str:
    lines = [f"device: {device}, jax {jax.__version__}",
             f"| {'case':<30} | {'part':<13} | {'ms':>8} | {'density':>7} | {'TFLOP/s':>7} | {'vs cuDNN':>8} | note"]
    lines.append("|" + "-" * 32 + "|" + "-" * 15 + "|" + "-" * 10 + "|" + "-" * 9 + "|" + "-" * 9 + "|" + "-" * 10 + "|------")
    for r in rows:
        ratio = "" if r.vs_cudnn_rate is None else f"{r.vs_cudnn_rate:.2f}"
        lines.append(f"| {r.case:<30} | {r.part:<13} | {r.ms:8.2f} | {r.density:7.3f} | {r.tflops:7.0f} | "
                     f"{ratio:>8} | {r.note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=None, help="spec names (default: all)")
    parser.add_argument("--implementation", default="mosaic")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sweep", action="store_true", help="also time every TuningConfig that fits")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--precisions", nargs="*", default=(), choices=("bf16", "fp8", "int8-fp8"),
                        help="8-bit kernel rows beside the bf16 kernel")
    parser.add_argument("--kernel-only", action="store_true", help="BSA: skip the select / select+kernel / e2e rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    specs = SPECS if not args.cases else tuple(spec_by_name(n) for n in args.cases)
    device = jax.devices()[0].device_kind
    rows: list[Row] = []
    cache: dict = {}
    for spec in specs:
        log.info("case %s", spec.name)
        rows += bench_case(spec, impl=args.implementation, repeats=args.repeats, cudnn_cache=cache,
                           sweep=args.sweep, precisions=tuple(args.precisions), kernel_only=args.kernel_only)
        log.info("%s", format_table(rows[-3:], device))
    print(format_table(rows, device))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "jax": jax.__version__,
                                         "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
