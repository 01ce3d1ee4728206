"""The attention layer every model calls: `attend(q, k, v, spec, layout=...)`.

`spec` is one entry of an `AttentionPlan` (plan.py): `Dense()` (or None), `Radial(...)` (static
block mask from the layout, radial.py, optionally AND a scene mask, scene.py) or `BSA(...)`
(LongCat's dynamic 3D-chunk selection, bsa.py). Sparse schemes end in the block-sparse kernel
contract of DESIGN.md (pallas_kernels.block_sparse_attention).
"""
from __future__ import annotations

import functools

import jax

from jaxvid.attention.bsa import bsa_attention, select_blocks
from jaxvid.attention.dense import check_float_qkv, dense_attention
from jaxvid.attention.layout import VideoLayout
from jaxvid.attention.plan import BSA, PRECISIONS, AttentionPlan, AttentionSpec, Dense, Radial, Scene
from jaxvid.attention.precision import quantized_dense_attention
from jaxvid.attention.radial import radial_attention, radial_block_mask
from jaxvid.attention.scene import scene_block_mask
from jaxvid.parallel.ulysses import sequence_parallel

__all__ = [
    "attend", "dense_attention", "VideoLayout",
    "AttentionPlan", "AttentionSpec", "Dense", "Radial", "BSA", "Scene", "PRECISIONS", "quantized_dense_attention",
    "radial_block_mask", "scene_block_mask", "select_blocks", "bsa_attention",
]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    spec: AttentionSpec | None = None,
    *,
    layout: VideoLayout | None = None,
    kv_layout: VideoLayout | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Attention over q: [B, Sq, H, D], k/v: [B, Sk, H, D] -> [B, Sq, H, D].

    `spec`: None / Dense() -> dense softmax attention. Radial(...) -> self-attention under the
    static radial mask; needs `layout` (the text tokens may sit before or after the video; the
    block tables are built once per shape at trace time, shared over batch and heads).
    BSA(...) -> LongCat's block sparse attention over video-only sequences: needs `layout`
    (queries) and optionally `kv_layout` (keys, default = layout), both without text; a layout
    with a single frame runs dense, as upstream ("bsa will not be used in image sampling").
    `scale` defaults to 1/sqrt(D). q, k, v must be floating point (TypeError otherwise).
    Under a device mesh (jaxvid.parallel.mesh_context) it runs Ulysses sequence parallel: each device
    attends over the whole sequence of a slice of the heads (jaxvid.parallel.ulysses).
    """
    check_float_qkv("attend", q, k, v)
    local = functools.partial(_attend_local, spec=spec, layout=layout, kv_layout=kv_layout, scale=scale)
    return sequence_parallel(local, q, k, v)


def _attend_local(q, k, v, *, spec, layout, kv_layout, scale):
    """`attend` on one device (or on one device's heads inside the Ulysses shard_map)."""
    if isinstance(spec, Dense) and spec.precision != "bf16":
        return quantized_dense_attention(q, k, v, precision=spec.precision, scale=scale)
    if spec is None or isinstance(spec, Dense):
        return dense_attention(q, k, v, scale=scale)
    if isinstance(spec, Radial):
        return _attend_radial(q, k, v, spec, layout, kv_layout, scale)
    if isinstance(spec, BSA):
        return _attend_bsa(q, k, v, spec, layout, kv_layout, scale)
    raise ValueError(f"attend: spec={spec!r}; expected None, Dense(), Radial(...) or BSA(...)")


def _require_layout(layout, spec) -> VideoLayout:
    if not isinstance(layout, VideoLayout):
        raise ValueError(f"attend: {type(spec).__name__} needs layout=VideoLayout(...), got layout={layout!r}")
    return layout


def _attend_radial(q, k, v, spec: Radial, layout, kv_layout, scale):
    layout = _require_layout(layout, spec)
    if kv_layout is not None and kv_layout != layout:
        raise ValueError(f"attend: Radial is self-attention only; kv_layout={kv_layout} != layout={layout}")
    scene = spec.scene
    return radial_attention(
        q, k, v, num_frames=layout.frames, tokens_per_frame=layout.tokens_per_frame,
        text_tokens=layout.text_tokens, text_first=layout.text_first, block_size=spec.block_size,
        decay_factor=spec.decay_factor, model_type=spec.model_type,
        scene_boundaries=None if scene is None else scene.boundaries,
        scene_adjacency=None if scene is None else scene.adjacency,
        scale=scale, implementation=spec.implementation, precision=spec.precision)


def _attend_bsa(q, k, v, spec: BSA, layout, kv_layout, scale):
    layout = _require_layout(layout, spec)
    kv_layout = layout if kv_layout is None else kv_layout
    for name, lay in (("layout", layout), ("kv_layout", kv_layout)):
        if lay.text_tokens:
            raise ValueError(f"attend: BSA runs on video tokens only; {name}.text_tokens={lay.text_tokens}")
    if layout.frames == 1:
        if spec.precision != "bf16":
            return quantized_dense_attention(q, k, v, precision=spec.precision, scale=scale)
        return dense_attention(q, k, v, scale=scale)
    return bsa_attention(
        q, k, v, (layout.frames, layout.height, layout.width),
        (kv_layout.frames, kv_layout.height, kv_layout.width), sparsity=spec.sparsity,
        cdf_threshold=spec.cdf_threshold, chunk_3d_shape_q=spec.chunk_3d_shape_q,
        chunk_3d_shape_k=spec.chunk_3d_shape_k, implementation=spec.implementation, scale=scale,
        precision=spec.precision)
