"""Block-sparse attention for Hopper GPUs in Pallas Mosaic GPU (`plgpu`).

One CTA owns 128 query rows of one (batch, head) and runs three warpgroups:

- producer (warpgroup 2): reads the key-block ids of its query block(s) from the index table in
  GMEM and TMA-copies those K and V blocks into a `num_slots`-deep ring in SMEM;
- two consumers (warpgroups 0, 1), 64 query rows each: S = Q K^T with wgmma, online softmax in
  registers (exp2 with the scale folded in), O += P V with wgmma; a schedule barrier makes one
  warpgroup's softmax overlap the other's matrix work;
- epilogue: O / l written through SMEM with a TMA store; a query block with count 0 writes zeros.

block_q = 128: both consumers share one index list and one K/V stream ("streams" = 1).
block_q = 64: each consumer owns one query block and its own K/V stream ("streams" = 2); the
producer serves both rings, and the consumer with fewer blocks idles through the schedule
barrier until the other finishes.

Keys at positions >= kv_len are masked only in the last `n_tail` steps of a row (lists are
sorted, so padded key blocks come last); the other steps run without masking.

The Mosaic GPU modules are imported lazily, so importing this file works on any backend.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "TuningConfig",
    "KernelGeometry",
    "block_sparse_attention_mgpu",
    "prepare_index_tables",
    "validate_mgpu_args",
]

_ROWS_PER_CONSUMER = 64   # wgmma M per warpgroup
_CONSUMERS = 2
_ROWS_PER_CTA = _ROWS_PER_CONSUMER * _CONSUMERS
_SMEM_LIMIT_BYTES = 227 * 1024
_SMEM_RESERVED_BYTES = 2304  # barriers + Mosaic's default 2 KiB reduction scratch
_MASK_VALUE = -1e30              # finite: a fully masked first block must not give inf - inf
_LOG2E = math.log2(math.e)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCKS = (64, 128)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TuningConfig:
    """Kernel knobs that do not change the result.

    num_slots: depth of the K/V ring per stream (declared range MIN_SLOTS..MAX_SLOTS).
    kv_tile: key rows per K/V ring slot; None = the table's block_kv. 64 with block_kv = 128
        splits every listed key block in two (the index table is expanded to match), which
        halves the ring's shared memory (needed for head_dim 128 with block_q 64).
    use_schedule_barrier: ping-pong the two consumer warpgroups so one's softmax overlaps the
        other's wgmma (FlashAttention-3 style).
    """

    num_slots: int = 2
    use_schedule_barrier: bool = True
    kv_tile: int | None = None

    MIN_SLOTS: ClassVar[int] = 2
    MAX_SLOTS: ClassVar[int] = 4

    def __post_init__(self):
        if not isinstance(self.num_slots, int) or not self.MIN_SLOTS <= self.num_slots <= self.MAX_SLOTS:
            raise ValueError(
                f"TuningConfig: num_slots={self.num_slots!r}; expected an int in "
                f"[{self.MIN_SLOTS}, {self.MAX_SLOTS}]")
        if not isinstance(self.use_schedule_barrier, bool):
            raise ValueError(
                f"TuningConfig: use_schedule_barrier={self.use_schedule_barrier!r}; expected a bool")
        if self.kv_tile is not None and self.kv_tile not in SUPPORTED_BLOCKS:
            raise ValueError(f"TuningConfig: kv_tile={self.kv_tile!r}; expected None or one of "
                             f"{SUPPORTED_BLOCKS}")

    def tile_for(self, block_kv: int) -> int:
        """K/V rows per ring slot for a table of `block_kv`-row key blocks."""
        return block_kv if self.kv_tile is None else self.kv_tile

    def smem_bytes(self, *, block_q: int, block_kv: int, head_dim: int, itemsize: int) -> int:
        """Shared memory the kernel allocates for these shapes (Q/O tiles + K/V ring + reserve)."""
        streams = streams_for(block_q)
        block_kv = self.tile_for(block_kv)
        q_tiles = _CONSUMERS * _ROWS_PER_CONSUMER * head_dim * itemsize
        ring = streams * self.num_slots * 2 * block_kv * head_dim * itemsize
        return q_tiles + ring + _SMEM_RESERVED_BYTES

    def fits(self, *, block_q: int, block_kv: int, head_dim: int, itemsize: int = 2) -> bool:
        return self.smem_bytes(block_q=block_q, block_kv=block_kv, head_dim=head_dim,
                               itemsize=itemsize) <= _SMEM_LIMIT_BYTES


def streams_for(block_q: int) -> int:
    """Independent index lists (K/V streams) per CTA: 1 for 128-row query blocks, 2 for 64."""
    return _ROWS_PER_CTA // block_q


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class KernelGeometry:
    """Static shapes of one kernel launch (after index-table preparation)."""

    batch: int
    q_len: int            # query rows the kernel sees (a multiple of 128)
    kv_len_padded: int    # key rows (a multiple of block_kv)
    heads: int
    head_dim: int
    block_q: int
    block_kv: int
    max_blocks: int
    table_batch: int      # 1 or batch
    table_heads: int      # 1 or heads
    dtype: Any
    scale_log2: float     # softmax scale * log2(e)
    kv_len_static: int | None  # None: kv_len is a runtime input (or no padding, see masked)
    masked: bool          # some keys are padding

    @property
    def streams(self) -> int:
        return streams_for(self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_len_padded // self.block_kv

    @property
    def num_q_tiles(self) -> int:
        return self.q_len // _ROWS_PER_CTA


# ---------------------------------------------------------------------------------------------
# Index tables


def prepare_index_tables(kv_indices, kv_counts, *, num_kv_blocks: int, streams: int,
                         kv_split: int = 1):
    """Make the tables safe for the kernel: int32, counts in [0, max_blocks], ids in range.

    kv_indices [Bt, Ht, nq, M] / kv_counts [Bt, Ht, nq] (Bt, Ht in {1, B}, {1, H}) ->
    kv_indices [Bt, Ht, nq', M * kv_split] / kv_counts [Bt, Ht, nq'], where nq' pads nq to a
    multiple of `streams` with rows of count 0 and every key block b becomes the `kv_split`
    sub-blocks b * kv_split + r (still sorted). Pure jnp; traceable.
    """
    kv_indices = jnp.asarray(kv_indices)
    kv_counts = jnp.asarray(kv_counts)
    if not jnp.issubdtype(kv_indices.dtype, jnp.integer):
        raise ValueError(f"kv_indices.dtype={kv_indices.dtype}; expected an integer dtype")
    if not jnp.issubdtype(kv_counts.dtype, jnp.integer):
        raise ValueError(f"kv_counts.dtype={kv_counts.dtype}; expected an integer dtype")
    max_blocks = kv_indices.shape[-1]
    kv_indices = jnp.clip(kv_indices.astype(jnp.int32), 0, num_kv_blocks - 1)
    kv_counts = jnp.clip(kv_counts.astype(jnp.int32), 0, min(max_blocks, num_kv_blocks))
    if kv_split > 1:
        sub = jnp.arange(kv_split, dtype=jnp.int32)
        kv_indices = (kv_indices[..., None] * kv_split + sub).reshape(
            kv_indices.shape[:-1] + (max_blocks * kv_split,))
        kv_counts = kv_counts * kv_split
    extra = (-kv_indices.shape[2]) % streams
    if extra:
        kv_indices = jnp.pad(kv_indices, ((0, 0), (0, 0), (0, extra), (0, 0)))
        kv_counts = jnp.pad(kv_counts, ((0, 0), (0, 0), (0, extra)))
    return kv_indices, kv_counts


# ---------------------------------------------------------------------------------------------
# Kernel stages


def _plgpu():
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return pl, plgpu


@dataclasses.dataclass(frozen=True)
class _Refs:
    """Everything a stage needs; built once per CTA inside the kernel body."""

    q: Any
    k: Any
    v: Any
    indices: Any
    counts: Any
    kv_len: Any          # GMEM scalar ref or None
    out: Any
    q_smem: Any          # [2, 64, D]
    k_smem: Any          # [streams, slots, bkv, D]
    v_smem: Any
    k_ready: Any         # Barrier[streams * slots]
    v_ready: Any
    q_ready: Any         # Barrier[2]
    k_consumed: Any      # Barrier[streams * slots], 2 // streams arrivals
    v_consumed: Any
    schedule: Any        # Barrier, 2 arrivals


class _Row:
    """One query block's index row: its count and block ids, read from GMEM."""

    def __init__(self, geo: KernelGeometry, refs: _Refs, batch, head, q_block):
        self._refs = refs
        b = 0 if geo.table_batch == 1 else batch
        h = 0 if geo.table_heads == 1 else head
        self._at = (b, h, q_block)
        self.count = refs.counts[self._at]

    def block_id(self, step):
        return self._refs.indices[(*self._at, step)]


def _tail_steps(geo: KernelGeometry, refs: _Refs):
    """How many trailing steps of a row may hold padded keys (0 when nothing is padded)."""
    if not geo.masked:
        return 0, None
    if geo.kv_len_static is not None:
        kv_len = geo.kv_len_static
        return geo.num_kv_blocks - kv_len // geo.block_kv, kv_len
    kv_len = refs.kv_len[0]
    return geo.num_kv_blocks - lax.div(kv_len, jnp.int32(geo.block_kv)), kv_len


def _producer(geo: KernelGeometry, cfg: TuningConfig, refs: _Refs, rows: list[_Row], batch, head):
    """Warpgroup 2: TMA K/V blocks named by the index rows into the ring, slot by slot."""
    pl, plgpu = _plgpu()
    plgpu.set_max_registers(40, action="decrease")
    slots = cfg.num_slots

    def issue(stream: int, row: _Row, step, slot, wait_consumed: bool):
        block = row.block_id(step)
        src = (batch, pl.ds(block * geo.block_kv, geo.block_kv), head)
        barrier = stream * slots + slot
        if wait_consumed:
            plgpu.barrier_wait(refs.k_consumed.at[barrier])
        plgpu.copy_gmem_to_smem(refs.k.at[src], refs.k_smem.at[stream, slot], refs.k_ready.at[barrier])
        if wait_consumed:
            plgpu.barrier_wait(refs.v_consumed.at[barrier])
        plgpu.copy_gmem_to_smem(refs.v.at[src], refs.v_smem.at[stream, slot], refs.v_ready.at[barrier])

    for step in range(slots):  # fill the ring; nothing to wait for yet
        for stream, row in enumerate(rows):
            pl.when(step < row.count)(functools.partial(issue, stream, row, step, step, False))

    longest = rows[0].count
    for row in rows[1:]:
        longest = lax.max(longest, row.count)

    @pl.loop(slots, longest)
    def _refill(step):
        slot = lax.rem(step, jnp.int32(slots))
        for stream, row in enumerate(rows):
            pl.when(step < row.count)(functools.partial(issue, stream, row, step, slot, True))


def _consumer(geo: KernelGeometry, cfg: TuningConfig, refs: _Refs, rows: list[_Row], wg, batch,
              head, q_tile):
    """Warpgroups 0/1: 64 query rows each; online softmax over the row's key blocks."""
    pl, plgpu = _plgpu()
    plgpu.set_max_registers(232, action="increase")
    slots, streams = cfg.num_slots, geo.streams
    sched = cfg.use_schedule_barrier
    rows_per_wg, bkv, dim = _ROWS_PER_CONSUMER, geo.block_kv, geo.head_dim
    stream = wg if streams == 2 else 0
    if streams == 2:
        row = _Row(geo, refs, batch, head, q_tile * 2 + wg)
        count = row.count
        longest = lax.max(rows[0].count, rows[1].count)
    else:
        row = rows[0]
        count = longest = row.count
    q_smem = refs.q_smem.at[wg]
    row0 = q_tile * _ROWS_PER_CTA + wg * rows_per_wg

    def schedule_sync():
        plgpu.barrier_arrive(refs.schedule)
        plgpu.barrier_wait(refs.schedule)

    plgpu.copy_gmem_to_smem(refs.q.at[batch, pl.ds(row0, rows_per_wg), head], q_smem,
                            refs.q_ready.at[wg])
    plgpu.barrier_wait(refs.q_ready.at[wg])

    row_layout, tile_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA
    m_i = plgpu.layout_cast(jnp.full((rows_per_wg,), -jnp.inf, jnp.float32), row_layout)
    l_i = plgpu.layout_cast(jnp.full((rows_per_wg,), 0.0, jnp.float32), row_layout)
    acc = plgpu.layout_cast(jnp.full((rows_per_wg, dim), 0.0, jnp.float32), tile_layout)

    @pl.when(count > 0)
    def _():
        plgpu.barrier_wait(refs.k_ready.at[stream * slots])

    if sched:
        pl.when(wg == 1)(schedule_sync)

    n_tail, kv_len = _tail_steps(geo, refs)

    def kv_step(step, carry, *, masked: bool):
        acc, m_i, l_i = carry
        slot = lax.rem(step, jnp.int32(slots))
        barrier = stream * slots + slot

        def qk(s_ref):
            plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(refs.k_smem.at[stream, slot], (1, 0)))
            if sched:
                schedule_sync()
            return s_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((rows_per_wg, bkv), jnp.float32))
        plgpu.barrier_arrive(refs.k_consumed.at[barrier])

        if masked:
            limit = kv_len - row.block_id(step) * bkv
            key = plgpu.broadcasted_iota(jnp.int32, (rows_per_wg, bkv), 1, layout=tile_layout)
            keep = key < limit
            s = jnp.where(keep, s, _MASK_VALUE)
        # m is kept in the log2 domain, scaled, so p = exp2(s * c - m) is one FMA + exp2.
        m_new = jnp.maximum(m_i, s.max(axis=1) * geo.scale_log2)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s * geo.scale_log2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
        if masked:
            p = jnp.where(keep, p, 0.0)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha + p.sum(axis=1)
        p16 = p.astype(geo.dtype)
        # Keep the scheduler from sinking the softmax past the barriers below.
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        if sched:
            plgpu.barrier_arrive(refs.schedule)
        plgpu.barrier_wait(refs.v_ready.at[barrier])
        if sched:
            plgpu.barrier_wait(refs.schedule)

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, refs.v_smem.at[stream, slot])
            nxt = step + 1

            @pl.when(nxt < count)
            def _():
                plgpu.barrier_wait(refs.k_ready.at[stream * slots + lax.rem(nxt, jnp.int32(slots))])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(refs.v_consumed.at[barrier])
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
        # The schedule barrier needs both warpgroups: idle through the other one's extra steps.
        @pl.loop(count, longest)
        def _idle(_):
            schedule_sync()
            schedule_sync()

    if sched:
        pl.when(wg == 0)(schedule_sync)

    _epilogue(geo, refs, acc, l_i, q_smem, batch, head, row0)


def _epilogue(geo: KernelGeometry, refs: _Refs, acc, l_i, q_smem, batch, head, row0):
    """O = acc / l through SMEM and a TMA store. l == 0 (no key seen) gives 0, not NaN."""
    pl, plgpu = _plgpu()
    l_i = l_i + float(jnp.finfo(jnp.float32).tiny)
    acc = acc * lax.broadcast_in_dim(1.0 / l_i, acc.shape, [0])
    q_smem[...] = acc.astype(geo.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, refs.out.at[batch, pl.ds(row0, _ROWS_PER_CONSUMER), head])
    plgpu.wait_smem_to_gmem(0)


def _kernel_body(geo: KernelGeometry, cfg: TuningConfig, *all_refs):
    pl, plgpu = _plgpu()
    if geo.masked and geo.kv_len_static is None:
        q, k, v, indices, counts, kv_len, out, *scratch = all_refs
    else:
        q, k, v, indices, counts, out, *scratch = all_refs
        kv_len = None
    q_smem, k_smem, v_smem, k_ready, v_ready, q_ready, k_consumed, v_consumed, schedule = scratch
    refs = _Refs(q, k, v, indices, counts, kv_len, out, q_smem, k_smem, v_smem, k_ready, v_ready,
                 q_ready, k_consumed, v_consumed, schedule)
    batch = lax.axis_index("batch")
    head = lax.axis_index("heads")
    q_tile = lax.axis_index("q_tiles")
    wg = lax.axis_index("wg")
    rows = [_Row(geo, refs, batch, head, q_tile * geo.streams + s) for s in range(geo.streams)]

    @pl.when(wg < _CONSUMERS)
    def _():
        _consumer(geo, cfg, refs, rows, wg, batch, head, q_tile)

    @pl.when(wg == _CONSUMERS)
    def _():
        _producer(geo, cfg, refs, rows, batch, head)


def _scratch(geo: KernelGeometry, cfg: TuningConfig):
    _, plgpu = _plgpu()
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    n = geo.streams * cfg.num_slots
    ring = (geo.streams, cfg.num_slots, geo.block_kv, geo.head_dim)
    return (
        plgpu.SMEM((_CONSUMERS, _ROWS_PER_CONSUMER, geo.head_dim), geo.dtype, transforms=transforms),
        plgpu.SMEM(ring, geo.dtype, transforms=transforms),
        plgpu.SMEM(ring, geo.dtype, transforms=transforms),
        plgpu.Barrier(num_barriers=n),
        plgpu.Barrier(num_barriers=n),
        plgpu.Barrier(num_barriers=_CONSUMERS),
        plgpu.Barrier(num_arrivals=_CONSUMERS // geo.streams, num_barriers=n),
        plgpu.Barrier(num_arrivals=_CONSUMERS // geo.streams, num_barriers=n),
        plgpu.Barrier(num_arrivals=_CONSUMERS),
    )


def _launch(geo: KernelGeometry, cfg: TuningConfig, q, k, v, indices, counts, kv_len):
    _, plgpu = _plgpu()
    kernel = plgpu.kernel(
        functools.partial(_kernel_body, geo, cfg),
        out_type=jax.ShapeDtypeStruct((geo.batch, geo.q_len, geo.heads, geo.head_dim), geo.dtype),
        scratch_types=_scratch(geo, cfg),
        # Mosaic maps the last grid axis to blockIdx.x: q tiles run fastest, so the CTAs in flight
        # share one head's K/V in L2.
        grid=(geo.batch, geo.heads, geo.num_q_tiles),
        grid_names=("batch", "heads", "q_tiles"),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    args = (q, k, v, indices, counts) + ((kv_len,) if kv_len is not None else ())
    return kernel(*args)


# ---------------------------------------------------------------------------------------------
# Public wrapper


def validate_mgpu_args(q, k, v, kv_indices, kv_counts, *, block_q: int, block_kv: int, scale,
                       kv_len, config: TuningConfig | None) -> None:
    """Every check the Mosaic kernel needs beyond the shared contract checks; raises ValueError."""
    from pallas_kernels.reference import check_block_sparse_args

    check_block_sparse_args(q, k, v, kv_indices, kv_counts, block_q, block_kv)
    if block_q not in SUPPORTED_BLOCKS:
        raise ValueError(f"block_q={block_q!r}; the Mosaic kernel supports {SUPPORTED_BLOCKS}")
    if block_kv not in SUPPORTED_BLOCKS:
        raise ValueError(f"block_kv={block_kv!r}; the Mosaic kernel supports {SUPPORTED_BLOCKS}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q length {q.shape[1]} != k length {k.shape[1]}; the Mosaic kernel "
                         "expects self-attention over one padded sequence")
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or dtypes.pop() not in tuple(map(jnp.dtype, SUPPORTED_DTYPES)):
        raise ValueError(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}; the Mosaic kernel expects "
                         "all bfloat16 or all float16")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={q.shape[-1]}; the Mosaic kernel supports {SUPPORTED_HEAD_DIMS}")
    if config is not None and block_kv % config.tile_for(block_kv):
        raise ValueError(f"config.kv_tile={config.kv_tile} does not divide block_kv={block_kv}")
    for name, table in (("kv_indices", kv_indices), ("kv_counts", kv_counts)):
        if not jnp.issubdtype(jnp.asarray(table).dtype, jnp.integer):
            raise ValueError(f"{name}.dtype={jnp.asarray(table).dtype}; expected int32")
    if kv_indices.shape[-1] < 1:
        raise ValueError(f"kv_indices.shape={kv_indices.shape}; expected max_blocks >= 1")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r}; expected a finite float > 0 (a Python number)")
    if kv_len is not None:
        if isinstance(kv_len, (int,)) and not isinstance(kv_len, bool):
            if not 1 <= kv_len <= k.shape[1]:
                raise ValueError(f"kv_len={kv_len}; expected 1 <= kv_len <= {k.shape[1]}")
        elif not (hasattr(kv_len, "shape") and jnp.shape(kv_len) == ()
                  and jnp.issubdtype(jnp.asarray(kv_len).dtype, jnp.integer)):
            raise ValueError(f"kv_len={kv_len!r}; expected None, an int or an int scalar array")
    if config is not None:
        if not isinstance(config, TuningConfig):
            raise ValueError(f"config={config!r}; expected a TuningConfig")
        itemsize = jnp.dtype(q.dtype).itemsize
        if not config.fits(block_q=block_q, block_kv=block_kv, head_dim=q.shape[-1], itemsize=itemsize):
            need = config.smem_bytes(block_q=block_q, block_kv=block_kv, head_dim=q.shape[-1],
                                     itemsize=itemsize)
            raise ValueError(f"config={config}: needs {need} bytes of shared memory for "
                             f"block_q={block_q}, block_kv={block_kv}, head_dim={q.shape[-1]}; "
                             f"the limit is {_SMEM_LIMIT_BYTES}")


def block_sparse_attention_mgpu(
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
    config: TuningConfig,
) -> jax.Array:
    """Block-sparse attention on a Hopper GPU (the contract in pallas_kernels/api.py).

    q, k, v: [B, S, H, D] bf16 or fp16, D in {64, 128}, S a multiple of block_q and block_kv;
    kv_indices int32 [B or 1, H or 1, S/block_q, M] sorted; kv_counts int32 [B or 1, H or 1,
    S/block_q]; kv_len: int or int32 scalar, keys at positions >= kv_len get no weight.
    Returns [B, S, H, D] in q's dtype; rows of a query block with count 0 are zeros. `config` is
    chosen by the caller (pallas_kernels.api picks `heuristics.default_config` when none is given).
    """
    if config is None:
        raise ValueError("config=None; pass a TuningConfig (pallas_kernels.api.block_sparse_attention picks one)")
    validate_mgpu_args(q, k, v, kv_indices, kv_counts, block_q=block_q, block_kv=block_kv,
                       scale=scale, kv_len=kv_len, config=config)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    seq = k.shape[1]
    static_len = None
    dynamic_len = None
    if kv_len is None or (isinstance(kv_len, int) and kv_len == seq):
        masked = False
    elif isinstance(kv_len, int):
        masked, static_len = True, kv_len
    else:
        masked, dynamic_len = True, jnp.reshape(jnp.asarray(kv_len, jnp.int32), (1,))
    return _block_sparse_jit(q, k, v, jnp.asarray(kv_indices), jnp.asarray(kv_counts), dynamic_len,
                             block_q=block_q, block_kv=block_kv, scale=float(scale),
                             masked=masked, kv_len_static=static_len, config=config)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale", "masked",
                                             "kv_len_static", "config"))
def _block_sparse_jit(q, k, v, kv_indices, kv_counts, kv_len, *, block_q, block_kv, scale, masked,
                      kv_len_static, config):
    batch, seq, heads, dim = q.shape
    streams = streams_for(block_q)
    tile = config.tile_for(block_kv)
    indices, counts = prepare_index_tables(kv_indices, kv_counts, num_kv_blocks=seq // block_kv,
                                           streams=streams, kv_split=block_kv // tile)
    block_kv = tile
    q_len = indices.shape[2] * block_q
    if q_len != seq:  # odd number of 64-row blocks: one extra block of count 0
        q = jnp.pad(q, ((0, 0), (0, q_len - seq), (0, 0), (0, 0)))
    geo = KernelGeometry(
        batch=batch, q_len=q_len, kv_len_padded=seq, heads=heads, head_dim=dim, block_q=block_q,
        block_kv=block_kv, max_blocks=indices.shape[-1], table_batch=indices.shape[0],
        table_heads=indices.shape[1], dtype=jnp.dtype(q.dtype), scale_log2=scale * _LOG2E,
        kv_len_static=kv_len_static, masked=masked)
    out = _launch(geo, config, q, k, v, indices, counts, kv_len)
    return out[:, :seq] if q_len != seq else out
