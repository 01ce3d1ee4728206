"""The device mesh: axes `cfg` (classifier-free guidance halves / batch) and `seq` (Ulysses tokens).

Built from the CLI's `--devices N` (all N on `seq`, or `cfg=2` first when asked) and
`--mesh cfg=2,seq=4`; every bad value is a ValueError that names the option and what was expected.
The mesh's axes are `Auto` (GSPMD propagates shardings outside the attention's `shard_map`).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

__all__ = ["AXES", "parse_mesh_spec", "make_mesh", "mesh_from_options", "mesh_context", "describe_mesh"]

AXES = ("cfg", "seq")


def parse_mesh_spec(text: str) -> dict[str, int]:
    """"cfg=2,seq=4" -> {"cfg": 2, "seq": 4}; only the axes given (make_mesh fills in the rest: cfg 1,
    seq = the devices cfg leaves). Only `cfg` and `seq` exist."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--mesh={text!r}; expected axis=size pairs such as 'cfg=2,seq=4' (axes: cfg, seq)")
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or name not in AXES:
            raise ValueError(f"--mesh={text!r}: {part.strip()!r} is not axis=size with axis in {AXES}")
        if name in sizes:
            raise ValueError(f"--mesh={text!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(f"--mesh={text!r}: {name}={value!r}; expected a positive integer")
        sizes[name] = size
    return {axis: sizes[axis] for axis in AXES if axis in sizes}


def make_mesh(devices: int | None = None, *, axes: Mapping[str, int] | None = None,
              device_list: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("cfg", "seq") mesh over the first `devices` devices (default: all of `jax.devices()`).

    axes: sizes per axis (missing ones are 1; with `seq` missing it takes what `cfg` leaves). Their
    product must equal the device count used.
    """
    available = list(jax.devices() if device_list is None else device_list)
    if devices is None:
        devices = math.prod((axes or {}).values()) if axes and "seq" in axes else len(available)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(f"--devices={devices!r}; expected a positive integer")
    if devices > len(available):
        raise ValueError(f"--devices={devices}; only {len(available)} device(s) are visible "
                         f"({available[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         "before jax starts")
    sizes = dict(axes or {})
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} unknown; expected only {AXES}")
    cfg = int(sizes.get("cfg", 1))
    if cfg < 1 or ("seq" not in sizes and devices % cfg):
        raise ValueError(f"--mesh cfg={cfg} does not divide --devices={devices}")
    seq = int(sizes.get("seq", devices // cfg))
    if cfg * seq != devices:
        raise ValueError(f"--mesh cfg={cfg},seq={seq} uses {cfg * seq} devices; --devices={devices} "
                         "(the product of the mesh axes must equal the device count)")
    return jax.make_mesh((cfg, seq), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=available[:devices])


def mesh_from_options(devices: int | None, mesh: str | None) -> Mesh | None:
    """The CLI's `--devices` / `--mesh` -> a Mesh, or None when neither was given (one device, no mesh)."""
    if devices is None and mesh is None:
        return None
    axes = parse_mesh_spec(mesh) if mesh is not None else None
    if devices is None and axes is not None:
        devices = math.prod(axes.values())
    return make_mesh(devices, axes=axes)


@contextlib.contextmanager
def mesh_context(mesh: Mesh | None) -> Iterator[None]:
    """`jax.set_mesh(mesh)` around tracing, lowering and running (no-op for None).

    jax only allows it outside `jax.jit`: wrap the call that lowers a jitted function, so that
    `attend` (through `sequence_parallel`) sees the mesh while it is traced.
    """
    if mesh is None:
        yield
        return
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh={mesh!r}; expected None or a jax.sharding.Mesh (jaxvid.parallel.make_mesh)")
    missing = [a for a in mesh.axis_names if a not in AXES]
    if missing:
        raise ValueError(f"mesh axes {mesh.axis_names}; expected a subset of {AXES} (jaxvid.parallel.make_mesh)")
    with jax.set_mesh(mesh):
        yield


def describe_mesh(mesh: Mesh | None) -> str:
    """'cfg=2 x seq=4 over 8 gpu devices' (for logs and bench tables)."""
    if mesh is None:
        return "no mesh (1 device)"
    axes = " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
    return f"{axes} over {mesh.size} {mesh.devices.flat[0].platform} device(s)"
