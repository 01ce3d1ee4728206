"""Where a pipeline's weights wait between uses: device memory, or pinned host memory (JAX memory kinds).

Policies (`offload=` of a pipeline, `--offload` of the CLI):

- "none": every component stays on the device (fastest, most memory).
- "text" (the default): the text encoder is read on demand. A pipeline's `from_pretrained` checks
  its checkpoint (keys, shapes, dtypes, config) but reads no weight. Each encode reads the weights
  from the memory-mapped checkpoint straight to the device, encodes, and deletes them
  (`Offload.on_demand`, `loading.OnDemandModel`, `pipelines.loop.Component`). CogVideoX's T5-XXL is
  ~9.5 GB in bf16 and LongCat's umT5 ~11 GB. On an H200 (session 5,
  bench/results/session5_h200/1_load_speed.txt) T5-XXL read from a warm page cache to the device
  in 0.50 s (1.24 s the first time in a process, which compiles the layout programs). Filling
  pinned host memory with it at load time had cost ~8 s.
- "model": the text encoder as under "text"; the denoiser and the VAE wait in pinned host memory
  and are on the device only while they run, as diffusers' `enable_model_cpu_offload()`.
- "blocks": as "model" for the VAE; the denoiser's stacked blocks stay in pinned host memory for
  good and each layer's weights are copied in inside the jitted layer scan (`stream_in`, called by
  the models' scan bodies), so the device holds a layer or two at a time and XLA can overlap the
  next layer's copy with the current layer's compute. The text encoder is read on demand as under
  "text", but its stacked blocks are read into pinned host memory and stream the same way (only its
  embeddings and final norm go to the device): T5-XXL whole is ~9.5 GB, more than the 8 GiB a
  CogVideoX-5b run under "blocks" is meant to fit in (session 6 measured a 9.67 GiB peak with it).

A text encoder passed to a pipeline as a loaded module (not through `from_pretrained`) has no
checkpoint to read again. Under "text" / "model" / "blocks" it is parked in pinned host memory
instead.

Loading puts parked weights straight into pinned host memory (`host_paths` tells the loader which;
a 27 GB LongCat DiT under "model"/"blocks" never touches the device while loading). Parking a
state that is on the device copies it into `SingleDeviceSharding(memory_kind="pinned_host")` and deletes the
device buffers as soon as the host copy exists (no second device copy lingers); bringing a
component in makes a device copy for the duration of a `resident` block and deletes it after.

Backends without a pinned_host memory kind (checked per device) keep everything on the device and
say so once in the log; jax's CPU backend has pinned_host (0.10.2 and later), so the same code
path runs in the CPU tests (there both kinds are host RAM).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import SingleDeviceSharding

__all__ = ["OFFLOAD_POLICIES", "DEFAULT_POLICY", "Offload", "check_policy", "delete_arrays", "memory_kinds",
           "stream_in"]

log = logging.getLogger(__name__)

OFFLOAD_POLICIES = ("none", "text", "model", "blocks")
DEFAULT_POLICY = "text"
HOST_KIND = "pinned_host"
# Component names as the pipelines call them; a denoiser or text encoder maps to its stacked-blocks
# attribute (CogVideoX: transformer.transformer_blocks, LongCat: dit.blocks, T5: blocks), which
# "blocks" streams.
TEXT_ENCODERS = frozenset({"text_encoder"})
DENOISER_BLOCKS = {"transformer": "transformer_blocks", "dit": "blocks"}
STREAMED_BLOCKS = {**DENOISER_BLOCKS, "text_encoder": "blocks"}
_PARKED_WHOLE = {
    "none": frozenset(),
    "text": TEXT_ENCODERS,
    "model": TEXT_ENCODERS | {"vae"} | frozenset(DENOISER_BLOCKS),
    "blocks": frozenset({"vae"}),  # + the streamed blocks, see Offload.park
}


def check_policy(policy: str | None) -> str:
    """The policy name (None: the default, "text"); ValueError naming the choices otherwise."""
    if policy is None:
        return DEFAULT_POLICY
    if policy not in OFFLOAD_POLICIES:
        raise ValueError(f"offload={policy!r}; expected one of {OFFLOAD_POLICIES}")
    return policy


def memory_kinds(tree: Any) -> set[str]:
    """The memory kinds the arrays of a pytree live in (e.g. {"device"}, {"pinned_host"})."""
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)}


def _device_memory_kinds(device: Any) -> set[str]:
    try:
        return {m.kind for m in device.addressable_memories()}
    except (AttributeError, NotImplementedError, RuntimeError):  # backends without memory spaces
        return set()


def delete_arrays(tree: Any) -> None:
    """Free the buffers of every array in a pytree now (any other reference to them becomes invalid)."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


class Offload:
    """Moves component states (pytrees of arrays) between device memory and pinned host memory.

    `policy` as in the module docstring; `device`: the one device the pipeline runs on (default
    the first). If that device has no pinned_host memory, the policy falls back to "none" with a
    warning (`requested` keeps what was asked for).
    """

    def __init__(self, policy: str | None = None, device: Any = None):
        self.requested = check_policy(policy)
        self.policy = self.requested
        self.device = device if device is not None else jax.devices()[0]
        if self.policy != "none" and HOST_KIND not in _device_memory_kinds(self.device):
            log.warning("offload=%r: device %s has no %s memory (jax %s), so no component waits in host memory "
                        "(the text encoder is still read from its checkpoint on demand)",
                        self.policy, self.device, HOST_KIND, jax.__version__)
            self.policy = "none"
        if self.policy != "none":
            self._host = SingleDeviceSharding(self.device, memory_kind=HOST_KIND)
            self._dev = SingleDeviceSharding(self.device, memory_kind="device")

    def on_demand(self, name: str) -> bool:
        """Whether component `name` is checked at load time and read from its checkpoint each time it
        runs, kept nowhere in between: the text encoder under every policy but "none". This needs no
        pinned host memory, so it follows the requested policy even where parking fell back to "none"."""
        return self.requested != "none" and name in TEXT_ENCODERS

    def parks(self, name: str) -> bool:
        """Whether the whole component `name` waits in host memory between uses."""
        return name in _PARKED_WHOLE[self.policy]

    def streams(self, name: str) -> bool:
        """Whether the component's stacked blocks stay in host memory and stream in inside the scan."""
        return self.policy == "blocks" and name in STREAMED_BLOCKS

    def host_paths(self, name: str) -> Callable[[str], bool] | None:
        """For the loader (models.loading.load_model(host=...)): which of component `name`'s Params
        ('.'-joined paths) this policy keeps in pinned host memory, so they load straight there and
        never pass through the device; None when the whole component lives on the device."""
        if self.parks(name):
            return lambda path: True
        if self.streams(name):
            prefix = STREAMED_BLOCKS[name] + "."
            return lambda path: path.startswith(prefix)
        return None

    def _to_host(self, tree: Any) -> Any:
        # Not device_put(donate=True): jax 0.10 answers "Donation across different memory kinds is
        # not implemented", so copy, wait, then delete the device buffers ourselves.
        if memory_kinds(tree) <= {HOST_KIND}:
            return tree  # already parked
        host = jax.block_until_ready(jax.device_put(tree, self._host))
        delete_arrays(tree)
        return host

    def park(self, name: str, state: Any) -> Any:
        """`state` with the parts this policy keeps on the host moved there (unchanged otherwise)."""
        if self.parks(name):
            return self._to_host(state)
        if not self.streams(name):
            return state
        blocks = STREAMED_BLOCKS[name]

        def move(path: Any, leaf: Any) -> Any:
            first = path[0] if path else None
            key = getattr(first, "key", getattr(first, "name", None))
            if isinstance(leaf, jax.Array) and key == blocks:
                return self._to_host(leaf)
            return leaf

        return jax.tree_util.tree_map_with_path(move, state)

    def park_module(self, name: str, module: Any) -> None:
        """Park a freshly loaded NNX module's weights now (before the next component loads), so
        loading never holds two parked components on the device; the module sees the parked arrays."""
        from flax import nnx

        if self.parks(name) or self.streams(name):
            nnx.update(module, self.park(name, nnx.state(module)))

    @contextlib.contextmanager
    def resident(self, name: str, state: Any) -> Iterator[Any]:
        """The state on the device for the duration of the block (a temporary copy if parked).

        Whatever the block computes from the state must be finished (block_until_ready) or at least
        dispatched before the block ends (JAX keeps buffers alive for computations in flight);
        the temporary copy is deleted on exit. Streamed blocks stay on the host (the scan copies them).
        """
        if not self.parks(name):
            yield state
            return
        on_device = jax.device_put(state, self._dev)
        try:
            yield on_device
        finally:
            jax.block_until_ready(on_device)
            delete_arrays(on_device)


def stream_in(tree: Any) -> Any:
    """Inside a jitted function: host-resident leaves copied to device memory, the rest unchanged.

    The models call this on each layer's weights inside their layer scan, so weights parked with
    offload="blocks" arrive one layer at a time; for device-resident weights it does nothing.
    """

    def move(x: Any) -> Any:
        if getattr(jax.typeof(x), "memory_space", None) == jax.memory.Space.Host:
            return jax.device_put(x, jax.memory.Space.Device)
        return x

    return jax.tree.map(move, tree)
