"""FP8 weights for the DiT's linear layers: e4m3 kernels with per-output-channel scales.

    y = (q(x) @ W8) * s_x * s_w + bias          q(x): x / s_x in e4m3, s_x per token (dynamic)

- Weights: W8 = round_e4m3(W / s_w), s_w = max_in |W[:, out]| / 448 (per output channel), so
  every column uses the whole e4m3 range; stored as float8_e4m3fn [.., in, out] + float32 [.., out].
- Activations: scaled per token at run time (s_x = max |x[token]| / 448), so an outlier token does
  not flatten the others.
- The product is one `lax.dot_general` on float8 inputs with `preferred_element_type=float32`; XLA
  lowers it to a cuBLASLt FP8 GEMM on Hopper (the HLO holds an f8e4m3fn x f8e4m3fn -> f32 dot);
  on CPU XLA computes the same products exactly in f32.
- What is quantized is chosen per model (`FP8_TARGETS`): the attention projections and MLPs of the
  transformer blocks. Norms, embeddings, modulation (AdaLN linears) and the final layer stay in
  the model dtype: they are small and precision-sensitive (LongCat's own INT8 export skips its
  final layer for the same reason).

`quantize_model_fp8(model)` swaps the chosen `nnx.Linear` / LongCat `_Linear` modules for
`Fp8Linear` in place (works on abstract models too, for loading a converted fp8 checkpoint).
"""
from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

__all__ = [
    "E4M3_MAX", "FP8_DTYPE", "FP8_TARGETS", "WEIGHT_FORMATS", "Fp8Linear", "dequantize", "fp8_checkpoint_quantizer",
    "fp8_dot", "fp8_dot_reference", "fp8_targets_for", "fused_fp8_dot", "is_fp8_state", "quantize_model_fp8", "quantize_per_token",
    "quantize_weight", "resolve_weights",
]

log = logging.getLogger(__name__)

FP8_DTYPE = jnp.float8_e4m3fn
E4M3_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448
_TINY = float(jnp.finfo(jnp.float32).tiny)
WEIGHT_FORMATS = ("fp8",)
SCALE_SUFFIX = "kernel_scale"

# Model class name -> glob patterns over '.'-joined module paths of the linears to quantize.
FP8_TARGETS: dict[str, tuple[str, ...]] = {
    "CogVideoXTransformer3D": (
        "transformer_blocks.attn1.to_q", "transformer_blocks.attn1.to_k", "transformer_blocks.attn1.to_v",
        "transformer_blocks.attn1.to_out", "transformer_blocks.ff.linear_in", "transformer_blocks.ff.linear_out",
    ),
    "LongCatVideoTransformer3D": (
        "blocks.attn.qkv", "blocks.attn.proj", "blocks.cross_attn.q_linear", "blocks.cross_attn.kv_linear",
        "blocks.cross_attn.proj", "blocks.ffn.w1", "blocks.ffn.w2", "blocks.ffn.w3",
    ),
}


def resolve_weights(weights: str | None, name: str = "weights") -> str | None:
    """None / "bf16" / "fp32" / "fp16" / "model" -> None (weights in the model dtype); "fp8" -> "fp8"."""
    if weights is None or weights in ("bf16", "fp32", "fp16", "model"):
        return None
    if weights in WEIGHT_FORMATS:
        return weights
    raise ValueError(f"{name}={weights!r}; expected None (the model dtype) or one of {WEIGHT_FORMATS}")


# ---------------------------------------------------------------------------------------------
# Quantizers (pure jnp; leading axes are batch axes, e.g. stacked layers)


def quantize_weight(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """kernel [..., in, out] -> (e4m3 [..., in, out], float32 scale [..., out]); per output channel."""
    w = jnp.asarray(kernel).astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(w), axis=-2) / E4M3_MAX, _TINY)
    q = jnp.clip(w / scale[..., None, :], -E4M3_MAX, E4M3_MAX).astype(FP8_DTYPE)
    return q, scale


def quantize_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., in] -> (e4m3 [..., in], float32 scale [..., 1]); one scale per token (last axis)."""
    xf = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / E4M3_MAX, _TINY)
    q = jnp.clip(xf / scale, -E4M3_MAX, E4M3_MAX).astype(FP8_DTYPE)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 values of quantized `q` with a broadcastable `scale`."""
    return q.astype(jnp.float32) * scale


def fp8_dot(x: jax.Array, kernel8: jax.Array, kernel_scale: jax.Array) -> jax.Array:
    """x [..., in] (any float) @ dequant(kernel8 [in, out], kernel_scale [out]) -> float32 [..., out].

    x is quantized per token; the matmul is one f8 x f8 -> f32 `lax.dot_general`.
    """
    xq, sx = quantize_per_token(x)
    y = lax.dot_general(xq, kernel8, (((xq.ndim - 1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return y * sx * kernel_scale.astype(jnp.float32)


def fp8_dot_reference(x: jax.Array, kernel8: jax.Array, kernel_scale: jax.Array) -> jax.Array:
    """Quantize-dequantize reference of `fp8_dot`: both operands dequantized to f32, f32 matmul."""
    xq, sx = quantize_per_token(x)
    return jnp.dot(dequantize(xq, sx), dequantize(kernel8, kernel_scale[..., None, :]),
                   precision=lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------------------
# Module


class Fp8Linear(nnx.Module):
    """Drop-in for `nnx.Linear` / LongCat's `_Linear` with an e4m3 kernel and per-channel scales.

    kernel: float8_e4m3fn [in, out] (stacked layers: [L, in, out]), kernel_scale: float32 [out],
    bias: model dtype [out] or None. __call__(x [..., in], lora=None) -> [..., out] in `dtype`;
    a LoRA update (LongCat's run-time LoRA) is added in `dtype` on top of the fp8 product.
    """

    def __init__(self, kernel8: jax.Array, kernel_scale: jax.Array, bias: jax.Array | None, *, dtype: Any):
        self.kernel = nnx.Param(kernel8)
        self.kernel_scale = nnx.Param(kernel_scale)
        self.bias = None if bias is None else nnx.Param(bias)
        self.dtype = dtype

    @classmethod
    def from_linear(cls, linear: nnx.Module) -> Fp8Linear:
        """Quantize a module with `kernel` [.., in, out], `bias` and `dtype` (nnx.Linear, _Linear).
        An abstract linear (ShapeDtypeStructs, jaxvid.models.abstract) gives an abstract Fp8Linear."""
        kernel = linear.kernel.get_value()
        bias = None if linear.bias is None else linear.bias.get_value()
        if isinstance(kernel, jax.ShapeDtypeStruct):
            kernel8, scale = jax.eval_shape(quantize_weight, kernel)  # the shapes and dtypes it would give
        else:
            kernel8, scale = quantize_weight(kernel)
        dtype = linear.dtype if linear.dtype is not None else kernel.dtype
        return cls(kernel8, scale, bias, dtype=dtype)

    def __call__(self, x: jax.Array, lora: Any = None, *, fp32: bool = False) -> jax.Array:
        if fp32:
            raise ValueError("Fp8Linear: fp32=True asked for an fp32 matmul; fp8 layers are never the "
                             "fp32 (modulation) ones, see jaxvid.models.fp8.FP8_TARGETS")
        y = fp8_dot(x, self.kernel[...], self.kernel_scale[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        y = y.astype(self.dtype)
        if lora is not None:
            xd = x.astype(self.dtype)
            low = jnp.dot(xd, lora.down.astype(self.dtype)) * lora.scale.astype(self.dtype)
            y = y + jnp.dot(low, lora.up.astype(self.dtype))
        return y


def fused_fp8_dot(x: jax.Array, linears: Sequence[Fp8Linear]) -> jax.Array:
    """Several Fp8Linear of one input as one GEMM (x read and quantized once): [..., sum(out)] in
    the first layer's dtype. Scales are per output channel, so concatenating columns is exact."""
    kernel = jnp.concatenate([m.kernel[...] for m in linears], axis=-1)
    scale = jnp.concatenate([m.kernel_scale[...] for m in linears], axis=-1)
    y = fp8_dot(x, kernel, scale)
    if linears[0].bias is not None:
        y = y + jnp.concatenate([m.bias[...] for m in linears]).astype(jnp.float32)
    return y.astype(linears[0].dtype)


# ---------------------------------------------------------------------------------------------
# Model surgery


def fp8_targets_for(model: nnx.Module) -> tuple[str, ...]:
    """The module-path patterns quantized for this model's class (ValueError for other models)."""
    name = type(model).__name__
    if name not in FP8_TARGETS:
        raise ValueError(f"weights='fp8' is supported for {sorted(FP8_TARGETS)}; got a {name}")
    return FP8_TARGETS[name]


def _linear_modules(model: nnx.Module, patterns: Sequence[str]) -> list[tuple[tuple[str, ...], nnx.Module]]:
    found = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or isinstance(node, Fp8Linear) or not hasattr(node, "kernel"):
            continue
        joined = ".".join(str(p) for p in path)
        if any(fnmatch.fnmatchcase(joined, p) for p in patterns):
            found.append((tuple(str(p) for p in path), node))
    return found


def quantize_model_fp8(model: nnx.Module) -> nnx.Module:
    """Replace the model's FP8_TARGETS linears by Fp8Linear (in place; also returns the model).

    On an abstract model (inside `nnx.eval_shape`) this only builds the fp8 structure, which is
    what loading a converted fp8 checkpoint fills.
    """
    patterns = fp8_targets_for(model)
    targets = _linear_modules(model, patterns)
    if not targets:
        raise ValueError(f"quantize_model_fp8: no linear of {type(model).__name__} matches {patterns}")
    for path, linear in targets:
        parent = model
        for part in path[:-1]:
            parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
        setattr(parent, path[-1], Fp8Linear.from_linear(linear))
    log.info("fp8 weights: %d linear layers of %s quantized", len(targets), type(model).__name__)
    return model


def is_fp8_state(keys: Sequence[str]) -> bool:
    """True when flat parameter names (a checkpoint's keys) hold fp8 scales."""
    return any(k.endswith("." + SCALE_SUFFIX) for k in keys)


_SLICE = re.compile(r"^(?P<path>.+)\.kernel(?P<index>\[\d+\])?$")


def fp8_checkpoint_quantizer(model_class: str) -> Callable[[str, Any], list[tuple[str, Any]]]:
    """For `jaxvid-convert --weights fp8`: (target name, array) -> the tensors to store.

    A kernel of one of FP8_TARGETS[model_class] (or one layer's slice `...kernel[i]` of a stacked
    one) becomes `...kernel[i]` in e4m3 plus `...kernel_scale[i]` in float32, quantized exactly as
    `quantize_model_fp8` does after loading; any other tensor is stored as it is.
    """
    import numpy as np

    patterns = FP8_TARGETS[model_class]

    def quantize(target: str, array: Any) -> list[tuple[str, Any]]:
        m = _SLICE.match(target)
        if m is None or not any(fnmatch.fnmatchcase(m["path"], p) for p in patterns):
            return [(target, array)]
        q, scale = quantize_weight(jnp.asarray(array))
        index = m["index"] or ""
        return [(target, np.asarray(q)), (f"{m['path']}.{SCALE_SUFFIX}{index}", np.asarray(scale))]

    return quantize
