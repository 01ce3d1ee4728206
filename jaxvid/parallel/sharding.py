"""Where arrays live on the mesh: activations, weights and the VAE's input.

All helpers are no-ops without a mesh (`mesh_context(None)`), so models call them unconditionally.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvid.parallel.ulysses import batch_axis, sequence_parallel_axes

__all__ = ["shard_tokens", "shard_spatial", "place_replicated", "shard_weights_fsdp", "place_module", "on_mesh"]

log = logging.getLogger(__name__)


def shard_tokens(x: jax.Array) -> jax.Array:
    """Constrain activations x [B, S, ...] to batch over `cfg` (when it divides) and tokens over `seq`.

    Called at each DiT block's entry so that everything outside attention (norms, projections,
    MLP, modulation) runs on the local tokens only; a hint to GSPMD, the values are unchanged.
    """
    axes = sequence_parallel_axes()
    if axes is None:
        return x
    cfg, seq = axes
    return jax.lax.with_sharding_constraint(x, P(batch_axis(x.shape[0], cfg), "seq" if seq > 1 else None))


def shard_spatial(x: jax.Array, axis: int) -> jax.Array:
    """Split dimension `axis` of x over every device of the mesh (both axes), e.g. the latent height of
    the VAE decoder's input: XLA partitions the convolutions spatially and exchanges the halos, so the
    decoded frames equal the single-device ones (unlike overlapping-tile blending)."""
    axes = sequence_parallel_axes()
    if axes is None:
        return x
    spec = [None] * x.ndim
    spec[axis] = ("cfg", "seq")
    return jax.lax.with_sharding_constraint(x, P(*spec))


def place_replicated(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of `tree` replicated on every device of `mesh` (the default for weights and inputs)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _fsdp_spec(shape: tuple[int, ...], n: int, axis: str, min_elements: int) -> P:
    """Split the largest dimension (not the first of a stacked-layer array) that `n` divides."""
    size = 1
    for d in shape:
        size *= d
    if len(shape) < 2 or size < min_elements:
        return P()
    candidates = [i for i in range(1, len(shape)) if shape[i] % n == 0]
    if not candidates:
        return P()
    best = max(candidates, key=lambda i: shape[i])
    spec: list[Any] = [None] * len(shape)
    spec[best] = axis
    return P(*spec)


def shard_weights_fsdp(tree: Any, mesh: Mesh, *, axis: str = "seq", min_elements: int = 1 << 16) -> Any:
    """FSDP-style weights: each large array split over mesh axis `axis` along its largest dimension
    that divides (never dim 0, the layer index of scanned stacks; replicated over the other axis).

    Every device then stores 1/n of the weights; inside the jitted step XLA gathers each layer's
    slice when the scan reaches it. For LongCat (13.6 B parameters) on 24 GB cards. Small arrays
    (< min_elements) stay replicated.
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"shard_weights_fsdp: axis={axis!r} not in the mesh axes {mesh.axis_names}")
    n = mesh.shape[axis]

    def put(a: Any) -> Any:
        if not hasattr(a, "shape"):
            return a
        return jax.device_put(a, NamedSharding(mesh, _fsdp_spec(tuple(a.shape), n, axis, min_elements)))

    return jax.tree.map(put, tree)


def place_module(module: nnx.Module, mesh: Mesh | None, *, fsdp: bool = False) -> None:
    """Move an NNX module's weights onto `mesh` in place: replicated, or FSDP-style with `fsdp`.

    In place (`nnx.update`), so the single-device copy is released rather than kept beside the
    mesh copy. Re-split any `Component` holding the module afterwards (`component.refresh()`).
    """
    if mesh is None:
        return
    state = nnx.state(module)
    nnx.update(module, shard_weights_fsdp(state, mesh) if fsdp else place_replicated(state, mesh))
    log.info("weights of %s %s on %d devices", type(module).__name__, "sharded (FSDP over seq)" if fsdp
             else "replicated", mesh.size)


def on_mesh(tree: Any, mesh: Mesh) -> bool:
    """Whether the arrays of `tree` already live on `mesh` (checked on the first array)."""
    leaves = [a for a in jax.tree.leaves(tree) if isinstance(a, jax.Array)]
    sharding = leaves[0].sharding if leaves else None
    return isinstance(sharding, NamedSharding) and sharding.mesh == mesh
