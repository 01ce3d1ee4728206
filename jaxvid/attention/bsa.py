"""Block sparse attention (BSA) of LongCat-Video: 3D chunks, mean-pooled gating, dynamic selection.

Reimplements `flash_attn_bsa_3d` of meituan-longcat/LongCat-Video
(`longcat_video/block_sparse_attention/bsa_interface.py`):

1. tokens in (T, H, W) raster order are permuted so each 3D chunk (t, h, w) is contiguous,
   chunks in (t_chunk, h_chunk, w_chunk) raster order (`rearrange_THW_to_3d_block`);
2. Q and K are mean-pooled per chunk (`mean_pooling_compression`) and scored: q_cmp . k_cmp;
3. each query chunk keeps key chunks (`get_select_indices`):
   - top-k: the int((1 - sparsity) * n_k_chunks) highest scores;
   - CDF: softmax(score / sqrt(D)) sorted descending, the longest prefix whose cumulative sum
     stays <= cdf_threshold (searchsorted right=True; may be 0 chunks);
   - both: the CDF prefix, but at least the top-k count;
4. block-sparse softmax attention over the kept chunks (block size = chunk size), scale 1/sqrt(D);
5. the output is permuted back to (T, H, W) order.

Selection runs on device every call (jit-able): gating in fp32 whatever the input dtype, static
table shapes (max_blocks = the top-k count, or n_k_chunks when a CDF is involved). Pooling reads
(T, H, W) order directly; top-k on GPUs is a Pallas kernel that picks exactly lax.top_k's set
(`pallas_kernels.topk_columns`), ~10x cheaper than lax.top_k + sort at LongCat 720p.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.api import block_sparse_attention
from pallas_kernels.topk_columns import topk_sorted_columns

__all__ = ["bsa_attention", "select_blocks", "to_chunk_order", "from_chunk_order", "pool_chunks",
           "topk_count"]


def _check_shape3(name: str, value) -> tuple[int, int, int]:
    try:
        dims = tuple(int(x) for x in value)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 3 or any(d < 1 for d in dims) or any(int(x) != x for x in value):
        raise ValueError(f"{name}={value!r}; expected three positive ints (T, H, W)")
    return dims


def topk_count(sparsity: float, n_k_chunks: int) -> int:
    """Upstream's top-k count: int((1 - sparsity) * n_k_chunks)."""
    return int((1 - sparsity) * n_k_chunks)


def _validate(q, k, latent_shape_q, latent_shape_k, sparsity, cdf_threshold, chunk_3d_shape_q,
              chunk_3d_shape_k, v=None):
    for name, x in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        if x.ndim != 4:
            raise ValueError(f"bsa: {name}.shape={x.shape}; expected [B, S, H, D]")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"bsa: v.shape={v.shape} != k.shape={k.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"bsa: q.shape={q.shape} and k.shape={k.shape} differ in B, H or D")
    lat_q = _check_shape3("latent_shape_q", latent_shape_q)
    lat_k = _check_shape3("latent_shape_k", latent_shape_k)
    ch_q = _check_shape3("chunk_3d_shape_q", chunk_3d_shape_q)
    ch_k = _check_shape3("chunk_3d_shape_k", chunk_3d_shape_k)
    for which, x, lat, ch in (("q", q, lat_q, ch_q), ("k", k, lat_k, ch_k)):
        if math.prod(lat) != x.shape[1]:
            raise ValueError(
                f"bsa: {which} has S={x.shape[1]} tokens but latent_shape_{which}={lat} holds "
                f"{math.prod(lat)} (S must equal T*H*W)")
        if any(d % c for d, c in zip(lat, ch)):
            raise ValueError(
                f"bsa: latent_shape_{which}={lat} is not divisible by chunk_3d_shape_{which}={ch}")
    if sparsity is None and cdf_threshold is None:
        raise ValueError("bsa: sparsity and cdf_threshold are both None; give at least one")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"bsa: sparsity={sparsity!r}; expected a float in [0, 1) or None")
    if cdf_threshold is not None and not 0.0 < cdf_threshold <= 1.0:
        raise ValueError(f"bsa: cdf_threshold={cdf_threshold!r}; expected a float in (0, 1] or None")
    n_k_chunks = math.prod(n // c for n, c in zip(lat_k, ch_k))
    if cdf_threshold is None and topk_count(sparsity, n_k_chunks) < 1:
        raise ValueError(
            f"bsa: sparsity={sparsity} keeps int((1 - sparsity) * {n_k_chunks}) = 0 key chunks; "
            "lower the sparsity or use larger latents / smaller chunks")
    return lat_q, lat_k, ch_q, ch_k


def to_chunk_order(x: jax.Array, latent_shape: Sequence[int], chunk_shape: Sequence[int]) -> jax.Array:
    """[B, T*H*W, ...] in (T, H, W) raster order -> same shape, each 3D chunk contiguous."""
    (T, H, W), (t, h, w) = latent_shape, chunk_shape
    rest = x.shape[2:]
    y = x.reshape((x.shape[0], T // t, t, H // h, h, W // w, w) + rest)
    y = y.transpose((0, 1, 3, 5, 2, 4, 6) + tuple(range(7, 7 + len(rest))))
    return y.reshape(x.shape)


def from_chunk_order(x: jax.Array, latent_shape: Sequence[int], chunk_shape: Sequence[int]) -> jax.Array:
    """Inverse of `to_chunk_order`."""
    (T, H, W), (t, h, w) = latent_shape, chunk_shape
    rest = x.shape[2:]
    y = x.reshape((x.shape[0], T // t, H // h, W // w, t, h, w) + rest)
    y = y.transpose((0, 1, 4, 2, 5, 3, 6) + tuple(range(7, 7 + len(rest))))
    return y.reshape(x.shape)


def pool_chunks(x: jax.Array, latent_shape: Sequence[int], chunk_shape: Sequence[int]) -> jax.Array:
    """Per-chunk means, read straight from (T, H, W) order (no permuted copy of x is made).

    x [B, T*H*W, H, D] -> [B, H, n_chunks, D] float32, chunks in 3D-chunk raster order.
    """
    (T, H, W) = _check_shape3("latent_shape", latent_shape)
    (t, h, w) = _check_shape3("chunk_shape", chunk_shape)
    if x.ndim != 4 or x.shape[1] != T * H * W or T % t or H % h or W % w:
        raise ValueError(f"pool_chunks: x.shape={x.shape}, latent_shape={(T, H, W)}, chunk_shape="
                         f"{(t, h, w)}; expected x [B, T*H*W, H, D] with the latent divisible by the chunk")
    b, _, heads, d = x.shape
    y = x.astype(jnp.float32).reshape(b, T // t, t, H // h, h, W // w, w, heads, d)
    pooled = y.mean(axis=(2, 4, 6)).reshape(b, -1, heads, d)
    return pooled.transpose(0, 2, 1, 3)


def _rank_of(order: jax.Array) -> jax.Array:
    """order[..., r] = column with rank r -> rank of every column."""
    return jnp.argsort(order, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("lat_q", "lat_k", "ch_q", "ch_k", "sparsity",
                                             "cdf_threshold"))
def _select(q, k, *, lat_q, lat_k, ch_q, ch_k, sparsity: float | None, cdf_threshold: float | None):
    """q [B, Sq, H, D], k [B, Sk, H, D] in (T, H, W) order -> (kv_indices, kv_counts)."""
    q_cmp = pool_chunks(q, lat_q, ch_q)
    k_cmp = pool_chunks(k, lat_k, ch_k)
    score = jnp.einsum("bhnd,bhmd->bhnm", q_cmp, k_cmp, precision=jax.lax.Precision.HIGHEST)
    n_k = score.shape[-1]
    if cdf_threshold is None:
        count = topk_count(sparsity, n_k)
        # On GPUs a Pallas kernel (exactly lax.top_k's set, sorted; see pallas_kernels.topk_columns).
        indices = topk_sorted_columns(score, count)
        return indices, jnp.full(score.shape[:-1], count, jnp.int32)
    weights = jax.nn.softmax(score * (1.0 / q.shape[-1] ** 0.5), axis=-1)
    order = jnp.argsort(-weights, axis=-1, stable=True)
    cdf = jnp.cumsum(jnp.take_along_axis(weights, order, axis=-1), axis=-1)
    counts = jnp.sum(cdf <= jnp.float32(cdf_threshold), axis=-1, dtype=jnp.int32)
    if sparsity is not None:
        counts = jnp.maximum(counts, topk_count(sparsity, n_k))
    chosen = _rank_of(order) < counts[..., None]  # [B, H, nq, nk]
    # Ascending column ids of the chosen chunks first; the tail repeats the last one.
    sorted_ids = jnp.argsort(jnp.logical_not(chosen), axis=-1, stable=True).astype(jnp.int32)
    last = jnp.take_along_axis(sorted_ids, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    indices = jnp.where(jnp.arange(n_k) < counts[..., None], sorted_ids, last)
    return indices, counts


def _select_thw(q, k, lat_q, lat_k, ch_q, ch_k, sparsity, cdf_threshold):
    """`_select` with hashable (tuple, float or None) settings."""
    return _select(q, k, lat_q=tuple(lat_q), lat_k=tuple(lat_k), ch_q=tuple(ch_q), ch_k=tuple(ch_k),
                   sparsity=None if sparsity is None else float(sparsity),
                   cdf_threshold=None if cdf_threshold is None else float(cdf_threshold))


def select_blocks(
    q: jax.Array,
    k: jax.Array,
    latent_shape_q: Sequence[int],
    latent_shape_k: Sequence[int],
    *,
    sparsity: float | None = 0.9375,
    cdf_threshold: float | None = None,
    chunk_3d_shape_q: Sequence[int] = (4, 4, 4),
    chunk_3d_shape_k: Sequence[int] = (4, 4, 4),
) -> tuple[jax.Array, jax.Array]:
    """The key chunks each query chunk attends to, as BSA selects them.

    q: [B, Sq, H, D], k: [B, Sk, H, D], tokens in (T, H, W) order. Returns kv_indices int32
    [B, H, n_q_chunks, max_blocks] (ascending, entries past the count repeat the last one) and
    kv_counts int32 [B, H, n_q_chunks], chunk ids in 3D-chunk raster order
    ((t_chunk * n_h_chunks + h_chunk) * n_w_chunks + w_chunk).
    """
    lat_q, lat_k, ch_q, ch_k = _validate(q, k, latent_shape_q, latent_shape_k, sparsity, cdf_threshold,
                                         chunk_3d_shape_q, chunk_3d_shape_k)
    return _select_thw(q, k, lat_q, lat_k, ch_q, ch_k, sparsity, cdf_threshold)


def bsa_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    latent_shape_q: Sequence[int],
    latent_shape_k: Sequence[int],
    *,
    sparsity: float | None = 0.9375,
    cdf_threshold: float | None = None,
    chunk_3d_shape_q: Sequence[int] = (4, 4, 4),
    chunk_3d_shape_k: Sequence[int] = (4, 4, 4),
    implementation: str | None = None,
    scale: float | None = None,
    precision: str = "bf16",
) -> jax.Array:
    """LongCat's `flash_attn_bsa_3d` in our layout: q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H, D].

    Tokens in (T, H, W) order with T*H*W = S (latent_shape_*); softmax `scale` defaults to
    1/sqrt(D) as upstream (the CDF gating always uses 1/sqrt(D), as upstream). A query
    chunk whose CDF selection is empty outputs zeros. `implementation` goes to the kernel dispatcher.
    `precision` ("bf16", "fp8", "int8-fp8") is the attention arithmetic (the selection stays in the
    inputs' dtype); 8-bit quantization happens on the chunk-ordered Q/K/V.
    """
    lat_q, lat_k, ch_q, ch_k = _validate(q, k, latent_shape_q, latent_shape_k, sparsity, cdf_threshold,
                                         chunk_3d_shape_q, chunk_3d_shape_k, v=v)
    kv_indices, kv_counts = _select_thw(q, k, lat_q, lat_k, ch_q, ch_k, sparsity, cdf_threshold)
    q_c = to_chunk_order(q, lat_q, ch_q)
    k_c = to_chunk_order(k, lat_k, ch_k)
    v_c = to_chunk_order(v, lat_k, ch_k)
    out = block_sparse_attention(q_c, k_c, v_c, kv_indices, kv_counts, block_q=math.prod(ch_q),
                                 block_kv=math.prod(ch_k),
                                 scale=1.0 / q.shape[-1] ** 0.5 if scale is None else scale,
                                 implementation=implementation, precision=precision)
    return from_chunk_order(out, lat_q, ch_q)
