"""Our block-sparse attention kernels vs NVIDIA's cuDNN frontend BSA on the same index lists (issue 19).

    python bench/bsa_peers.py --json $OUT/bsa_peers.json          # 64/128-token blocks x 0.9375/0.875
    python bench/bsa_peers.py --blocks 64 --sparsities 0.9375     # one case
    python bench/bsa_peers.py --smoke                              # CPU: tiny shapes, no torch, no cudnn

Rows per case (LongCat 720p: B1, S 84480, H32, D128; 64-token blocks = 4x4x4 chunks, 128 = 4x4x8):
  cudnn-dense         jax.nn.dot_product_attention(implementation="cudnn"), timed once per run
  jaxvid-bf16         pallas_kernels.api.block_sparse_attention (the Mosaic GPU kernel)
  jaxvid-fp8 / -int8-fp8   the same entry point with precision= (Sage-style, quantization included)
  jaxvid-*/pv-bf16    with --pv-bf16: the 8-bit kernels with a bf16 P.V (block_sparse_mgpu_fp8, pv="bf16")
  cudnn-bsa-bf16      cudnn.BSA.block_sparse_attention_forward (CuTe DSL, SM90 path)
  cudnn-bsa-sage-fp8  cudnn.BSA.block_sparse_attention_fp8_forward (its quantization included)
Columns: median ms (wall clock, after two warm-up calls; bench.attention.median_ms for both
frameworks), useful TFLOP/s (4 B H S^2 D x density), that rate over cuDNN dense's, and the relative
L2 error against an fp32 reference on a slice (a few query blocks of two heads: the full fp32
reference does not fit), with cuDNN's first-call (compile) seconds in the note.

The index lists: per (batch, head, query block) `count = int((1 - sparsity) * n_blocks)` distinct key
blocks drawn uniformly at random (seed fixed per case), sorted ascending. Ours are the kernel
contract's tables (`pallas_kernels.reference.block_mask_to_indices` of that random block mask);
cuDNN's (`to_cudnn_tables`) are the same rows in its layout: `q2k_block_index` int32
[B, H, n_q_blocks, k] (q/k/v [B, H, S, D]) with a fixed `block_sparse_num` k per row, which is
what its SM90 Sage FP8 path requires. tests/test_bsa_peers.py checks on CPU that both describe the
same block mask and give the same attention.

GPU requirements: nvidia-cudnn-frontend 1.32 and the CUTLASS DSL wheels (bench/PEERS.md: staging
on a machine with no network); torch (cuDNN BSA takes torch tensors; inputs pass through DLPack).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.attention import cudnn_dense_ms, flops, make_qkv, median_ms  # noqa: E402
from bench.specs import AttentionSpec  # noqa: E402

log = logging.getLogger("bench.bsa_peers")

LONGCAT_720P_LATENT = (24, 44, 80)  # 93 frames at 720p: S = 84480
CHUNKS = {64: (4, 4, 4), 128: (4, 4, 8)}  # token block -> LongCat 3D chunk
OUR_PRECISIONS = ("fp8", "int8-fp8")


@dataclasses.dataclass(frozen=True)
class CudnnTables:
    """cuDNN BSA's sparse metadata: `idx` int32 [B, H, n_q_blocks, k] (C-contiguous), every row the
    ascending key-block ids one query block attends to; `k_per_row` its fixed count (the API's
    `block_sparse_num`)."""

    idx: np.ndarray
    k_per_row: int


@dataclasses.dataclass
class Row:
    case: str
    impl: str
    ms: float
    tflops: float
    vs_dense_rate: float | None
    rel_l2_fp32: float | None
    note: str = ""


def peer_spec(block: int, sparsity: float, *, latent: tuple[int, int, int] = LONGCAT_720P_LATENT,
              heads: int = 32, head_dim: int = 128, batch: int = 1) -> AttentionSpec:
    """The LongCat BSA AttentionSpec for `block`-token blocks (its 3D chunk from CHUNKS)."""
    if block not in CHUNKS:
        raise ValueError(f"block={block!r}; expected one of {tuple(CHUNKS)} (cuDNN BSA's sparse_block_size)")
    chunk = CHUNKS[block]
    seq = math.prod(latent)
    if seq % block:
        raise ValueError(f"latent={latent}: S={seq} is not a multiple of block={block}")
    return AttentionSpec(name=f"longcat-{'x'.join(map(str, latent))}-bsa{sparsity}-blk{block}", batch=batch,
                         seq=seq, heads=heads, head_dim=head_dim, block=block, pattern="bsa", latent=latent,
                         chunk=chunk, sparsity=sparsity)


def row_count(sparsity: float, n_blocks: int) -> int:
    """Key blocks per query block: LongCat's top-k count int((1 - sparsity) * n), at least 1."""
    from jaxvid.attention.bsa import topk_count

    count = topk_count(sparsity, n_blocks)
    if count < 1:
        raise ValueError(f"sparsity={sparsity} keeps no key block of {n_blocks}; lower it or use longer sequences")
    return count


def random_block_mask(batch: int, heads: int, n_blocks: int, count: int, seed: int) -> np.ndarray:
    """bool [B, H, n, n]: every row holds exactly `count` True columns, drawn uniformly at random."""
    if not 1 <= count <= n_blocks:
        raise ValueError(f"count={count}; expected 1 <= count <= n_blocks={n_blocks}")
    scores = np.random.default_rng(seed).random((batch, heads, n_blocks, n_blocks), dtype=np.float32)
    chosen = np.argpartition(scores, n_blocks - count, axis=-1)[..., n_blocks - count:]
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, chosen, True, axis=-1)
    return mask


def to_cudnn_tables(kv_indices: np.ndarray, kv_counts: np.ndarray, *, batch: int, heads: int) -> CudnnTables:
    """Our kernel tables -> cuDNN BSA's layout, the same sparsity pattern.

    kv_indices int32 [B or 1, H or 1, n_q, M] (ascending, entries past the count ignored), kv_counts
    int32 [B or 1, H or 1, n_q]. cuDNN's SM90 Sage FP8 path takes one fixed count for every row, so
    the counts must all be equal; leading dims of 1 are broadcast to (batch, heads) and materialized.
    """
    kv_indices, kv_counts = np.asarray(kv_indices), np.asarray(kv_counts)
    if kv_indices.ndim != 4 or kv_indices.shape[0] not in (1, batch) or kv_indices.shape[1] not in (1, heads):
        raise ValueError(f"kv_indices.shape={kv_indices.shape}; expected [{batch} or 1, {heads} or 1, n_q, M]")
    if kv_counts.shape != kv_indices.shape[:3]:
        raise ValueError(f"kv_counts.shape={kv_counts.shape}; expected {kv_indices.shape[:3]}")
    k = int(kv_counts.flat[0]) if kv_counts.size else 0
    if not kv_counts.size or np.any(kv_counts != k):
        raise ValueError(f"kv_counts: cuDNN BSA's fixed-count layout needs one count for every row; got "
                         f"min {kv_counts.min(initial=0)} max {kv_counts.max(initial=0)}")
    if not 1 <= k <= kv_indices.shape[-1]:
        raise ValueError(f"kv_counts={k}; expected 1 <= count <= max_blocks={kv_indices.shape[-1]}")
    rows = kv_indices[..., :k].astype(np.int32)
    if k > 1 and np.any(np.diff(rows, axis=-1) <= 0):
        raise ValueError("kv_indices: the listed key blocks of a row must be strictly ascending")
    if rows.min() < 0:
        raise ValueError(f"kv_indices: negative key block id {rows.min()}")
    idx = np.broadcast_to(rows, (batch, heads, *rows.shape[2:])).copy()  # contiguous, writable
    return CudnnTables(idx=idx, k_per_row=k)


def cudnn_tables_to_block_mask(tables: CudnnTables, n_kv_blocks: int) -> np.ndarray:
    """cuDNN's layout read back as a bool block mask [B, H, n_q, n_kv_blocks] (its first k_per_row
    entries of a row are the key blocks that query block attends to)."""
    mask = np.zeros(tables.idx.shape[:3] + (n_kv_blocks,), bool)
    np.put_along_axis(mask, tables.idx[..., :tables.k_per_row], True, axis=-1)
    return mask


def check_cudnn_args(q_bhsd_shape: tuple[int, ...], tables: CudnnTables, block: int, *, sage: bool) -> None:
    """The SM90 constraints of cuDNN frontend 1.32's BSA wrappers that this bench relies on; raises
    ValueError naming the argument (so --smoke catches a wrong layout before any GPU time)."""
    if len(q_bhsd_shape) != 4:
        raise ValueError(f"q shape {q_bhsd_shape}; expected [B, H, S, D]")
    b, h, s, d = q_bhsd_shape
    if block not in (64, 128):
        raise ValueError(f"sparse_block_size={block}; expected 64 or 128")
    if s % block:
        raise ValueError(f"S={s} must be a multiple of sparse_block_size={block} on SM90")
    if d not in (64, 96, 128) or (sage and d != 128):
        raise ValueError(f"D={d}; cuDNN BSA SM90 takes 64/96/128 (Sage FP8: 128 only)")
    want = (b, h, s // block)
    if tables.idx.dtype != np.int32 or tables.idx.ndim != 4 or tables.idx.shape[:3] != want:
        raise ValueError(f"q2k_block_index {tables.idx.dtype} {tables.idx.shape}; expected int32 {want + ('k',)}")
    if not tables.idx.flags.c_contiguous:
        raise ValueError("q2k_block_index must be C-contiguous")
    if not 1 <= tables.k_per_row <= tables.idx.shape[-1]:
        raise ValueError(f"block_sparse_num={tables.k_per_row}; expected 1..{tables.idx.shape[-1]}")
    if tables.idx.max() >= s // block or tables.idx.min() < 0:
        raise ValueError(f"q2k_block_index values must lie in [0, {s // block})")


def cudnn_semantics_reference(q, k, v, tables: CudnnTables, block: int, scale: float | None = None) -> np.ndarray:
    """fp32 numpy attention as cuDNN BSA defines it: q, k, v [B, H, S, D]; query block i of (b, h)
    attends to the key blocks idx[b, h, i, :k_per_row]. Returns [B, H, S, D]. Tiny shapes only."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = np.zeros(q.shape, np.float32)
    for b, h, i in np.ndindex(*tables.idx.shape[:3]):
        keys = np.concatenate([np.arange(j * block, (j + 1) * block) for j in tables.idx[b, h, i, :tables.k_per_row]])
        logits = q[b, h, i * block:(i + 1) * block] @ k[b, h, keys].T * scale
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[b, h, i * block:(i + 1) * block] = (p / p.sum(-1, keepdims=True)) @ v[b, h, keys]
    return out


def slice_plan(spec: AttentionSpec, n_q_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query blocks, their token rows, heads) the fp32 reference is computed on: `n_q_blocks`
    evenly spaced query blocks of the first and the last head."""
    n = spec.padded_seq // spec.block
    blocks = np.unique(np.linspace(0, n - 1, min(n_q_blocks, n)).round().astype(np.int64))
    rows = (blocks[:, None] * spec.block + np.arange(spec.block)).reshape(-1)
    heads = np.unique(np.array([0, spec.heads - 1]))
    return blocks, rows, heads


def fp32_reference_slice(q, k, v, indices, counts, spec: AttentionSpec, blocks, rows, heads) -> np.ndarray:
    """Our fp32 reference (pallas_kernels.reference) on the slice: [B, len(rows), len(heads), D]."""
    from pallas_kernels.reference import block_sparse_attention_reference

    hs = jnp.asarray(heads)
    q_s = jnp.take(jnp.take(q, jnp.asarray(rows), axis=1), hs, axis=2).astype(jnp.float32)
    k_s, v_s = (jnp.take(x, hs, axis=2).astype(jnp.float32) for x in (k, v))
    idx_s = np.asarray(indices)[:, heads][:, :, blocks]
    cnt_s = np.asarray(counts)[:, heads][:, :, blocks]
    out = block_sparse_attention_reference(q_s, k_s, v_s, jnp.asarray(idx_s), jnp.asarray(cnt_s),
                                           block_q=spec.block, block_kv=spec.block)
    return np.asarray(out, np.float32)


def rel_l2(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _slice_bshd(out, rows, heads) -> np.ndarray:
    return np.asarray(jnp.take(jnp.take(out, jnp.asarray(rows), axis=1), jnp.asarray(heads), axis=2), np.float32)


def our_rows(spec, q, k, v, indices, counts, ref, plan, *, precisions, repeats, dense_rate,
             pv_bf16: bool = False) -> list[Row]:
    """jaxvid's kernel at bf16 and each 8-bit precision on the tables; time and error vs `ref`.
    pv_bf16 adds each 8-bit precision with the bf16 P.V (the Mosaic fp8 kernel's fallback; GPU only)."""
    from pallas_kernels.api import block_sparse_attention

    density = float(np.mean(counts)) / (spec.padded_seq // spec.block)
    blocks, rows, heads = plan
    variants = [("bf16", None), *((p, None) for p in precisions), *((p, "bf16") for p in precisions if pv_bf16)]
    out_rows = []
    for precision, pv in variants:
        impl = f"jaxvid-{precision}" + ("" if pv is None else "/pv-bf16")
        if pv is None:
            fn = jax.jit(lambda q, k, v, i, c, p=precision: block_sparse_attention(
                q, k, v, i, c, block_q=spec.block, block_kv=spec.block, precision=p))
        else:
            from pallas_kernels.block_sparse_mgpu_fp8 import block_sparse_attention_mgpu_fp8

            fn = jax.jit(lambda q, k, v, i, c, p=precision, pv=pv: block_sparse_attention_mgpu_fp8(
                q, k, v, i, c, block_q=spec.block, block_kv=spec.block, precision=p, pv=pv))
        i_j, c_j = jnp.asarray(indices), jnp.asarray(counts)
        try:
            ms = median_ms(fn, q, k, v, i_j, c_j, repeats=repeats)
            err = rel_l2(_slice_bshd(fn(q, k, v, i_j, c_j), rows, heads), ref)
            n = spec.padded_seq // spec.block
            note = f"{int(np.max(counts))} of {n} key blocks per row" if precision == "bf16" else ""
            out_rows.append(_timed_row(spec, impl, ms, density, dense_rate, err, note))
        except Exception as exc:  # report and go on: the table must print
            log.exception("%s %s failed", spec.name, impl)
            out_rows.append(_failed_row(spec, impl, exc))
        log.info("%s", _brief(out_rows[-1]))
    return out_rows


def cudnn_rows(spec, q, k, v, tables: CudnnTables, ref, plan, *, repeats, dense_rate, kv_splits) -> list[Row]:
    """cuDNN BSA bf16 and Sage FP8 on the same lists (torch tensors [B, H, S, D] made from q, k, v)."""
    import torch

    out_rows = _cudnn_rows(spec, q, k, v, tables, ref, plan, repeats=repeats, dense_rate=dense_rate,
                           kv_splits=kv_splits)
    torch.cuda.empty_cache()  # the BHSD copies are gone: give their memory back before JAX's next case
    return out_rows


def _to_torch_bhsd(x):
    """A JAX bf16 [B, S, H, D] array as a contiguous torch CUDA tensor [B, H, S, D] (same values):
    through DLPack, or through host memory should this jax/torch pair not exchange DLPack."""
    import torch

    jax.block_until_ready(x)
    try:
        t = torch.from_dlpack(x)
    except Exception as exc:  # noqa: BLE001  (any failure: take the slow, sure path)
        log.warning("DLPack jax -> torch failed (%s); copying through host memory", exc)
        t = torch.from_numpy(np.asarray(x).view(np.uint16).copy()).view(torch.bfloat16).cuda()
    return t.permute(0, 2, 1, 3).contiguous()


def peer_versions() -> str:
    """cuDNN frontend / CUTLASS DSL / torch versions, or why they do not import."""
    try:
        import cudnn
        import cutlass
        import torch

        return f"cudnn-frontend {cudnn.__version__}, cutlass-dsl {cutlass.__version__}, torch {torch.__version__}"
    except Exception as exc:  # noqa: BLE001
        return f"cuDNN frontend not importable: {type(exc).__name__}: {exc}"


CUDNN_IMPLS = ("cudnn-bsa-bf16", "cudnn-bsa-sage-fp8")


def _cudnn_rows(spec, q, k, v, tables, ref, plan, *, repeats, dense_rate, kv_splits) -> list[Row]:
    import torch

    try:  # a missing or broken cuDNN frontend fails its rows, not the run
        from cudnn import BSA

        q_t, k_t, v_t = (_to_torch_bhsd(x) for x in (q, k, v))
        idx_t = torch.from_numpy(tables.idx).to(q_t.device)
    except Exception as exc:
        log.exception("%s: cuDNN BSA unavailable", spec.name)
        return [_failed_row(spec, impl, exc) for impl in CUDNN_IMPLS]
    _, rows, heads = plan
    density = tables.k_per_row / (spec.padded_seq // spec.block)
    calls = dict(zip(CUDNN_IMPLS, (
        lambda: BSA.block_sparse_attention_forward(
            q_t, k_t, v_t, idx_t, tables.k_per_row, sparse_block_size=spec.block, kv_splits=kv_splits)["o_tensor"],
        lambda: BSA.block_sparse_attention_fp8_forward(
            q_t, k_t, v_t, idx_t, tables.k_per_row, sparse_block_size=spec.block)["o_tensor"],
    )))
    out_rows = []
    for impl, call in calls.items():
        try:
            check_cudnn_args(tuple(q_t.shape), tables, spec.block, sage="fp8" in impl)
            start = time.perf_counter()
            out = call()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            ms = median_ms(call, repeats=repeats, sync=lambda _: torch.cuda.synchronize())
            got = out[:, torch.as_tensor(heads, device=out.device)][:, :, torch.as_tensor(rows, device=out.device)]
            err = rel_l2(got.permute(0, 2, 1, 3).float().cpu().numpy(), ref)
            note = f"first call {first_s:.2f} s" + (f", kv_splits={kv_splits}" if "bf16" in impl else "")
            out_rows.append(_timed_row(spec, impl, ms, density, dense_rate, err, note))
        except Exception as exc:
            log.exception("%s %s failed", spec.name, impl)
            out_rows.append(_failed_row(spec, impl, exc))
        log.info("%s", _brief(out_rows[-1]))
    return out_rows


def _brief(r: Row) -> str:
    return f"{r.case} {r.impl}: {r.ms:.2f} ms, rel L2 vs fp32 {r.rel_l2_fp32}, {r.note}"


def _timed_row(spec, impl, ms, density, dense_rate, err, note="") -> Row:
    rate = flops(spec, density) / ms / 1e9
    return Row(spec.name, impl, ms, rate, None if dense_rate is None else rate / dense_rate, err, note)


def _failed_row(spec, impl, exc) -> Row:
    return Row(spec.name, impl, float("nan"), 0.0, None, None,
               f"FAILED {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")


def case_tables(spec: AttentionSpec, seed: int):
    """(our kv_indices, kv_counts, cuDNN tables) for `spec`: one random block mask, both layouts."""
    from pallas_kernels.reference import block_mask_to_indices

    n = spec.padded_seq // spec.block
    mask = random_block_mask(spec.batch, spec.heads, n, row_count(spec.sparsity, n), seed)
    indices, counts = block_mask_to_indices(mask)
    return indices, counts, to_cudnn_tables(indices, counts, batch=spec.batch, heads=spec.heads)


def run(specs, *, precisions, repeats, ref_blocks, with_cudnn, kv_splits, seed=0, pv_bf16=False) -> list[Row]:
    """Every row of every spec; cuDNN dense is timed once (all specs share B, S, H, D)."""
    rows: list[Row] = []
    dense_rate = None
    for n, spec in enumerate(specs):
        log.info("case %s", spec.name)
        q, k, v = make_qkv(spec, seed)
        if n == 0:
            dense = AttentionSpec(name="cudnn-dense", batch=spec.batch, seq=spec.seq, heads=spec.heads,
                                  head_dim=spec.head_dim, block=spec.block, pattern="dense")
            try:
                dense_ms = cudnn_dense_ms(q, k, v, repeats=repeats)
                dense_rate = flops(dense, 1.0) / dense_ms / 1e9
                rows.append(Row(dense.name, "cudnn-dense", dense_ms, dense_rate, 1.0, None))
            except Exception as exc:  # CPU: there is no cuDNN; the sparse rows still print
                rows.append(_failed_row(dense, "cudnn-dense", exc))
        indices, counts, tables = case_tables(spec, seed)
        plan = slice_plan(spec, ref_blocks)
        ref = fp32_reference_slice(q, k, v, indices, counts, spec, *plan)
        rows += our_rows(spec, q, k, v, indices, counts, ref, plan, precisions=precisions, repeats=repeats,
                         dense_rate=dense_rate, pv_bf16=pv_bf16)
        if with_cudnn:
            rows += cudnn_rows(spec, q, k, v, tables, ref, plan, repeats=repeats, dense_rate=dense_rate,
                               kv_splits=kv_splits)
        else:  # --smoke: check cuDNN's arguments and its reading of the lists, call nothing
            rows.append(_smoke_cudnn_row(spec, q, k, v, tables, indices, counts))
        del q, k, v
    return rows


def _smoke_cudnn_row(spec, q, k, v, tables, indices, counts) -> Row:
    """CPU stand-in for the cuDNN rows: validate the call's arguments, and compare attention as
    cuDNN defines it on its tables with our fp32 reference on our tables (tiny shapes only)."""
    from pallas_kernels.reference import block_sparse_attention_reference, indices_to_block_mask

    bhsd = tuple(np.transpose(np.asarray(x, np.float32), (0, 2, 1, 3)) for x in (q, k, v))
    for sage in (False, True):
        check_cudnn_args(bhsd[0].shape, tables, spec.block, sage=sage)
    n = spec.padded_seq // spec.block
    same_mask = np.array_equal(cudnn_tables_to_block_mask(tables, n), indices_to_block_mask(indices, counts, n))
    ours = block_sparse_attention_reference(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(indices),
                                            jnp.asarray(counts), block_q=spec.block, block_kv=spec.block)
    theirs = np.transpose(cudnn_semantics_reference(*bhsd, tables, spec.block), (0, 2, 1, 3))
    err = rel_l2(theirs, np.asarray(ours))
    if not same_mask or err > 1e-5:
        raise AssertionError(f"{spec.name}: cuDNN tables differ from ours (same mask {same_mask}, rel L2 {err:.1e})")
    return Row(spec.name, "cudnn-args", float("nan"), 0.0, None, None,
               f"smoke: args valid, same block mask, cuDNN-semantics attention vs ours rel L2 {err:.1e}")


def format_table(rows: list[Row], device: str) -> str:
    lines = [f"device: {device}, jax {jax.__version__}",
             f"| {'case':<34} | {'impl':<18} | {'ms':>8} | {'TFLOP/s':>7} | {'vs cuDNN dense':>14} | "
             f"{'rel L2 vs fp32':>14} | note",
             "|" + "-" * 36 + "|" + "-" * 20 + "|" + "-" * 10 + "|" + "-" * 9 + "|" + "-" * 16 + "|" + "-" * 16 + "|---"]
    for r in rows:
        ratio = "" if r.vs_dense_rate is None else f"{r.vs_dense_rate:.2f}"
        err = "" if r.rel_l2_fp32 is None else f"{r.rel_l2_fp32:.4f}"
        lines.append(f"| {r.case:<34} | {r.impl:<18} | {r.ms:8.2f} | {r.tflops:7.0f} | {ratio:>14} | {err:>14} | {r.note}")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    """Whole or not at all: write a temp file beside `path`, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", nargs="*", type=int, default=[64, 128], choices=sorted(CHUNKS))
    parser.add_argument("--sparsities", nargs="*", type=float, default=None,
                        help="default 0.9375 0.875 (--smoke: 0.75 0.5, which keep >= 1 block of its 4 or 8)")
    parser.add_argument("--precisions", nargs="*", default=list(OUR_PRECISIONS), choices=OUR_PRECISIONS,
                        help="our 8-bit rows beside the bf16 kernel")
    parser.add_argument("--pv-bf16", action="store_true",
                        help="also our 8-bit kernels with a bf16 P.V (GPU only; ignored by --smoke)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ref-blocks", type=int, default=16, help="query blocks (x 2 heads) of the fp32 reference")
    parser.add_argument("--kv-splits", default="1", help="cuDNN bf16 SM90 kv_splits: an int or 'auto' (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: tiny shapes, our kernel + reference, cuDNN arguments validated, not called")
    args = parser.parse_args(argv)
    # JAX and torch share the GPU: JAX must not take 75% of it up front (read when JAX's backend starts).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.repeats < 1 or args.ref_blocks < 1:
        parser.error(f"--repeats={args.repeats}, --ref-blocks={args.ref_blocks}; expected >= 1")
    kv_splits = args.kv_splits if args.kv_splits == "auto" else int(args.kv_splits)
    sparsities = args.sparsities or ([0.75, 0.5] if args.smoke else [0.9375, 0.875])
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            parser.error(f"--sparsities: {s}; expected values in [0, 1)")
    if args.smoke:  # 512 tokens: 8 blocks of 64, 4 of 128
        specs = [peer_spec(b, s, latent=(4, 8, 16), heads=2) for b in args.blocks for s in sparsities]
        repeats = 1
    else:
        specs = [peer_spec(b, s) for b in args.blocks for s in sparsities]
        repeats = args.repeats
    device = jax.devices()[0].device_kind
    if not args.smoke:
        device += f"; {peer_versions()}"
    rows = run(specs, precisions=tuple(args.precisions), repeats=repeats, ref_blocks=args.ref_blocks,
               with_cudnn=not args.smoke, kv_splits=kv_splits, seed=args.seed, pv_bf16=args.pv_bf16 and not args.smoke)
    print(format_table(rows, device))
    if args.json:
        write_json(args.json, {"device": device, "jax": jax.__version__, "smoke": args.smoke,
                               "rows": [dataclasses.asdict(r) for r in rows]})
    failed = [r for r in rows if r.note.startswith("FAILED") and r.impl != "cudnn-dense"]
    return 1 if failed and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
