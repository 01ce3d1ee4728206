"""The attention layer every model calls: `attend(q, k, v, spec, layout=...)`.

Dense only in this first cut; radial / BSA / scene specs plug in here without model changes.
"""
from __future__ import annotations

import jax

from jaxvid.attention.dense import dense_attention
from jaxvid.attention.layout import VideoLayout

__all__ = ["attend", "dense_attention", "VideoLayout"]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec=None,
    *,
    layout: VideoLayout | None = None,
    kv_layout: VideoLayout | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Attention over q: [B, Sq, H, D], k/v: [B, Sk, H, D] -> [B, Sq, H, D].

    `spec` is one plan entry (None = dense). `layout` / `kv_layout` describe where the video and
    text tokens sit in the query / key sequences (needed by the sparse schemes).
    """
    if spec is None:
        return dense_attention(q, k, v, scale=scale)
    raise ValueError(f"attend: unknown attention spec {spec!r}")
