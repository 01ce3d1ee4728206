"""Exact per-row top-k column selection, the gating step of block sparse attention (BSA).

    topk_sorted_columns(scores, k, *, implementation=None) -> int32 [..., rows, k]

Each row of `scores` keeps the columns of its k largest values, returned in ascending column
order: exactly the set `lax.top_k` picks (ties go to the lower column), then sorted. On GPUs
`lax.top_k` + sort costs ~3.4 ms for LongCat 720p (42240 rows of 1320 chunk scores), more than
half of a 0.9375-sparse attention budget. The Pallas kernel here finds each row's k-th largest
value on chip instead, by bisection on the bits of an order-preserving int32 key (32 counting
passes over registers, no sort), then writes the chosen columns in place with a prefix sum.

Implementations: "triton" (Pallas on the Triton backend: any CUDA GPU), "interpret" (the same
kernel run by the Pallas interpreter; for CPU tests), "reference" (lax.top_k + sort, any backend).
None picks "triton" on CUDA GPUs and "reference" elsewhere.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["TOPK_IMPLEMENTATIONS", "topk_sorted_columns", "topk_sorted_columns_reference"]

TOPK_IMPLEMENTATIONS = ("triton", "interpret", "reference")
# Rows x padded columns per program and warps per program: the fastest pair of
# `bench/bsa_select.py --sweep` on an H100 (LongCat 720p, 0.9375: 0.87 ms at 4x4x4, 0.32 at 4x4x8).
_ELEMENTS_PER_PROGRAM = 4096
_NUM_WARPS = 2
_MAX_COLUMNS = 16384
_INT32_MIN = -(2 ** 31)


def topk_sorted_columns_reference(scores: jax.Array, k: int) -> jax.Array:
    """lax.top_k + sort: the definition the kernel must match. scores [..., n] -> [..., k]."""
    _, top = lax.top_k(scores, k)
    return jnp.sort(top, axis=-1).astype(jnp.int32)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> int32 whose signed order is the float order (-0.0 and +0.0 are one value)."""
    bits = lax.bitcast_convert_type(x + jnp.float32(0.0), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _topk_kernel(scores_ref, out_ref, *, k: int, n_cols: int):
    """One program: rows_per_program rows. scores_ref [R, Np] f32 -> out_ref [R, Kp] int32, Kp > k."""
    from jax.experimental.pallas import triton as pltriton

    scores = scores_ref[...]
    col = lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    key = jnp.where(col < n_cols, _order_key(scores), jnp.int32(_INT32_MIN))
    rows = scores.shape[0]

    # The k-th largest key is the largest t with count(key >= t) >= k. Build t's bits from the
    # top in the unsigned image u = t ^ INT32_MIN (where signed order becomes bit order).
    def bisect(i, ans_u):
        cand_u = ans_u | lax.shift_left(jnp.int32(1), jnp.int32(31) - i)
        count = jnp.sum((key >= (cand_u ^ jnp.int32(_INT32_MIN))[:, None]).astype(jnp.int32), axis=1)
        return jnp.where(count >= k, cand_u, ans_u)

    kth = lax.fori_loop(0, 32, bisect, jnp.zeros((rows,), jnp.int32)) ^ jnp.int32(_INT32_MIN)
    above = key > kth[:, None]
    tied = key == kth[:, None]
    # Ties at the k-th value: the lowest columns first, as lax.top_k.
    room = k - jnp.sum(above.astype(jnp.int32), axis=1)
    chosen = above | (tied & (jnp.cumsum(tied.astype(jnp.int32), axis=1) <= room[:, None]))
    slot = jnp.cumsum(chosen.astype(jnp.int32), axis=1) - 1
    # Unchosen columns aim at the spare last slot: the interpreter's masked scatter still writes
    # (the old value) there, and must not clobber a chosen column's slot.
    slot = jnp.where(chosen, slot, out_ref.shape[1] - 1)
    row = lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    pltriton.store(out_ref.at[row, slot], col, mask=chosen)


def _has_pallas_triton() -> bool:
    # JAX has deprecated Pallas' Triton backend; once it is gone, fall back to lax.top_k.
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve(implementation: str | None) -> str:
    if implementation is None:
        return "triton" if jax.devices()[0].platform == "gpu" and _has_pallas_triton() else "reference"
    if implementation not in TOPK_IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; expected None or one of "
                         f"{TOPK_IMPLEMENTATIONS}")
    if implementation == "triton" and jax.devices()[0].platform != "gpu":
        raise ValueError("implementation='triton' needs a CUDA GPU; use None, 'interpret' or "
                         "'reference'")
    return implementation


def topk_sorted_columns(scores: jax.Array, k: int, *, implementation: str | None = None) -> jax.Array:
    """The k highest-scoring columns of every row, ascending. scores [..., rows, n] float32.

    Returns int32 [..., rows, k]: for each row the set lax.top_k(scores, k) picks (equal scores:
    lower columns first), sorted ascending. NaN scores are not supported. Rows wider than
    16384 columns use the reference.
    """
    if scores.ndim < 2:
        raise ValueError(f"topk_sorted_columns: scores.shape={scores.shape}; expected [..., rows, n]")
    n = scores.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"topk_sorted_columns: k={k!r}; expected an int in [1, {n}]")
    impl = _resolve(implementation)
    if impl == "reference" or _next_pow2(n) > _MAX_COLUMNS:
        return topk_sorted_columns_reference(scores, k)
    return _topk_pallas(scores.astype(jnp.float32), k=k, interpret=impl == "interpret")


@functools.partial(jax.jit, static_argnames=("k", "interpret", "elements_per_program", "num_warps"))
def _topk_pallas(scores, *, k: int, interpret: bool, elements_per_program: int = _ELEMENTS_PER_PROGRAM,
                 num_warps: int = _NUM_WARPS):
    from jax.experimental import pallas as pl

    lead, (rows, n) = scores.shape[:-2], scores.shape[-2:]
    groups = 1
    for d in lead:
        groups *= d
    n_pad, k_pad = _next_pow2(n), _next_pow2(k + 1)  # + a spare slot, see the kernel
    rows_per_program = max(1, elements_per_program // n_pad)
    rows_pad = -(-rows // rows_per_program) * rows_per_program
    # Triton blocks are powers of two and must lie inside the array: pad, then mask in-kernel.
    flat = jnp.pad(scores.reshape(groups, rows, n), ((0, 0), (0, rows_pad - rows), (0, n_pad - n)))
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton
        extra["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    out = pl.pallas_call(
        functools.partial(_topk_kernel, k=k, n_cols=n),
        out_shape=jax.ShapeDtypeStruct((groups, rows_pad, k_pad), jnp.int32),
        grid=(groups, rows_pad // rows_per_program),
        in_specs=[pl.BlockSpec((None, rows_per_program, n_pad), lambda g, r: (g, r, 0))],
        out_specs=pl.BlockSpec((None, rows_per_program, k_pad), lambda g, r: (g, r, 0)),
        interpret=interpret,
        **extra,
    )(flat)
    return out[:, :rows, :k].reshape(lead + (rows, k))
