"""8-bit (Sage-style) block-sparse attention: the quantization step and its jnp reference.

Precisions (`PRECISIONS`):

- "bf16": no quantization (the kernels as they are).
- "fp8": Q and K in float8 e4m3 with one scale per (batch, block of tokens, head); V in e4m3 with
  one scale per (batch, head, channel); P = exp(S - rowmax) in e4m3 with a per-row scale.
- "int8-fp8": Q and K in int8 (round to nearest, one scale per block as above), S = Q K^T exact in
  int32; P and V as in "fp8".

K is smoothed first: its mean over the (valid) sequence is subtracted per (batch, head, channel).
That adds the same q . mean(k) to every logit of a query row, which softmax ignores, but it
removes the channel offsets real DiT keys carry (a few channels 10-50x the rest), so the per-block
scale is set by the keys' spread, not by the offset. Accumulation is float32 throughout; the output
is in q's dtype (bf16 for the kernel).

Rounding to e4m3 is explicit arithmetic (`round_to_e4m3`: f32 in, f32 on the e4m3 grid out), never
a float -> float8 -> float convert pair: XLA's GPU compiler drops such a pair as "excess precision"
(its SimplifyFPConversions pass removes any chain of float converts while xla_allow_excess_precision
is on, the default), so a reference that dequantizes by `x.astype(float8).astype(float32)` silently
computes with unrounded values on the GPU while the kernel reads real e4m3 bytes. With the rounding
done in f32 first, the cast to float8 is exact and removing it changes nothing.

The per-row scale of P: every row of P = exp(S - m) has its largest entry at exp(0) = 1, so the
row's scale max_j P_rj / 448 is 1 / 448; the kernels use it as a constant (P * 448 -> e4m3, the
1/448 folded into the epilogue with the V scales), which is what the reference does too.

`quantize_qkv` is the layout step (pure jnp, fused by XLA with the permutation or padding around
it); `quantized_attention_reference` materialises the token mask and computes in float32 from the
dequantized tensors: the ground truth of the 8-bit kernels, O(Sq x Sk) memory (small shapes).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.reference import check_block_sparse_args, indices_to_block_mask

__all__ = [
    "PRECISIONS", "P_SCALE", "QuantizedQKV", "check_precision", "quantize_qkv", "quantized_attention_online",
    "quantized_attention_reference", "round_to_e4m3",
    "smooth_keys",
]

PRECISIONS = ("bf16", "fp8", "int8-fp8")
FP8 = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(FP8).max)  # 448
INT8_MAX = 127.0
P_SCALE = E4M3_MAX  # P in [0, 1] is stored as e4m3(P * 448)
_TINY = float(jnp.finfo(jnp.float32).tiny)


def check_precision(precision: str, name: str = "precision") -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"{name}={precision!r}; expected one of {PRECISIONS}")
    return precision


class QuantizedQKV(NamedTuple):
    """8-bit Q, K, V and their float32 scales (dequantized x = x8 * scale, broadcast as below).

    q8 [B, Sq, H, D], q_scale [B, Sq/block_q, H]; k8 [B, Sk, H, D] (smoothed), k_scale
    [B, Sk/block_kv, H]; v8 [B, Sk, H, D] e4m3, v_scale [B, H, D].
    """

    q8: jax.Array
    q_scale: jax.Array
    k8: jax.Array
    k_scale: jax.Array
    v8: jax.Array
    v_scale: jax.Array


# e4m3fn: 3 mantissa bits, smallest normal exponent -6 (below it the grid is the subnormal step 2^-9)
_E4M3_MANTISSA_BITS = 3
_E4M3_MIN_EXP = -6


def round_to_e4m3(x: jax.Array) -> jax.Array:
    """x (float32) rounded to the nearest float8_e4m3fn value (ties to even), saturating at +-448; f32 out.

    The same values as a float32 -> float8_e4m3fn cast with round-to-nearest-even and satfinite (the
    PTX `cvt.rn.satfinite.e4m3x2.f32` Mosaic GPU emits, and ml_dtypes' cast for |x| <= 448), done as
    exact f32 arithmetic: divide by the power-of-two spacing of x's binade, round half to even,
    multiply back. No compiler may drop it (see the module docstring), and casting the result to
    float8 is exact. NaN stays NaN.
    """
    x = jnp.clip(jnp.asarray(x, jnp.float32), -E4M3_MAX, E4M3_MAX)
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    exponent = ((bits >> 23) & 0xFF) - 127  # the binade of |x| (-127 for zero and f32 subnormals)
    spacing_exp = jnp.maximum(exponent, _E4M3_MIN_EXP) - _E4M3_MANTISSA_BITS  # in [-9, 5]
    spacing = jax.lax.bitcast_convert_type((spacing_exp + 127) << 23, jnp.float32)  # 2**spacing_exp, exact
    return jnp.round(x / spacing) * spacing  # x / 2**n and * 2**n are exact; jnp.round is half-to-even


def smooth_keys(k: jax.Array, kv_len: int | jax.Array | None = None) -> jax.Array:
    """k [B, S, H, D] minus its mean over the first kv_len positions (per batch, head, channel), f32."""
    kf = k.astype(jnp.float32)
    seq = k.shape[1]
    if kv_len is None:
        return kf - jnp.mean(kf, axis=1, keepdims=True)
    valid = (jnp.arange(seq) < kv_len)[None, :, None, None]
    count = jnp.maximum(jnp.asarray(kv_len, jnp.float32), 1.0)
    mean = jnp.sum(jnp.where(valid, kf, 0.0), axis=1, keepdims=True) / count
    return jnp.where(valid, kf - mean, 0.0)  # padded keys: zeros (they get no weight anyway)


def _quantize_blocks(x: jax.Array, block: int, integer: bool) -> tuple[jax.Array, jax.Array]:
    """x [B, S, H, D] f32 -> (8-bit [B, S, H, D], scale [B, S/block, H]); one scale per token block."""
    b, s, h, d = x.shape
    xb = x.reshape(b, s // block, block, h, d)
    amax = jnp.max(jnp.abs(xb), axis=(2, 4))  # [B, nb, H]
    limit = INT8_MAX if integer else E4M3_MAX
    scale = jnp.maximum(amax / limit, _TINY)
    y = xb / scale[:, :, None, :, None]
    if integer:
        q = jnp.clip(jnp.round(y), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    else:
        q = round_to_e4m3(y).astype(FP8)  # exact cast: see the module docstring
    return q.reshape(b, s, h, d), scale


def quantize_qkv(q: jax.Array, k: jax.Array, v: jax.Array, *, precision: str, block_q: int, block_kv: int,
                 kv_len: int | jax.Array | None = None, smooth: bool = True) -> QuantizedQKV:
    """The 8-bit layout step. q [B, Sq, H, D], k/v [B, Sk, H, D]; Sq % block_q == Sk % block_kv == 0.

    `smooth=False` skips K smoothing (only to measure what it buys). Padded keys (>= kv_len) are
    zeroed in K and V before the scales are taken, so padding never sets a scale.
    """
    check_precision(precision)
    if precision == "bf16":
        raise ValueError("quantize_qkv: precision='bf16' has nothing to quantize")
    if q.shape[1] % block_q or k.shape[1] % block_kv:
        raise ValueError(f"quantize_qkv: lengths {q.shape[1]}, {k.shape[1]} are not multiples of "
                         f"block_q={block_q}, block_kv={block_kv}")
    integer = precision == "int8-fp8"
    kf = smooth_keys(k, kv_len) if smooth else k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    if kv_len is not None:
        valid = (jnp.arange(k.shape[1]) < kv_len)[None, :, None, None]
        kf, vf = jnp.where(valid, kf, 0.0), jnp.where(valid, vf, 0.0)
    q8, q_scale = _quantize_blocks(q.astype(jnp.float32), block_q, integer)
    k8, k_scale = _quantize_blocks(kf, block_kv, integer)
    v_scale = jnp.maximum(jnp.max(jnp.abs(vf), axis=1) / E4M3_MAX, _TINY)  # [B, H, D]
    v8 = round_to_e4m3(vf / v_scale[:, None]).astype(FP8)
    return QuantizedQKV(q8, q_scale, k8, k_scale, v8, v_scale)


def _dequantize(x8: jax.Array, scale: jax.Array, block: int) -> jax.Array:
    return x8.astype(jnp.float32) * jnp.repeat(scale, block, axis=1)[..., None]


def quantized_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_indices: jax.Array,
    kv_counts: jax.Array,
    *,
    block_q: int,
    block_kv: int,
    precision: str,
    scale: float | None = None,
    kv_len: int | jax.Array | None = None,
    smooth: bool = True,
    pv_precision: str = "fp8",
) -> jax.Array:
    """Block-sparse attention computed from the 8-bit tensors, by the contract of
    `pallas_kernels.reference.block_sparse_attention_reference` (tables, kv_len, empty rows -> 0).

    S = dequant(Q8) dequant(K8)^T (exact products, f32 sums), softmax in f32 with P rounded to
    e4m3(P * 448) / 448 in the numerator (the denominator sums the unrounded P, as the kernels
    do), then P V with V dequantized per channel. Returns [B, Sq, H, D] in q's dtype.

    pv_precision="bf16": the kernels' fallback where an fp8 P.V is not available (P rounded to
    bf16, V as given); only Q.K^T is 8-bit then.
    """
    if pv_precision not in ("fp8", "bf16"):
        raise ValueError(f"pv_precision={pv_precision!r}; expected 'fp8' or 'bf16'")
    check_block_sparse_args(q, k, v, kv_indices, kv_counts, block_q, block_kv)
    check_precision(precision)
    if precision == "bf16":
        from pallas_kernels.reference import block_sparse_attention_reference

        return block_sparse_attention_reference(q, k, v, kv_indices, kv_counts, block_q=block_q,
                                                block_kv=block_kv, scale=scale, kv_len=kv_len)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if kv_len is None:
        kv_len = k.shape[1]
    return _reference(q, k, v, jnp.asarray(kv_indices, jnp.int32), jnp.asarray(kv_counts, jnp.int32),
                      jnp.asarray(kv_len, jnp.int32), block_q=block_q, block_kv=block_kv, scale=float(scale),
                      precision=precision, smooth=smooth, pv_precision=pv_precision)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale", "precision", "smooth", "pv_precision"))
def _reference(q, k, v, kv_indices, kv_counts, kv_len, *, block_q, block_kv, scale, precision, smooth,
               pv_precision):
    qq = quantize_qkv(q, k, v, precision=precision, block_q=block_q, block_kv=block_kv, kv_len=kv_len,
                      smooth=smooth)
    qf = _dequantize(qq.q8, qq.q_scale, block_q)
    kf = _dequantize(qq.k8, qq.k_scale, block_kv)
    vf = qq.v8.astype(jnp.float32) * qq.v_scale[:, None]
    n_k = k.shape[1] // block_kv
    block_mask = indices_to_block_mask(kv_indices, kv_counts, n_k)
    token_mask = jnp.repeat(jnp.repeat(block_mask, block_q, axis=-2), block_kv, axis=-1)
    token_mask = token_mask & (jnp.arange(k.shape[1]) < kv_len)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
    logits = jnp.where(token_mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(token_mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if pv_precision == "fp8":
        p8 = round_to_e4m3(p * P_SCALE) / P_SCALE
    else:
        p8 = p.astype(jnp.bfloat16).astype(jnp.float32)
        vf = jnp.where((jnp.arange(k.shape[1]) < kv_len)[None, :, None, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p8, vf, precision=jax.lax.Precision.HIGHEST)
    out = out / jnp.moveaxis(jnp.where(denom > 0, denom, 1.0), 1, 2)
    return out.astype(q.dtype)


def quantized_attention_online(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_indices: jax.Array,
    kv_counts: jax.Array,
    *,
    block_q: int,
    block_kv: int,
    precision: str,
    scale: float | None = None,
    kv_len: int | jax.Array | None = None,
    pv_precision: str = "fp8",
) -> jax.Array:
    """The 8-bit kernels' arithmetic step by step, in jnp: what a GPU test compares them with.

    Same quantization as `quantized_attention_reference`, but P is rounded the way an online
    softmax kernel rounds it: per listed key block, in list order, against the running row max
    (exp2 domain), the accumulator rescaled as the max grows; the output is acc / (l * 448) in
    bf16, times the V scales (pv_precision "fp8"), or acc / l in bf16 ("bf16" P.V). Differs from
    `quantized_attention_reference` only by where P's e4m3 roundings fall (both are faithful).
    """
    check_block_sparse_args(q, k, v, kv_indices, kv_counts, block_q, block_kv)
    check_precision(precision)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if kv_len is None:
        kv_len = k.shape[1]
    return _online(q, k, v, jnp.asarray(kv_indices, jnp.int32), jnp.asarray(kv_counts, jnp.int32),
                   jnp.asarray(kv_len, jnp.int32), block_q=block_q, block_kv=block_kv, scale=float(scale),
                   precision=precision, pv_precision=pv_precision)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "scale", "precision", "pv_precision"))
def _online(q, k, v, kv_indices, kv_counts, kv_len, *, block_q, block_kv, scale, precision, pv_precision):
    b, sq, h, d = q.shape
    nq, nk = sq // block_q, k.shape[1] // block_kv
    qq = quantize_qkv(q, k, v, precision=precision, block_q=block_q, block_kv=block_kv, kv_len=kv_len)

    def blocks(x, n, blk):  # [B, S, H, D] -> [B, H, n, blk, D] f32
        return jnp.moveaxis(x.astype(jnp.float32).reshape(b, n, blk, h, d), 3, 1)

    q8, k8 = blocks(qq.q8, nq, block_q), blocks(qq.k8, nk, block_kv)
    if pv_precision == "fp8":
        vb = blocks(qq.v8, nk, block_kv)
    else:
        vb = blocks(v.astype(jnp.bfloat16), nk, block_kv)
    qs = jnp.moveaxis(qq.q_scale, 2, 1)  # [B, H, nq]
    ks = jnp.moveaxis(qq.k_scale, 2, 1)  # [B, H, nk]
    idx = jnp.broadcast_to(kv_indices, (b, h, nq, kv_indices.shape[-1]))
    cnt = jnp.broadcast_to(kv_counts, (b, h, nq))
    c_q = qs * (scale * math.log2(math.e))

    def step(carry, j):
        acc, m, denom = carry
        blk = idx[..., j]  # [B, H, nq]
        active = (j < cnt)[..., None]  # [B, H, nq, 1]
        kb = jnp.take_along_axis(k8, blk[..., None, None], axis=2)
        s = jnp.einsum("bhnqd,bhnkd->bhnqk", q8, kb, precision=jax.lax.Precision.HIGHEST)
        c = (c_q * jnp.take_along_axis(ks, blk, axis=2))[..., None, None]
        keep = ((blk[..., None] * block_kv + jnp.arange(block_kv)) < kv_len)[..., None, :]
        s = jnp.where(keep, s, -1e30)
        m_new = jnp.where(active, jnp.maximum(m, jnp.max(s, axis=-1) * c[..., 0]), m)
        alpha = jnp.where(active, jnp.exp2(m - m_new), 1.0)
        p = jnp.where(keep & active[..., None], jnp.exp2(s * c - m_new[..., None]), 0.0)
        denom = denom * alpha + jnp.sum(p, axis=-1)
        if pv_precision == "fp8":
            p_op = round_to_e4m3(p * P_SCALE)  # what the kernel's cvt.rn.satfinite gives
        else:
            p_op = p.astype(jnp.bfloat16).astype(jnp.float32)
        vblk = jnp.take_along_axis(vb, blk[..., None, None], axis=2)
        acc = acc * alpha[..., None] + jnp.einsum("bhnqk,bhnkd->bhnqd", p_op, vblk,
                                                  precision=jax.lax.Precision.HIGHEST)
        return (acc, m_new, denom), None

    init = (jnp.zeros((b, h, nq, block_q, d), jnp.float32), jnp.full((b, h, nq, block_q), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, nq, block_q), jnp.float32))
    (acc, _, denom), _ = jax.lax.scan(step, init, jnp.arange(kv_indices.shape[-1]))
    unit = P_SCALE if pv_precision == "fp8" else 1.0
    out = (acc / (denom * unit + _TINY)[..., None]).astype(jnp.bfloat16).astype(jnp.float32)
    out = jnp.moveaxis(out, 1, 3).reshape(b, sq, h, d)
    if pv_precision == "fp8":
        out = out * qq.v_scale[:, None]
    return out.astype(q.dtype)
