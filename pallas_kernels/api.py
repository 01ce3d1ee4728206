"""The public block-sparse attention entry point and its backend dispatch.

    block_sparse_attention(q, k, v, kv_indices, kv_counts, *, block_q, block_kv, scale=None,
                           kv_len=None, implementation=None) -> out

implementation=None picks "mosaic" (the Pallas Mosaic GPU kernel) on Hopper GPUs and "portable"
(pure jnp, any backend) elsewhere. "mosaic", "portable" and "reference" force one. The Mosaic
kernel's TuningConfig is chosen here (`heuristics.default_config`) unless the caller passes one.
"""
from __future__ import annotations

import jax

from pallas_kernels.block_sparse_mgpu import TuningConfig

__all__ = ["IMPLEMENTATIONS", "block_sparse_attention", "is_hopper", "resolve_implementation"]

IMPLEMENTATIONS = ("mosaic", "portable", "reference")
_HOPPER_COMPUTE_CAPABILITY = "9.0"


def is_hopper(device: jax.Device | None = None) -> bool:
    """True when `device` (default: the first default-backend device) is an sm_90 CUDA GPU."""
    if device is None:
        device = jax.devices()[0]
    if device.platform != "gpu":
        return False
    capability = getattr(device, "compute_capability", None)
    if capability is not None:
        return str(capability) == _HOPPER_COMPUTE_CAPABILITY
    kind = device.device_kind.lower()
    return any(name in kind for name in ("h100", "h200", "h800", "h20", "gh200"))


def resolve_implementation(implementation: str | None, device: jax.Device | None = None) -> str:
    """Name of the implementation to run; raises ValueError when it cannot run here."""
    if implementation is None:
        return "mosaic" if is_hopper(device) else "portable"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; expected None or one of {IMPLEMENTATIONS}")
    if implementation == "mosaic" and not is_hopper(device):
        found = device if device is not None else jax.devices()[0]
        raise ValueError(f"implementation='mosaic' needs an NVIDIA Hopper GPU (sm_90); found "
                         f"{found.platform}:{found.device_kind}. Use implementation=None or 'portable'.")
    return implementation


def block_sparse_attention(
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
    implementation: str | None = None,
    config: TuningConfig | None = None,
    precision: str = "bf16",
) -> jax.Array:
    """Softmax attention over the listed key blocks of every (batch, head, query block).

    q, k, v: [B, S, H, D] (bf16/fp16; fp32 on the portable path); kv_indices int32
    [B or 1, H or 1, S/block_q, max_blocks] sorted ascending, entries past the count ignored;
    kv_counts int32 [B or 1, H or 1, S/block_q]; scale defaults to 1/sqrt(D); keys at positions
    >= kv_len get no weight. A query block with count 0 (or rows that see no valid key) outputs
    zeros. Returns [B, S, H, D] in q's dtype. `config` tunes the Mosaic kernel only.

    `precision`: "bf16" (the inputs as they are), "fp8" or "int8-fp8" (Sage-style 8-bit, see
    pallas_kernels.quantized): the Mosaic fp8 kernel on Hopper, else the jnp quantize-dequantize
    reference (O(Sq x Sk) memory: small shapes only).
    """
    from pallas_kernels.quantized import check_precision

    check_precision(precision)
    impl = resolve_implementation(implementation)
    kwargs = dict(block_q=block_q, block_kv=block_kv, scale=scale, kv_len=kv_len)
    if precision != "bf16":
        return _block_sparse_8bit(q, k, v, kv_indices, kv_counts, impl=impl, config=config, precision=precision,
                                  **kwargs)
    if impl == "mosaic":
        from pallas_kernels.block_sparse_mgpu import block_sparse_attention_mgpu, validate_mgpu_args
        from pallas_kernels.heuristics import default_config

        if config is None:  # the kernel configuration is chosen here, never by models or the kernel
            validate_mgpu_args(q, k, v, kv_indices, kv_counts, config=None, **kwargs)
            config = default_config(head_dim=q.shape[-1], block_q=block_q, block_kv=block_kv, dtype=q.dtype)
        return block_sparse_attention_mgpu(q, k, v, kv_indices, kv_counts, config=config, **kwargs)
    if config is not None:
        raise ValueError(f"config={config!r} only applies to implementation='mosaic' (got {impl!r})")
    if impl == "portable":
        from pallas_kernels.portable import block_sparse_attention_portable
        return block_sparse_attention_portable(q, k, v, kv_indices, kv_counts, **kwargs)
    from pallas_kernels.reference import block_sparse_attention_reference
    return block_sparse_attention_reference(q, k, v, kv_indices, kv_counts, **kwargs)


def _block_sparse_8bit(q, k, v, kv_indices, kv_counts, *, impl: str, config, precision: str, **kwargs):
    """8-bit precisions: the Mosaic fp8 kernel where it runs, else the quantize-dequantize reference."""
    if impl == "mosaic":
        from pallas_kernels.block_sparse_mgpu_fp8 import block_sparse_attention_mgpu_fp8

        return block_sparse_attention_mgpu_fp8(q, k, v, kv_indices, kv_counts, config=config,
                                               precision=precision, **kwargs)
    if config is not None:
        raise ValueError(f"config={config!r} only applies to implementation='mosaic' (got {impl!r})")
    from pallas_kernels.quantized import quantized_attention_reference

    return quantized_attention_reference(q, k, v, kv_indices, kv_counts, precision=precision, **kwargs)
