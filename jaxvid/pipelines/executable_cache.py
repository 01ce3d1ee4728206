"""Compiled executables kept on disk under a key computed without tracing, so a warm process skips JAX's tracing and lowering.

JAX's persistent compilation cache (jaxvid.compile_cache) saves XLA's work, but its key is a hash of
the lowered program: a warm process still traces every jitted function to a jaxpr and lowers it to
MLIR before it can look the program up (~3-5 s for a CogVideoX pipeline, most of it the VAE tile
programs; the same at any video size). This store keys the serialized executable
(`jax.experimental.serialize_executable`) by what *determines* the program instead:

    the function (module + qualname, its module file's digest), a description of the static
    arguments (an NNX GraphDef, frozen config dataclasses, tuples, numbers, ...), the dynamic
    arguments' pytree structure, shapes, dtypes, weak types, shardings / memory kinds, the
    donated positions, the compiler options, JAX's trace-time configuration, jax / jaxlib / flax
    versions, the backend and device kinds, XLA_FLAGS and $JAXVID_* variables, and a digest of
    the source files of jaxvid and pallas_kernels (any code change misses).

The key assumes what the docstring of every jitted stage already promises: the program depends on
its arguments, its source and JAX's configuration, not on mutable module state read while tracing.
`describe_static` gives a value's description from its contents only (never `repr`, which may hold
a memory address): an object it cannot describe (a closure, a bound method, a class of its own)
raises `Uncacheable`, and the caller compiles as before and stores nothing. A wrong hit is never
traded for a faster start.

Entries live in `<compile cache dir>/jaxvid-executables/<key>.jaxexe`: a magic line, the sha256 of the
payload and the payload (pickled executable + pytree structures), written to a temporary file and
renamed. A missing, truncated or unreadable entry is a miss: the caller compiles and writes it again.
`$JAXVID_EXECUTABLE_CACHE=off` turns this store off alone; it is off whenever the compilation cache is.
Loading an entry runs code from the folder, as JAX's own cache does: it is created owner-only (0o700).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
import os
import pickle
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxvid import compile_cache

log = logging.getLogger(__name__)

ENV_VAR = "JAXVID_EXECUTABLE_CACHE"
SUBFOLDER = "jaxvid-executables"
# Recorded (jax.monitoring) for every executable read from this store; CompileCounter counts them.
LOAD_EVENT = compile_cache.EXECUTABLE_LOAD_EVENT
_MAGIC = b"jaxvid-executable 1\n"
_FORMAT = 1
_OFF = {"0", "off", "false", "no", "none"}
_SWITCHES = {ENV_VAR, compile_cache.ENV_VAR}  # where the caches are, not what a program is
_MAX_DEPTH = 400
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
# The packages whose source decides what our programs are (the pipelines, models, kernels).
_SOURCE_PACKAGES = ("jaxvid", "pallas_kernels")


class Uncacheable(Exception):
    """A value has no description that is the same in every process (the caller does not use the store)."""


# ------------------------------------------------------------------------------ descriptions


def _path_of(obj: Any) -> str:
    """`module.qualname` of a module-level class or function, checked to name this very object."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module == "builtins" and isinstance(obj, type) and "." not in str(qualname):
        return f"builtins.{qualname}"  # NoneType and friends are not attributes of builtins
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        raise Uncacheable(f"{obj!r:.80} is not a module-level class or function")
    target: Any = sys.modules.get(module)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if target is not obj:
        raise Uncacheable(f"{module}.{qualname} does not name {obj!r:.80}")
    return f"{module}.{qualname}"


def _treedef(tree: Any, depth: int) -> tuple:
    if tree.num_nodes == 1 and tree.num_leaves == 1:
        return ("*",)
    kind, data = tree.node_data()
    return ("node", _path_of(kind), _canon(data, depth), tuple(_treedef(c, depth + 1) for c in tree.children()))


def _jax_object(obj: Any, depth: int) -> tuple | None:
    """Devices, meshes, shardings and JAX's trace context objects; None for anything else."""
    from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

    if isinstance(obj, jax.Device):
        return ("device", obj.platform, obj.id, obj.device_kind)
    if isinstance(obj, Mesh):
        return ("mesh", _canon(tuple(obj.axis_names), depth), tuple(obj.devices.shape),
                tuple(_canon(d, depth) for d in obj.devices.flat), _canon(getattr(obj, "axis_types", None), depth))
    if isinstance(obj, AbstractMesh):
        return ("abstract mesh", _canon(tuple(obj.axis_names), depth), tuple(obj.axis_sizes),
                _canon(getattr(obj, "axis_types", None), depth))
    if isinstance(obj, NamedSharding):
        return ("named sharding", _canon(obj.mesh, depth), _canon(obj.spec, depth), obj.memory_kind)
    if isinstance(obj, SingleDeviceSharding):
        return ("single device", _canon(next(iter(obj.device_set)), depth), obj.memory_kind)
    if isinstance(obj, PartitionSpec):
        text = repr(obj)  # names and None only; checked for an address all the same
        if _ADDRESS.search(text):
            raise Uncacheable(f"PartitionSpec {text:.80}")
        return ("partition spec", text)
    if type(obj).__name__ == "AxisEnv" and type(obj).__module__ == "jax._src.core":  # in the trace context
        return ("axis env", tuple((s, _canon(getattr(obj, s), depth)) for s in type(obj).__slots__ if s != "__weakref__"))
    return None


def _canon(obj: Any, depth: int = 0) -> Any:
    """A nested tuple of str / int / float / bool / bytes / None that describes `obj` by value."""
    if depth > _MAX_DEPTH:
        raise Uncacheable("nested too deeply")
    d = depth + 1
    kind = type(obj)
    if obj is None or kind in (bool, int, float, complex, str, bytes):
        return (kind.__name__, obj)
    if isinstance(obj, enum.Enum):
        return ("enum", _path_of(kind), obj.name)
    if isinstance(obj, type):
        return ("type", _path_of(obj))
    if isinstance(obj, np.dtype):
        return ("dtype", obj.str, obj.name)
    if isinstance(obj, np.generic):
        return ("np", obj.dtype.str, obj.tobytes())
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise Uncacheable("a numpy array of Python objects")
        return ("ndarray", obj.dtype.str, obj.shape, hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest())
    if isinstance(obj, jax.tree_util.PyTreeDef):
        return ("treedef", _treedef(obj, d))
    if isinstance(obj, tuple) and hasattr(kind, "_fields"):  # a NamedTuple
        return ("namedtuple", _path_of(kind), tuple((f, _canon(getattr(obj, f), d)) for f in kind._fields))
    if kind in (tuple, list):
        return (kind.__name__, tuple(_canon(x, d) for x in obj))
    if isinstance(obj, (set, frozenset)):
        return ("set", tuple(sorted((_canon(x, d) for x in obj), key=repr)))
    if isinstance(obj, Mapping):
        items = sorted(((_canon(k, d), _canon(v, d)) for k, v in obj.items()), key=repr)
        return ("map", _path_of(kind), tuple(items))
    if dataclasses.is_dataclass(obj):
        fields = []
        for f in dataclasses.fields(obj):
            try:
                fields.append((f.name, _canon(getattr(obj, f.name), d)))
            except Uncacheable as e:  # say where, for the debug log
                raise Uncacheable(f"{kind.__name__}.{f.name}: {e}") from None
        return ("dataclass", _path_of(kind), tuple(fields))
    if isinstance(obj, functools.partial):
        return ("partial", _canon(obj.func, d), _canon(obj.args, d), _canon(dict(obj.keywords), d))
    jax_obj = _jax_object(obj, d)
    if jax_obj is not None:
        return jax_obj
    if callable(obj) and not inspect.ismethod(obj):
        # module-level functions (also jitted and ufunc-like JAX objects): their name says what they do
        return ("callable", _path_of(obj))
    raise Uncacheable(f"no stable description for a {kind.__module__}.{kind.__qualname__}")


def describe_static(obj: Any) -> str:
    """A description of `obj` that is the same in every process for equal values; raises Uncacheable."""
    return repr(_canon(obj))


# ------------------------------------------------------------------------------ the key


@functools.cache
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.cache
def source_digest() -> str:
    """sha256 over the .py files of jaxvid and pallas_kernels (relative paths and contents)."""
    h = hashlib.sha256()
    for package in _SOURCE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            h.update(f"{package}: absent\n".encode())
            continue
        for root in spec.submodule_search_locations:
            for file in sorted(Path(root).rglob("*.py")):
                h.update(f"{package}/{file.relative_to(root).as_posix()}\n".encode())
                h.update(file.read_bytes())
    return h.hexdigest()


def _function_identity(fn: Callable[..., Any]) -> tuple:
    name = _path_of(fn)
    if getattr(fn, "__closure__", None):
        raise Uncacheable(f"{name} closes over variables")
    source = inspect.getsourcefile(fn)
    if source is None or not os.path.isfile(source):
        raise Uncacheable(f"{name}: no source file")
    return (name, _file_digest(source))


def _leaf(x: Any, shardings: dict[Any, Any]) -> tuple:
    """What an executable depends on for one dynamic argument (`shardings`: descriptions so far)."""
    if isinstance(x, jax.Array):
        if x.sharding not in shardings:  # a few distinct ones for hundreds of weights
            shardings[x.sharding] = _canon(x.sharding)
        return ("array", tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
                shardings[x.sharding], bool(getattr(x, "committed", True)))
    if isinstance(x, (np.ndarray, np.generic)):
        return ("host array", tuple(x.shape), str(x.dtype))
    if type(x) in (bool, int, float, complex):
        return ("python scalar", type(x).__name__)  # traced as a weak-typed 0-d value: its value does not matter
    raise Uncacheable(f"a dynamic argument of type {type(x).__name__}")


def _environment() -> tuple:
    import flax
    import jaxlib
    from jax._src import config as jax_config  # trace-time flags (x64, matmul precision, ...), as jit keys them

    try:
        trace_context = _canon(jax_config.trace_context())
    except AttributeError as e:
        raise Uncacheable(f"this JAX has no trace context to key on ({e})") from e
    devices = jax.devices()
    return (jax.__version__, jaxlib.__version__, flax.__version__, sys.version_info[:2],
            jax.default_backend(), tuple(sorted({(d.platform, d.device_kind) for d in devices})), len(devices),
            os.environ.get("XLA_FLAGS", ""),
            tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("JAXVID_") and k not in _SWITCHES)),
            trace_context, source_digest())


class StaticDescriptions:
    """`describe_static`, remembered by object identity: static arguments are immutable (jit hashes
    them), and one GraphDef object serves many calls (the VAE's four tile programs)."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._memo: dict[int, tuple[Any, str]] = {}

    def __call__(self, obj: Any) -> str:
        hit = self._memo.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        text = describe_static(obj)
        if len(self._memo) >= self.limit:
            self._memo.clear()
        self._memo[id(obj)] = (obj, text)  # the object is kept, so its id is not reused meanwhile
        return text


def executable_key(fn: Callable[..., Any], static_args: Sequence[Any], dynamic_args: Sequence[Any],
                   donate_argnums: Sequence[int], options: Mapping[str, Any],
                   describe: Callable[[Any], str] = describe_static) -> str:
    """The hex key of the executable `jax.jit(fn)` builds for these arguments, computed without
    tracing; raises Uncacheable when something in it has no process-independent description.
    `describe` describes one static argument (a `StaticDescriptions` to remember them)."""
    leaves, tree = jax.tree.flatten(list(dynamic_args))
    shardings: dict[Any, Any] = {}
    parts = (_FORMAT, _function_identity(fn), tuple(describe(a) for a in static_args), ("treedef", _treedef(tree, 0)),
             tuple(_leaf(x, shardings) for x in leaves), tuple(sorted(donate_argnums)), _canon(dict(options)),
             _canon(jax.sharding.get_mesh()), _environment())
    return hashlib.sha256(repr(parts).encode()).hexdigest()


# ------------------------------------------------------------------------------ the store


def _serializable(compiled: Any) -> str | None:
    """Why `compiled` must not be stored (host callbacks, effects, kept Python objects), or None."""
    unloaded = getattr(getattr(compiled, "_executable", None), "_unloaded_executable", None)
    if unloaded is None:
        return "this executable has no serializable form"
    for field in ("host_callbacks", "keepalive", "ordered_effects", "unordered_effects"):
        if getattr(unloaded, field, None):
            return f"it holds {field.replace('_', ' ')}"
    if getattr(unloaded, "pgle_profiler", None) is not None:
        return "it is profiled for PGLE (recompiled later)"
    mut = getattr(unloaded, "mut", None)
    if mut is not None and getattr(mut, "in_mut", None):
        return "it holds mutable array refs"
    return None


def _load_mosaic_gpu_runtime() -> bool:
    """Import Mosaic GPU (which loads its runtime library); False where this jaxlib has none."""
    try:
        importlib.import_module("jax.experimental.mosaic.gpu")
    except Exception:  # noqa: BLE001 - an installation without it cannot load such programs anyway
        return False
    return True


class ExecutableStore:
    """Serialized executables in one folder, one file per key (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.jaxexe"

    def load(self, key: str, dynamic_args: Sequence[Any], name: str = "") -> Any | None:
        """The stored executable for `key` as a `jax.stages.Compiled`, or None (missing, unreadable,
        or not for these arguments: logged, never raised)."""
        file = self.path(key)
        try:
            blob = file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.info("executable cache: cannot read %s (%s); compiling %s", file, e, name)
            return None
        t0 = time.perf_counter()
        try:
            try:
                compiled = self._decode(blob, dynamic_args)
            except Exception as e:
                # A program holding a Mosaic GPU kernel (our Pallas attention kernels) resolves host
                # symbols of Mosaic GPU's runtime library when it loads; the traced path imports it
                # while lowering the kernel, a warm process that never traces has not (H200,
                # session 7: "Failed to lookup host symbol ... anonymous_mosaic_gpu").
                if "mosaic_gpu" not in str(e) or not _load_mosaic_gpu_runtime():
                    raise
                compiled = self._decode(blob, dynamic_args)
        except Exception as e:  # a damaged or foreign entry must never stop a run: compile instead
            log.info("executable cache: %s is unusable (%s: %s); compiling %s", file.name, type(e).__name__,
                     str(e)[:200], name)
            return None
        jax.monitoring.record_event_duration_secs(LOAD_EVENT, time.perf_counter() - t0)
        return compiled

    @staticmethod
    def _decode(blob: bytes, dynamic_args: Sequence[Any]) -> Any:
        from jax.experimental.serialize_executable import deserialize_and_load

        head = len(_MAGIC) + 32
        if not blob.startswith(_MAGIC) or hashlib.sha256(blob[head:]).digest() != blob[len(_MAGIC):head]:
            raise ValueError("bad header or checksum")
        entry = pickle.loads(blob[head:])
        in_tree = jax.tree.structure((tuple(dynamic_args), {}))
        if entry["in_tree"] != in_tree:
            raise ValueError("stored for other argument structures")
        leaves = jax.tree.leaves(list(dynamic_args))
        # the backend the arguments live on (the key holds their devices)
        device = next(iter(leaves[0].devices())) if leaves and isinstance(leaves[0], jax.Array) else jax.devices()[0]
        client = device.client
        return deserialize_and_load(entry["executable"], entry["in_tree"], entry["out_tree"], backend=client)

    def save(self, key: str, compiled: Any, name: str = "") -> bool:
        """Write `compiled` under `key` (whole or not at all); False when it cannot be stored (logged)."""
        from jax.experimental.serialize_executable import serialize

        why = _serializable(compiled)
        if why is None:
            try:
                data, in_tree, out_tree = serialize(compiled)
                payload = pickle.dumps({"executable": data, "in_tree": in_tree, "out_tree": out_tree},
                                       protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # e.g. a pytree node type pickle cannot name
                why = f"{type(e).__name__}: {str(e)[:200]}"
        if why is not None:
            log.debug("executable cache: not storing %s (%s)", name, why)
            return False
        tmp: str | None = None
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".jaxexe")
            with os.fdopen(fd, "wb") as out:
                out.write(_MAGIC + hashlib.sha256(payload).digest() + payload)
            os.replace(tmp, self.path(key))
        except OSError as e:
            log.info("executable cache: cannot write %s (%s)", self.path(key), e)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return False
        return True


def store_in_use() -> ExecutableStore | None:
    """The store next to JAX's persistent compilation cache, or None when that cache is off or
    $JAXVID_EXECUTABLE_CACHE says off."""
    folder = compile_cache.cache_dir_in_use()
    if not folder or os.environ.get(ENV_VAR, "on").strip().lower() in _OFF:
        return None
    return ExecutableStore(Path(folder) / SUBFOLDER)
