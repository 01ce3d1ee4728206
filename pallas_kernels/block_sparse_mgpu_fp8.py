"""8-bit (Sage-style) block-sparse attention for Hopper in Pallas Mosaic GPU.

The same CTA design as the bf16 kernel (block_sparse_mgpu.py: one producer warpgroup streaming the
listed K/V blocks by TMA into a ring, two consumer warpgroups of 64 query rows, online softmax,
optional ping-pong), with 8-bit operands:

- S = Q8 K8^T: wgmma on float8 e4m3 ("fp8") or int8 ("int8-fp8", int32 accumulator) from SMEM;
  K is already K-major in its [bkv, D] tile, which is what 8-bit wgmma needs (8-bit wgmma has no
  transpose). S is rescaled by q_scale * k_scale * softmax scale (per query block, per key block).
- O += P8 V8: P = exp2(...) in [0, 1] is stored as e4m3(P * 448). 8-bit wgmma needs both operands
  K-major, so V arrives transposed ([B, H, D, S], made by the quantization step) and its [D, bkv]
  tiles are the K-major B operand. P goes through a small SMEM tile: Mosaic's 8-bit A-from-
  registers needs the WGMMA_8BIT register layout and Mosaic has no relayout from the accumulator's
  WGMMA layout to it (see the README / notes). `pv="bf16"` keeps the bf16 P.V of the bf16 kernel
  (P from registers, V bf16) as the fallback.
- epilogue: O / (l * 448) in bf16 through SMEM; the per-channel V scale multiplies outside (it
  fuses with the un-permute that follows).

Quantization (`pallas_kernels.quantized.quantize_qkv`, plain jnp) runs in the same jit as the
kernel call, so XLA fuses it with the padding / chunk permutation before it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.block_sparse_mgpu import (
    _CONSUMERS,
    _LOG2E,
    _MASK_VALUE,
    _ROWS_PER_CONSUMER,
    _ROWS_PER_CTA,
    _SMEM_LIMIT_BYTES,
    _SMEM_RESERVED_BYTES,
    TuningConfig,
    _plgpu,
    prepare_index_tables,
    streams_for,
    validate_mgpu_args,
)
from pallas_kernels.quantized import FP8, P_SCALE, check_precision, quantize_qkv

__all__ = ["DEFAULT_PV", "PV_MODES", "block_sparse_attention_mgpu_fp8", "smem_bytes_fp8"]

PV_MODES = ("fp8", "bf16")
# The P.V mode pallas_kernels.api uses for the 8-bit precisions. "bf16" is the fallback should the
# fp8 P.V (P through SMEM, V transposed) not compile on a given JAX.
DEFAULT_PV = "fp8"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Geo:
    batch: int
    q_len: int
    kv_len_padded: int
    heads: int
    head_dim: int
    block_q: int          # the table's (and Q scale's) query block
    block_kv: int         # key rows per ring slot (after kv_tile split)
    kv_split: int         # table block_kv // block_kv (K scales are per table block)
    table_batch: int
    table_heads: int
    qk_dtype: Any         # float8_e4m3fn or int8
    pv: str               # "fp8" or "bf16"
    scale_log2: float
    kv_len_static: int | None
    masked: bool

    @property
    def streams(self) -> int:
        return streams_for(self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_len_padded // self.block_kv


def smem_bytes_fp8(*, block_q: int, block_kv: int, head_dim: int, num_slots: int, pv: str) -> int:
    streams = streams_for(block_q)
    q = _CONSUMERS * _ROWS_PER_CONSUMER * head_dim
    v_item = 1 if pv == "fp8" else 2
    ring = streams * num_slots * block_kv * head_dim * (1 + v_item)
    p = _CONSUMERS * _ROWS_PER_CONSUMER * block_kv if pv == "fp8" else 0
    out = _CONSUMERS * _ROWS_PER_CONSUMER * head_dim * 2
    return q + ring + p + out + _SMEM_RESERVED_BYTES


def _transforms(row_bytes: int, itemsize: int):
    """Tiling + swizzle for an SMEM tile whose rows (the wgmma K dim) hold `row_bytes` bytes."""
    _, plgpu = _plgpu()
    swizzle = min(128, row_bytes)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _kernel_body(geo: _Geo, cfg: TuningConfig, *all_refs):
    pl, plgpu = _plgpu()
    if geo.masked and geo.kv_len_static is None:
        q, k, v, q_scale, k_scale, indices, counts, kv_len, out, *scratch = all_refs
    else:
        q, k, v, q_scale, k_scale, indices, counts, out, *scratch = all_refs
        kv_len = None
    (q_smem, k_smem, v_smem, p_smem, o_smem, k_ready, v_ready, q_ready, k_consumed, v_consumed,
     schedule) = scratch
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    q_tile = lax.axis_index("q_tiles")
    wg = lax.axis_index("wg")
    slots, streams = cfg.num_slots, geo.streams
    tb = 0 if geo.table_batch == 1 else batch
    th = 0 if geo.table_heads == 1 else head

    def count_of(q_block):
        return counts[tb, th, q_block]

    def block_id(q_block, step):
        return indices[tb, th, q_block, step]

    @pl.when(wg == _CONSUMERS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        rows = [q_tile * streams + s for s in range(streams)]

        def issue(stream, q_block, step, slot, wait_consumed: bool):
            blk = block_id(q_block, step)
            barrier = stream * slots + slot
            if wait_consumed:
                plgpu.barrier_wait(k_consumed.at[barrier])
            plgpu.copy_gmem_to_smem(k.at[batch, pl.ds(blk * geo.block_kv, geo.block_kv), head],
                                    k_smem.at[stream, slot], k_ready.at[barrier])
            if wait_consumed:
                plgpu.barrier_wait(v_consumed.at[barrier])
            if geo.pv == "fp8":  # V^T: [B, H, D, S]
                src = v.at[batch, head, :, pl.ds(blk * geo.block_kv, geo.block_kv)]
            else:
                src = v.at[batch, pl.ds(blk * geo.block_kv, geo.block_kv), head]
            plgpu.copy_gmem_to_smem(src, v_smem.at[stream, slot], v_ready.at[barrier])

        for step in range(slots):
            for stream, qb in enumerate(rows):
                pl.when(step < count_of(qb))(functools.partial(issue, stream, qb, step, step, False))
        longest = count_of(rows[0])
        for qb in rows[1:]:
            longest = lax.max(longest, count_of(qb))

        @pl.loop(slots, longest)
        def _refill(step):
            slot = lax.rem(step, jnp.int32(slots))
            for stream, qb in enumerate(rows):
                pl.when(step < count_of(qb))(functools.partial(issue, stream, qb, step, slot, True))

    @pl.when(wg < _CONSUMERS)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        sched = cfg.use_schedule_barrier
        rows_per_wg, bkv, dim = _ROWS_PER_CONSUMER, geo.block_kv, geo.head_dim
        row0 = q_tile * _ROWS_PER_CTA + wg * rows_per_wg
        if streams == 2:
            stream = wg
            my_block = q_tile * 2 + wg
            count = count_of(my_block)
            longest = lax.max(count_of(q_tile * 2), count_of(q_tile * 2 + 1))
        else:
            stream = 0
            my_block = q_tile
            count = longest = count_of(my_block)
        qs = q_scale[batch, lax.div(row0, jnp.int32(geo.block_q)), head]

        def schedule_sync():
            plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(schedule)

        q_wg = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q.at[batch, pl.ds(row0, rows_per_wg), head], q_wg, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])

        row_layout, tile_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA
        m_i = plgpu.layout_cast(jnp.full((rows_per_wg,), -jnp.inf, jnp.float32), row_layout)
        l_i = plgpu.layout_cast(jnp.full((rows_per_wg,), 0.0, jnp.float32), row_layout)
        acc = plgpu.layout_cast(jnp.full((rows_per_wg, dim), 0.0, jnp.float32), tile_layout)

        @pl.when(count > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[stream * slots])

        if sched:
            pl.when(wg == 1)(schedule_sync)

        if not geo.masked:
            n_tail, kv_limit = 0, None
        elif geo.kv_len_static is not None:
            kv_limit = geo.kv_len_static
            n_tail = geo.num_kv_blocks - kv_limit // geo.block_kv
        else:
            kv_limit = kv_len[0]
            n_tail = geo.num_kv_blocks - lax.div(kv_limit, jnp.int32(geo.block_kv))
        acc_dtype = jnp.int32 if geo.qk_dtype == jnp.int8 else jnp.float32

        def kv_step(step, carry, *, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(step, jnp.int32(slots))
            barrier = stream * slots + slot
            blk = block_id(my_block, step)

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_wg, plgpu.transpose_ref(k_smem.at[stream, slot], (1, 0)))
                if sched:
                    schedule_sync()
                return s_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((rows_per_wg, bkv), acc_dtype)).astype(jnp.float32)
            plgpu.barrier_arrive(k_consumed.at[barrier])
            ks = k_scale[batch, lax.div(blk, jnp.int32(geo.kv_split)), head]
            c = qs * ks * geo.scale_log2   # dequantize and scale in one multiply
            if masked:
                limit = kv_limit - blk * bkv
                key = plgpu.broadcasted_iota(jnp.int32, (rows_per_wg, bkv), 1, layout=tile_layout)
                keep = key < limit
                s = jnp.where(keep, s, _MASK_VALUE)
            m_new = jnp.maximum(m_i, s.max(axis=1) * c)
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
            if masked:
                p = jnp.where(keep, p, 0.0)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            # (Mosaic's optimization barrier takes no 8-bit registers: fp8 P is cast after it.)
            p_op = p * P_SCALE if geo.pv == "fp8" else p.astype(jnp.bfloat16)
            acc, l_i, m_new, p_op = lax.optimization_barrier((acc, l_i, m_new, p_op))
            if geo.pv == "fp8":
                p_smem.at[wg][...] = p_op.astype(FP8)
                plgpu.commit_smem()  # generic-proxy stores -> visible to wgmma
            if sched:
                plgpu.barrier_arrive(schedule)
            plgpu.barrier_wait(v_ready.at[barrier])
            if sched:
                plgpu.barrier_wait(schedule)

            def pv(acc_ref):
                if geo.pv == "fp8":
                    plgpu.wgmma(acc_ref, p_smem.at[wg], plgpu.transpose_ref(v_smem.at[stream, slot], (1, 0)))
                else:
                    plgpu.wgmma(acc_ref, p_op, v_smem.at[stream, slot])
                nxt = step + 1

                @pl.when(nxt < count)
                def _():
                    plgpu.barrier_wait(k_ready.at[stream * slots + lax.rem(nxt, jnp.int32(slots))])

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed.at[barrier])
            return acc, m_new, l_i

        carry = (acc, m_i, l_i)
        if geo.masked:
            n_fast = lax.max(count - n_tail, jnp.int32(0))
            carry = lax.fori_loop(0, n_fast, functools.partial(kv_step, masked=False), carry)
            carry = lax.fori_loop(n_fast, count, functools.partial(kv_step, masked=True), carry)
        else:
            carry = lax.fori_loop(0, count, functools.partial(kv_step, masked=False), carry)
        acc, m_i, l_i = carry

        if sched and streams == 2:
            @pl.loop(count, longest)
            def _idle(_):
                schedule_sync()
                schedule_sync()

        if sched:
            pl.when(wg == 0)(schedule_sync)

        # P was scaled by 448 (fp8 P.V); l == 0 (no key seen) gives 0, not NaN.
        p_unit = P_SCALE if geo.pv == "fp8" else 1.0
        l_i = l_i * p_unit + float(jnp.finfo(jnp.float32).tiny)
        acc = acc * lax.broadcast_in_dim(1.0 / l_i, acc.shape, [0])
        o_wg = o_smem.at[wg]
        o_wg[...] = acc.astype(jnp.bfloat16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_wg, out.at[batch, pl.ds(row0, rows_per_wg), head])
        plgpu.wait_smem_to_gmem(0)


def _scratch(geo: _Geo, cfg: TuningConfig):
    _, plgpu = _plgpu()
    n = geo.streams * cfg.num_slots
    d, bkv = geo.head_dim, geo.block_kv
    qk_t = _transforms(d, 1)
    bf16_t = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    if geo.pv == "fp8":
        v_ring = plgpu.SMEM((geo.streams, cfg.num_slots, d, bkv), FP8, transforms=_transforms(bkv, 1))
        p_tile = plgpu.SMEM((_CONSUMERS, _ROWS_PER_CONSUMER, bkv), FP8, transforms=_transforms(bkv, 1))
    else:
        v_ring = plgpu.SMEM((geo.streams, cfg.num_slots, bkv, d), jnp.bfloat16, transforms=bf16_t)
        p_tile = plgpu.SMEM((8,), jnp.int32)  # unused placeholder
    return (
        plgpu.SMEM((_CONSUMERS, _ROWS_PER_CONSUMER, d), geo.qk_dtype, transforms=qk_t),
        plgpu.SMEM((geo.streams, cfg.num_slots, bkv, d), geo.qk_dtype, transforms=qk_t),
        v_ring,
        p_tile,
        plgpu.SMEM((_CONSUMERS, _ROWS_PER_CONSUMER, d), jnp.bfloat16, transforms=bf16_t),
        plgpu.Barrier(num_barriers=n),
        plgpu.Barrier(num_barriers=n),
        plgpu.Barrier(num_barriers=_CONSUMERS),
        plgpu.Barrier(num_arrivals=_CONSUMERS // geo.streams, num_barriers=n),
        plgpu.Barrier(num_arrivals=_CONSUMERS // geo.streams, num_barriers=n),
        plgpu.Barrier(num_arrivals=_CONSUMERS),
    )


def _launch(geo: _Geo, cfg: TuningConfig, *args):
    _, plgpu = _plgpu()
    kernel = plgpu.kernel(
        functools.partial(_kernel_body, geo, cfg),
        out_type=jax.ShapeDtypeStruct((geo.batch, geo.q_len, geo.heads, geo.head_dim), jnp.bfloat16),
        scratch_types=_scratch(geo, cfg),
        grid=(geo.batch, geo.heads, geo.q_len // _ROWS_PER_CTA),
        grid_names=("batch", "heads", "q_tiles"),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    return kernel(*args)


def default_config_fp8(*, block_q: int, block_kv: int, head_dim: int, pv: str) -> TuningConfig:
    """The deepest ring (3, then 2 slots) that fits shared memory; not tuned on hardware yet."""
    for slots in (3, 2):
        if smem_bytes_fp8(block_q=block_q, block_kv=block_kv, head_dim=head_dim, num_slots=slots,
                          pv=pv) <= _SMEM_LIMIT_BYTES:
            return TuningConfig(num_slots=slots)
    raise ValueError(f"no fp8 kernel config fits shared memory for block_q={block_q}, block_kv={block_kv}, "
                     f"head_dim={head_dim}")


def block_sparse_attention_mgpu_fp8(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_indices: jax.Array,
    kv_counts: jax.Array,
    *,
    block_q: int,
    block_kv: int,
    scale: float | None = None,
    kv_len: int | jax.Array | None = None,
    config: TuningConfig | None = None,
    precision: str = "fp8",
    pv: str = DEFAULT_PV,
) -> jax.Array:
    """8-bit block-sparse attention on Hopper; the contract of pallas_kernels.api (q, k, v bf16/fp16
    [B, S, H, D], D in {64, 128}). precision "fp8" / "int8-fp8" sets Q.K^T's operands; `pv` "fp8"
    (P and V in e4m3) or "bf16" (the fallback: bf16 P.V). Returns [B, S, H, D] in q's dtype."""
    check_precision(precision)
    if precision == "bf16":
        raise ValueError("block_sparse_attention_mgpu_fp8: precision='bf16'; use the bf16 kernel")
    if pv not in PV_MODES:
        raise ValueError(f"pv={pv!r}; expected one of {PV_MODES}")
    validate_mgpu_args(q, k, v, kv_indices, kv_counts, block_q=block_q, block_kv=block_kv, scale=scale,
                       kv_len=kv_len, config=None)
    if config is None:
        config = default_config_fp8(block_q=block_q, block_kv=block_kv, head_dim=q.shape[-1], pv=pv)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    seq = k.shape[1]
    static_len = dynamic_len = None
    if kv_len is None or (isinstance(kv_len, int) and kv_len == seq):
        masked = False
    elif isinstance(kv_len, int):
        masked, static_len = True, kv_len
    else:
        masked, dynamic_len = True, jnp.reshape(jnp.asarray(kv_len, jnp.int32), (1,))
    return _fp8_jit(q, k, v, jnp.asarray(kv_indices), jnp.asarray(kv_counts), dynamic_len, block_q=block_q,
                    block_kv=block_kv, scale=float(scale), masked=masked, kv_len_static=static_len, config=config,
                    precision=precision, pv=pv)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale", "masked", "kv_len_static",
                                             "config", "precision", "pv"))
def _fp8_jit(q, k, v, kv_indices, kv_counts, kv_len, *, block_q, block_kv, scale, masked, kv_len_static,
             config, precision, pv):
    batch, seq, heads, dim = q.shape
    streams = streams_for(block_q)
    tile = config.tile_for(block_kv)
    split = block_kv // tile
    indices, counts = prepare_index_tables(kv_indices, kv_counts, num_kv_blocks=seq // block_kv,
                                           streams=streams, kv_split=split)
    kv_true = kv_len_static if kv_len_static is not None else (kv_len[0] if kv_len is not None else None)
    qq = quantize_qkv(q, k, v, precision=precision, block_q=block_q, block_kv=block_kv, kv_len=kv_true)
    q_len = indices.shape[2] * block_q
    q8, q_scale = qq.q8, qq.q_scale
    if q_len != seq:  # odd number of 64-row blocks: one extra block of count 0
        q8 = jnp.pad(q8, ((0, 0), (0, q_len - seq), (0, 0), (0, 0)))
        q_scale = jnp.pad(q_scale, ((0, 0), (0, (q_len - seq) // block_q), (0, 0)), constant_values=1.0)
    v_op = jnp.transpose(qq.v8, (0, 2, 3, 1)) if pv == "fp8" else v.astype(jnp.bfloat16)
    geo = _Geo(batch=batch, q_len=q_len, kv_len_padded=seq, heads=heads, head_dim=dim, block_q=block_q,
               block_kv=tile, kv_split=split, table_batch=indices.shape[0], table_heads=indices.shape[1],
               qk_dtype=jnp.dtype(q8.dtype), pv=pv, scale_log2=scale * _LOG2E, kv_len_static=kv_len_static,
               masked=masked)
    args = (q8, qq.k8, v_op, q_scale, qq.k_scale, indices, counts) + ((kv_len,) if kv_len is not None else ())
    out = _launch(geo, config, *args)[:, :seq].astype(jnp.float32)
    if pv == "fp8":
        out = out * qq.v_scale[:, None, :, :]
    return out.astype(q.dtype)
