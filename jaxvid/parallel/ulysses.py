"""Ulysses sequence parallel attention: tokens sharded over `seq`, heads sharded while attending.

Inside `shard_map` every device holds a slice of the tokens of every head. One all-to-all turns
that into the whole sequence of a slice of the heads; the single-device attention runs on it
unchanged (dense, radial, BSA: BSA pools and picks its top-k over the whole sequence of each head,
so its selection is exactly the single-device one); a second all-to-all turns the result back.

Shapes that do not divide the mesh:
- tokens: padded at the end to a multiple of `seq` before the first all-to-all and cut off again
  before attending (padding never enters the softmax);
- heads: PADDED with zero heads to a multiple of `seq` (CogVideoX-2b's 30 heads on 4 or 8 devices
  run as 32; 2 of 32 heads are wasted work, 6 %); their outputs are dropped. No ring fallback.
- batch (the `cfg` axis): sharded over `cfg` when it divides; otherwise replicated over `cfg`
  (the `cfg` devices then repeat each other's work; a warning says so).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

__all__ = ["sequence_parallel", "sequence_parallel_axes", "padded_heads"]

log = logging.getLogger(__name__)

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def sequence_parallel_axes() -> tuple[int, int] | None:
    """(cfg size, seq size) of the mesh set with `mesh_context` while tracing; None when there is
    none or inside a `shard_map` over them already (manual axes). A 1-device mesh still runs the
    `shard_map` path (the all-to-alls drop out), so one GPU exercises the sharded code."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    ours = [a for a in ("cfg", "seq") if a in types]
    if not ours or any(types[a] == AxisType.Manual for a in ours):
        return None
    return mesh.shape.get("cfg", 1), mesh.shape.get("seq", 1)


def padded_heads(heads: int, seq: int) -> int:
    """Heads after padding to a multiple of the `seq` axis (30 heads on seq=4 -> 32)."""
    return _round_up(heads, seq)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def batch_axis(batch: int, cfg: int) -> str | None:
    """'cfg' when the batch divides over it (the [uncond; cond] halves on different devices)."""
    if cfg == 1:
        return None
    if batch % cfg == 0:
        return "cfg"
    log.warning("mesh cfg=%d does not divide the batch %d (CFG off?): the batch is replicated over cfg, "
                "those devices repeat the same work", cfg, batch)
    return None


def sequence_parallel(attn_fn: AttentionFn, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`attn_fn(q, k, v)` with q [B, Sq, H, D], k/v [B, Sk, H, D] -> [B, Sq, H, D], run Ulysses-style
    over the mesh of `mesh_context` (straight `attn_fn(q, k, v)` without one).

    `attn_fn` must treat heads independently (every attention does) and see the whole sequence.
    """
    axes = sequence_parallel_axes()
    if axes is None:
        return attn_fn(q, k, v)
    cfg, seq = axes
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    hp = padded_heads(h, seq)
    if hp != h:
        log.info("Ulysses: %d heads do not divide seq=%d; padded with %d zero heads to %d (dropped after)",
                 h, seq, hp - h, hp)
    sqp, skp = _round_up(sq, seq), _round_up(sk, seq)
    q = _pad_to(_pad_to(q, 2, hp), 1, sqp)
    k, v = (_pad_to(_pad_to(t, 2, hp), 1, skp) for t in (k, v))
    spec = P(batch_axis(b, cfg), "seq" if seq > 1 else None, None, None)

    def local(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        if seq > 1:  # [b, S/seq, H, D] -> [b, S, H/seq, D]
            q, k, v = (jax.lax.all_to_all(t, "seq", 2, 1, tiled=True) for t in (q, k, v))
        out = attn_fn(q[:, :sq], k[:, :sk], v[:, :sk])
        if seq > 1:  # [b, S, H/seq, D] -> [b, S/seq, H, D]
            out = jax.lax.all_to_all(_pad_to(out, 1, sqp), "seq", 1, 2, tiled=True)
        return out

    out = jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
    return out[:, :sq, :h]
