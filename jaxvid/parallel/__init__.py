"""Several devices on JAX's own distributed runtime: a `Mesh` with a `cfg` and a `seq` axis.

    mesh = make_mesh(devices=8, axes={"cfg": 2, "seq": 4})   # or mesh_from_options(8, "cfg=2,seq=4")
    with mesh_context(mesh):                               # around tracing / lowering, never inside jit
        ... jitted DiT ...                                 # attend() runs Ulysses over `seq`

- mesh.py: building and checking the mesh (CLI `--devices N` / `--mesh cfg=2,seq=4`).
- distributed.py: the `jax.distributed.initialize` hook for several hosts.
- ulysses.py: Ulysses sequence parallel attention inside `shard_map` (all-to-all tokens <-> heads).
- sharding.py: activation constraints (tokens over `seq`, CFG halves over `cfg`), replicated or
  FSDP-style sharded weights, spatially split VAE decoding.

Nothing here knows a model: the attention function and the decoder come in as arguments.
"""
from jaxvid.parallel.distributed import initialize_distributed
from jaxvid.parallel.mesh import AXES, describe_mesh, make_mesh, mesh_context, mesh_from_options, parse_mesh_spec
from jaxvid.parallel.sharding import (
    on_mesh,
    place_module,
    place_replicated,
    shard_spatial,
    shard_tokens,
    shard_weights_fsdp,
)
from jaxvid.parallel.ulysses import padded_heads, sequence_parallel, sequence_parallel_axes

__all__ = [
    "AXES", "make_mesh", "mesh_from_options", "parse_mesh_spec", "mesh_context", "describe_mesh",
    "initialize_distributed", "sequence_parallel", "sequence_parallel_axes", "padded_heads",
    "shard_tokens", "shard_spatial", "place_replicated", "shard_weights_fsdp", "place_module", "on_mesh",
]
