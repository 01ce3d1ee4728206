"""How fast can an H100 feed the block-sparse kernel? K/V streaming alone vs the whole kernel.

    python bench/kv_stream_probe.py                 # LongCat 720p BSA cases (bench/specs.py)
    python bench/kv_stream_probe.py --json probe.json

The probe runs the kernel's own producer (same grid, same index tables, same TMA ring and
barriers) with consumers that only wait for each K/V slot and release it: no wgmma, no softmax.
Its time is a floor for any kernel that brings each listed K/V block into the SM of its query
block. Per case it prints the kernel and probe times and the K/V bytes moved per second.
Each query block's blocks travel separately: with independent (e.g. random) selections,
neighbouring query blocks share few key blocks, so there is nothing to reuse.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.attention import make_qkv, median_ms  # noqa: E402
from bench.specs import SPECS  # noqa: E402

log = logging.getLogger("bench.kv_stream_probe")


def _drain_consumer(geo, cfg, refs, rows, wg, batch, head, q_tile):
    """A consumer that takes every K/V slot of its stream and hands it straight back."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels import block_sparse_mgpu as m

    plgpu.set_max_registers(232, action="increase")
    if geo.streams == 2:  # one stream per warpgroup (64-row query blocks)
        stream, row = wg, m._Row(geo, refs, batch, head, q_tile * 2 + wg)
    else:
        stream, row = 0, rows[0]
    slots = cfg.num_slots

    @pl.loop(0, row.count)
    def _(step):
        barrier = stream * slots + jax.lax.rem(step, jnp.int32(slots))
        plgpu.barrier_wait(refs.k_ready.at[barrier])
        plgpu.barrier_arrive(refs.k_consumed.at[barrier])
        plgpu.barrier_wait(refs.v_ready.at[barrier])
        plgpu.barrier_arrive(refs.v_consumed.at[barrier])


def _probe_body(geo, cfg, q, k, v, indices, counts, out, *scratch):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels import block_sparse_mgpu as m

    refs = m._Refs(q, k, v, indices, counts, None, out, *scratch)
    batch, head = jax.lax.axis_index("batch"), jax.lax.axis_index("heads")
    q_tile, wg = jax.lax.axis_index("q_tiles"), jax.lax.axis_index("wg")
    rows = [m._Row(geo, refs, batch, head, q_tile * geo.streams + s) for s in range(geo.streams)]

    @pl.when(wg < 2)
    def _():
        _drain_consumer(geo, cfg, refs, rows, wg, batch, head, q_tile)
        row0 = q_tile * 128 + wg * 64
        zeros = plgpu.layout_cast(jnp.zeros((64, geo.head_dim), jnp.float32), plgpu.Layout.WGMMA)
        ones = plgpu.layout_cast(jnp.ones((64,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        m._epilogue(geo, refs, zeros, ones, refs.q_smem.at[wg], batch, head, row0)

    @pl.when(wg == 2)
    def _():
        m._producer(geo, cfg, refs, rows, batch, head)


def stream_only(q, k, v, indices, counts, *, block: int, num_slots: int | None = None):
    """The kernel's K/V traffic without its math; returns zeros [B, S, H, D]."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels import block_sparse_mgpu as m
    from pallas_kernels.heuristics import default_config

    batch, seq, heads, dim = q.shape
    cfg = default_config(head_dim=dim, block_q=block, block_kv=block)
    if num_slots is not None:
        cfg = dataclasses.replace(cfg, num_slots=num_slots)
    indices, counts = m.prepare_index_tables(indices, counts, num_kv_blocks=seq // block,
                                             streams=m.streams_for(block))
    geo = m.KernelGeometry(batch=batch, q_len=seq, kv_len_padded=seq, heads=heads, head_dim=dim,
                           block_q=block, block_kv=block, max_blocks=indices.shape[-1],
                           table_batch=indices.shape[0], table_heads=indices.shape[1],
                           dtype=jnp.dtype(q.dtype), scale_log2=1.0, kv_len_static=None,
                           masked=False)
    kernel = plgpu.kernel(
        functools.partial(_probe_body, geo, cfg),
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=m._scratch(geo, cfg),
        grid=(batch, heads, seq // 128), grid_names=("batch", "heads", "q_tiles"),
        num_threads=3, thread_name="wg")
    return kernel(q, k, v, indices, counts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from jaxvid.attention.bsa import select_blocks
    from pallas_kernels.api import block_sparse_attention

    rows = []
    for spec in (s for s in SPECS if s.pattern == "bsa"):
        q, k, v = make_qkv(spec)
        kw = dict(sparsity=spec.sparsity, chunk_3d_shape_q=spec.chunk, chunk_3d_shape_k=spec.chunk)
        indices, counts = jax.jit(lambda q, k: select_blocks(q, k, spec.latent, spec.latent, **kw))(q, k)
        kernel = jax.jit(lambda q, k, v, i, c: block_sparse_attention(
            q, k, v, i, c, block_q=spec.block, block_kv=spec.block, implementation="mosaic"))
        probe = jax.jit(functools.partial(stream_only, block=spec.block))
        kernel_ms = median_ms(kernel, q, k, v, indices, counts, repeats=args.repeats)
        probe_ms = median_ms(probe, q, k, v, indices, counts, repeats=args.repeats)
        # The same traffic with every id folded into the first 64 key blocks (~2 MB of K/V per
        # head, always in L2): equal times mean the SM's intake, not DRAM, is the limit.
        hot_ms = median_ms(probe, q, k, v, indices % 64, counts, repeats=args.repeats)
        deep = jax.jit(functools.partial(stream_only, block=spec.block, num_slots=3))
        deep_ms = median_ms(deep, q, k, v, indices, counts, repeats=args.repeats)
        gbytes = float(jnp.sum(counts)) * 2 * spec.block * spec.head_dim * 2 / 1e9
        rows.append(dict(case=spec.name, kernel_ms=kernel_ms, stream_ms=probe_ms, hot_stream_ms=hot_ms, stream_3slots_ms=deep_ms,
                         kv_gb=gbytes, stream_tb_s=gbytes / probe_ms, kernel_tb_s=gbytes / kernel_ms))
        log.info("%s", rows[-1])
    device = jax.devices()[0].device_kind
    print(f"device: {device}, jax {jax.__version__}")
    print("| case | kernel ms | K/V stream only ms | same, L2-resident ids | same, 3-slot ring | "
          "K/V GB moved | stream TB/s | kernel TB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['kernel_ms']:.2f} | {r['stream_ms']:.2f} | {r['hot_stream_ms']:.2f} | "
              f"{r['stream_3slots_ms']:.2f} | "
              f"{r['kv_gb']:.1f} | "
              f"{r['stream_tb_s']:.2f} | {r['kernel_tb_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "jax": jax.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
