"""The one denoising loop both pipelines share, and everything around it that is not model-specific.

    Component(module)                   a loaded NNX module split once: graphdef (static) + state (jit argument),
                                        or a checkpoint read to the device each time it runs (on demand)
    CompiledFunction(fn, static_argnums)  jit with an explicit executable cache (in memory, and on disk
                                        without tracing: executable_cache): compile time reported apart
    StepProgress                        the tqdm bar a jitted loop ticks through jax.debug.callback
    guided_prediction(predict, x, ...)  classifier-free guidance by batch doubling [uncond; cond], any rule
    with_plan_switch(plan, step, run)   the attention plan's dense timesteps: lax.cond on the traced step
    denoise_loop(step_fn, carry, steps)  the lax.fori_loop over steps (all, or a traced StepRange)
    run_steps(run_range, carry, n)      drives that jitted loop from the host: progress and callbacks

A pipeline writes only its model-specific step (`step_fn(i, carry) -> carry`: the model call, its
guidance rule, its scheduler) and runs it through `denoise_loop` inside one jitted function. The
step index is traced, so anything that depends on it (timestep, guidance scale, dense-vs-sparse
attention) must be an array lookup or a `lax.cond` inside `step_fn`, never a Python branch.

Compile once, ever: JAX's persistent compilation cache (jaxvid.compile_cache) never stores a
program that holds a host callback, so a pipeline that wants its loop cached takes the step range
as a traced argument (`StepRange`) and lets `run_steps` call the one executable for one step at a
time when a progress bar or a per-step callback is on (for all steps at once otherwise): the same
executable and the same numbers either way, and the bar ticks on the host.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxvid.attention.plan import AttentionPlan
from jaxvid.compile_cache import CompileCounter, compiler_options, describe
from jaxvid.models.loading import OnDemandModel
from jaxvid.models.offload import Offload, delete_arrays
from jaxvid.pipelines.executable_cache import ExecutableStore, StaticDescriptions, Uncacheable, executable_key
from jaxvid.pipelines.executable_cache import store_in_use as executable_store_in_use
from jaxvid.schedulers.guidance import split_cfg_batch

__all__ = ["Component", "CompiledFunction", "StepProgress", "StepRange", "denoise_loop", "guided_prediction",
           "pad_step_tables", "run_steps", "with_plan_switch"]

Carry = TypeVar("Carry")
log = logging.getLogger(__name__)


class Component:
    """A loaded NNX module split once into its graphdef (static) and state (the jit argument).

    Jitted stages take `(component.graphdef, state, ...)` with `with component.resident() as
    state:`. The weights are arguments, never constants. A pipeline keeps its networks as
    Components, and placement lives here. With an `offload` (jaxvid.models.offload.Offload), the
    state waits in pinned host memory as the policy says for `name`, and `resident()` puts it on
    the device while a stage runs. Call `refresh()` after changing the module.

    `module` may instead be a `jaxvid.models.loading.OnDemandModel`: a checkpoint that was checked
    and not read (the pipelines' text encoder under every offload policy except "none"). Then
    nothing is kept: each `resident()` reads the weights from the checkpoint straight to the
    device and deletes them when the block ends. `graphdef` and `cfg` still work. `state` and
    `module` raise a ValueError saying so; `load_module()` gives a device copy the caller owns.
    """

    def __init__(self, module: nnx.Module | OnDemandModel, name: str = "", offload: Offload | None = None,
                 progress: bool = True):
        self.name, self.offload, self.progress = name, offload, progress  # progress: the on-demand read's bar
        self.on_demand: OnDemandModel | None = module if isinstance(module, OnDemandModel) else None
        self._module: nnx.Module | None = None if self.on_demand is not None else module
        self._state: nnx.State | None = None
        if self.on_demand is not None:
            self.graphdef: nnx.GraphDef = self.on_demand.graphdef
        else:
            self.refresh()

    def _not_kept(self, what: str) -> ValueError:
        return ValueError(
            f"{self.name or 'this component'}.{what}: its weights are not kept in memory; they are read "
            f"from {self.on_demand.what} each time it runs (offload={getattr(self.offload, 'requested', None)!r}). "
            "Use `with component.resident() as state:` or `component.load_module()` (a device copy you own), "
            "or load the pipeline with offload='none' to keep them resident")

    @property
    def module(self) -> nnx.Module:
        """The loaded module (ValueError for an on-demand component: see `load_module`)."""
        if self._module is None:
            raise self._not_kept("module")
        return self._module

    @property
    def state(self) -> nnx.State:
        """The module's state where the policy keeps it (ValueError for an on-demand component)."""
        if self._state is None:
            raise self._not_kept("state")
        return self._state

    @module.setter
    def module(self, module: nnx.Module) -> None:
        if self.on_demand is not None:
            raise self._not_kept("module")
        self._module = module

    @state.setter
    def state(self, state: nnx.State) -> None:
        """Replace the kept state (LoRA fusing sets it and the module together, see lora_cogvideox)."""
        if self.on_demand is not None:
            raise self._not_kept("state")
        self._state = state

    @property
    def cfg(self) -> Any:
        return self.on_demand.cfg if self.on_demand is not None else self.module.cfg

    def refresh(self) -> None:
        """Split the module again (its structure or weights changed), parking its state per the offload policy."""
        if self.on_demand is not None:
            raise self._not_kept("refresh()")
        if self.offload is not None:
            self.offload.park_module(self.name, self._module)  # the module holds the parked arrays too
        self.graphdef, self._state = nnx.split(self._module)

    def load_module(self) -> nnx.Module:
        """The module with its weights: the kept module itself, or for an on-demand component a new
        copy read from its checkpoint to the device, which the caller owns (nothing else refers to
        it; it is freed when the caller drops it)."""
        if self.on_demand is None:
            return self.module
        return self._read_on_demand()

    def _read_on_demand(self) -> nnx.Module:
        t0 = time.perf_counter()
        # offload="blocks": the stacked blocks are read into pinned host memory and stream in inside the scan
        streams = self.offload is not None and self.offload.streams(self.name)
        host = self.offload.host_paths(self.name) if streams else None
        module = self.on_demand.load(host=host, desc=f"reading {self.name or 'weights'}", progress=self.progress)
        jax.block_until_ready(nnx.state(module))
        log.info("%s: read %.2f GB from %s to the device%s in %.2f s (on demand)",
                 self.name or "component", self.on_demand.nbytes / 1e9, self.on_demand.what,
                 " (stacked blocks to pinned host memory)" if streams else "", time.perf_counter() - t0)
        return module

    @contextlib.contextmanager
    def resident(self) -> Iterator[nnx.State]:
        """The state with everything a stage needs on the device for the block's duration: a
        temporary device copy when parked, or the weights just read from the checkpoint when on
        demand (deleted when the block ends). Streamed blocks stay on the host; the model copies them in."""
        if self.on_demand is not None:
            state = nnx.state(self._read_on_demand())
            try:
                yield state
            finally:
                jax.block_until_ready(state)  # computations dispatched in the block still need them
                delete_arrays(state)
            return
        if self.offload is None:
            yield self.state
            return
        with self.offload.resident(self.name, self.state) as state:
            yield state


class StepProgress:
    """A tqdm bar fed from inside a jitted loop through `jax.debug.callback`.

    Owned by a pipeline object (no global state): call `start(total)` before running the jitted
    function and `close()` after it; the callback only ticks the bar that is current then.
    """

    def __init__(self, desc: str = "denoising", enabled: bool = True):
        self.desc, self.enabled = desc, enabled
        self._bar: Any = None
        self.step_times: list[float] = []

    def start(self, total: int) -> None:
        self.step_times = []
        self._t = time.perf_counter()
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit="step")

    def tick(self, step) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self._t)
        self._t = now
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def seconds_per_step(self) -> float:
        """Mean time between ticks after the first (the first also holds dispatch latency); nan if none."""
        times = self.step_times[1:] or self.step_times
        return float(sum(times) / len(times)) if times else float("nan")


def _abstract_key(x: Any) -> Hashable:
    """What a compiled executable depends on for one dynamic leaf: shape, dtype, weak type, memory kind."""
    if isinstance(x, jax.Array) or hasattr(x, "shape"):
        # the memory kind too: weights parked in host memory (offload) compile to another program
        kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
        return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), kind)
    return (type(x).__name__, x)  # Python scalars: jit treats them as weak-typed 0-d values


class CompiledFunction:
    """`jax.jit(fn, static_argnums=...)` with an explicit ahead-of-time executable cache.

    Each call looks up an executable by (static argument values, pytree structure, shapes and
    dtypes of the dynamic arguments); a miss lowers and compiles once and records the time it took
    in `last_compile_seconds` (0.0 on a hit). `num_compiled` counts distinct executables, so a test
    can check that a second call with the same shapes did not compile again. `donate_argnums`: as
    jax.jit's; the denoising loops donate their carry, so the latents (and a step cache's kept
    attention outputs) are updated in place instead of held twice.

    With the persistent compilation cache on, a miss first looks in jaxvid's executable store
    (jaxvid.pipelines.executable_cache) under a key computed without tracing: a hit loads the
    serialized executable and skips tracing, lowering and JAX's cache lookup (a warm process's
    "compile" time); a compiled one is stored there for the next process. Arguments the store
    cannot describe (see `describe_static`) take the plain path: trace, lower, JAX's cache.
    """

    def __init__(self, fn: Callable[..., Any], *, static_argnums: Sequence[int] = (),
                 donate_argnums: Sequence[int] = (), name: str | None = None, stage: str = "default"):
        self.name = name or getattr(fn, "__name__", "function").strip("_")
        compiler_options(stage=stage)  # an unknown stage fails here, not at the first call
        self._stage = stage  # compile_cache.compiler_options: the VAE's programs may autotune apart
        self._fn = fn
        self._static = tuple(sorted(static_argnums))
        self._donate = tuple(sorted(donate_argnums))
        # donated arguments (positions in fn's signature) are consumed by a call: XLA writes the
        # outputs into their buffers (a loop's carry), and the caller's arrays are deleted
        self._jit = jax.jit(fn, static_argnums=self._static, donate_argnums=self._donate)
        self._executables: dict[Hashable, Any] = {}
        self._describe = StaticDescriptions()  # static arguments -> executable store key parts
        self.last_compile_seconds = 0.0

    @property
    def num_compiled(self) -> int:
        return len(self._executables)

    def _dynamic(self, args: tuple[Any, ...]) -> list[Any]:
        return [a for i, a in enumerate(args) if i not in self._static]

    def _key(self, args: tuple[Any, ...]) -> Hashable:
        static = tuple(args[i] for i in self._static)
        leaves, treedef = jax.tree.flatten(self._dynamic(args))
        # the device mesh set around the call (jaxvid.parallel.mesh_context) changes the executable
        return static, treedef, tuple(_abstract_key(x) for x in leaves), jax.sharding.get_mesh()

    def _stored_key(self, args: tuple[Any, ...]) -> tuple[ExecutableStore | None, str | None]:
        """The executable store in use and these arguments' key there; (store, None) when they have none."""
        store = executable_store_in_use()
        if store is None:
            return None, None
        try:
            return store, executable_key(self._fn, [args[i] for i in self._static], self._dynamic(args),
                                         self._donate, compiler_options(stage=self._stage), self._describe)
        except Uncacheable as e:
            log.info("%s: not using the executable cache (%s)", self.name, e)
        except Exception as e:  # a bug in describing must not stop a run: take the plain path
            log.info("%s: not using the executable cache (%s: %s)", self.name, type(e).__name__, e)
        return store, None

    def _load_stored(self, args: tuple[Any, ...]) -> tuple[Any, Callable[[Any], None]]:
        """(the stored executable or None, a function that stores a compiled one for next time)."""
        store, disk_key = self._stored_key(args)
        if store is None or disk_key is None:
            return None, lambda compiled: None
        return (store.load(disk_key, self._dynamic(args), self.name),
                lambda compiled: store.save(disk_key, compiled, self.name))

    def prepare(self, *args: Any) -> float:
        """Compile for these arguments unless cached; returns the seconds spent compiling (0.0 on a hit)."""
        key = self._key(args)
        self.last_compile_seconds = 0.0
        if key not in self._executables:
            # Say what is compiling (a first run can take a while) and whether a cache served it.
            t0 = time.perf_counter()
            with CompileCounter() as counter:
                executable, keep = self._load_stored(args)
                if executable is None:
                    log.info("compiling %s for these shapes...", self.name)
                    executable = self._jit.lower(*args).compile(compiler_options(stage=self._stage))
                    keep(executable)
                self._executables[key] = executable
            self.last_compile_seconds = time.perf_counter() - t0
            log.info("%s", describe(counter, self.name))
        return self.last_compile_seconds

    def prepare_many(self, arg_sets: Sequence[tuple[Any, ...]]) -> float:
        """Compile the executables of several argument sets at once: lowered one by one, compiled in
        parallel threads (XLA compiles without the GIL). Returns the wall seconds spent (0.0 if all
        were compiled before). The tiled VAE decode uses it for its (at most four) tile shapes.
        """
        from concurrent.futures import ThreadPoolExecutor

        todo: dict[Hashable, tuple[Any, ...]] = {}
        for args in arg_sets:
            key = self._key(args)
            if key not in self._executables:
                todo.setdefault(key, args)
        self.last_compile_seconds = 0.0
        if not todo:
            return 0.0
        t0 = time.perf_counter()
        with CompileCounter() as counter:
            # stored executables load side by side (a GPU one takes ~0.6 s, mostly outside the GIL)
            with ThreadPoolExecutor(max_workers=min(len(todo), 4)) as pool:
                loaded = dict(zip(todo, pool.map(self._load_stored, todo.values())))
            keepers = {}
            for key, (executable, keepers[key]) in loaded.items():
                if executable is not None:
                    self._executables[key] = executable
            missing = {key: args for key, args in todo.items() if key not in self._executables}
            if missing:
                log.info("compiling %s for %d shapes...", self.name, len(missing))
                lowered = {key: self._jit.lower(*args) for key, args in missing.items()}
                options = compiler_options(stage=self._stage)
                with ThreadPoolExecutor(max_workers=min(len(lowered), 4)) as pool:
                    compiled = dict(zip(lowered, pool.map(lambda low: low.compile(options), lowered.values())))
                for key, executable in compiled.items():
                    keepers[key](executable)
                self._executables.update(compiled)
        self.last_compile_seconds = time.perf_counter() - t0
        log.info("%s", describe(counter, self.name))
        return self.last_compile_seconds

    def __call__(self, *args: Any) -> Any:
        """Run (compiling first if needed; see `last_compile_seconds`)."""
        compile_seconds = self.prepare(*args)
        out = self._executables[self._key(args)](*self._dynamic(args))
        self.last_compile_seconds = compile_seconds
        return out


def guided_prediction(
    predict: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    *,
    do_cfg: bool,
    combine: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """The model's prediction for latents x [B, ...], guided when `do_cfg` (static).

    Under CFG the model sees the batch doubled as [x; x] (its text inputs are [uncond; cond]) and
    `combine(uncond, cond)` applies the pipeline's rule: plain or dynamic CFG (CogVideoX, the scale
    being a per-step array lookup) or CFG-Zero* (LongCat). `predict` takes the model input batch.
    """
    if not do_cfg:
        return predict(x)
    pred = predict(jnp.concatenate([x, x], axis=0))
    return combine(*split_cfg_batch(pred))


def with_plan_switch(plan: AttentionPlan | None, step: jax.Array,
                     run: Callable[[AttentionPlan | None], jax.Array]) -> jax.Array:
    """`run(plan)` on sparse steps and `run(plan.all_dense())` on the plan's dense timesteps.

    The switch is a `lax.cond` on the traced step (both branches compile into the one loop), skipped
    when the plan is dense everywhere or has no dense timesteps; the layer split is the model's.
    `plan=None` runs `run(None)`: the model's own default.
    """
    if plan is None or plan.is_dense or plan.dense_timesteps == 0:
        return run(plan)
    return lax.cond(plan.use_dense_at(step), lambda: run(plan.all_dense()), lambda: run(plan))


STEP_BUCKET = 64  # per-step tables are padded to a multiple of this many steps (one loop program each)


def pad_step_tables(tree: Any, num_steps: int, bucket: int = STEP_BUCKET) -> Any:
    """Per-step tables of a schedule (leaves with num_steps or num_steps + 1 rows: timesteps [N],
    sigmas [N + 1], guidance scales [N], ...) padded along axis 0 to the next multiple of `bucket`
    steps by repeating their last row; other leaves (scalars, alphas_cumprod [1000]) unchanged.

    The loop only reads rows i and i + 1 for steps i < num_steps, so the padding is never read; it
    makes the arrays' shapes, and so the loop's executable, the same for every step count in a
    bucket (20, 30 and 50 steps share one compiled and cached program).
    """
    if num_steps < 1 or bucket < 1:
        raise ValueError(f"num_steps={num_steps}, bucket={bucket}; expected positive ints")
    extra = -(-num_steps // bucket) * bucket - num_steps

    def pad(x: Any) -> Any:
        if not extra or getattr(x, "ndim", 0) == 0 or x.shape[0] not in (num_steps, num_steps + 1):
            return x
        return jnp.pad(jnp.asarray(x), [(0, extra)] + [(0, 0)] * (x.ndim - 1), mode="edge")

    return jax.tree.map(pad, tree)


class StepRange(NamedTuple):
    """Steps [start, stop) of a denoising loop as traced int32 scalars: one executable serves every range."""

    start: jax.Array
    stop: jax.Array

    @classmethod
    def of(cls, start: int, stop: int) -> StepRange:
        return cls(jnp.asarray(start, jnp.int32), jnp.asarray(stop, jnp.int32))


def denoise_loop(
    step_fn: Callable[[jax.Array, Carry], Carry],
    carry: Carry,
    steps: int | StepRange,
    progress: StepProgress | None = None,
    callback: Callable[[Any, Carry], None] | None = None,
) -> Carry:
    """Run `carry = step_fn(i, carry)` for i in range(steps) (an int), or for i in [steps.start,
    steps.stop) (a traced `StepRange`), as one `lax.fori_loop`.

    Call it inside `jax.jit`. With `progress`, each finished step ticks the host bar (ordered
    callback, so ticks arrive in step order and after the step's results exist). `callback(step,
    carry)` runs on the host after every step with the step's results (a device-to-host copy per
    step: for inspection, not for speed). Both are host callbacks, which keep the program out of
    the persistent compilation cache: pipelines pass a StepRange instead and drive it with
    `run_steps`, which gives the same progress and callbacks from the host.
    """

    # jax orders callbacks on one device only; under a device mesh (jaxvid.parallel) they are unordered,
    # and each still depends on its step's carry, so it fires after that step's work.
    ordered = jax.sharding.get_abstract_mesh().size <= 1

    def body(i, c):
        c = step_fn(i, c)
        if progress is not None:
            # Depend on the new carry so the tick fires after the step's work, not before it.
            leaf = jax.tree.leaves(c)[0]
            jax.debug.callback(progress.tick, i + 0 * leaf.reshape(-1)[0].astype(i.dtype), ordered=ordered)
        if callback is not None:
            jax.debug.callback(callback, i, c, ordered=ordered)
        return c

    if isinstance(steps, StepRange):
        return lax.fori_loop(steps.start, steps.stop, body, carry)
    return lax.fori_loop(0, steps, body, carry)


def run_steps(
    run_range: Callable[[StepRange, Carry], Carry],
    carry: Carry,
    num_steps: int,
    progress: StepProgress | None = None,
    callback: Callable[[int, Carry], None] | None = None,
) -> Carry:
    """Drive a jitted `denoise_loop` over steps [0, num_steps) from the host; returns the final carry.

    `run_range(steps, carry)` calls the pipeline's compiled loop for a `StepRange`; it may donate
    its carry (the pipelines' loops do), so the carry passed in is consumed. Without `progress` and
    `callback` it is called once for all steps; otherwise once per step (a disabled bar still
    records `progress.step_times`): the bar ticks as each step finishes. With `progress` only, step
    i + 1 is queued before waiting for step i (JAX dispatches asynchronously; the wait is on a
    one-element slice of step i's carry, which stays valid when step i + 1 consumes the carry), so
    the device does not idle between steps. `callback(step, carry)` sees step i's device arrays
    before step i + 1 is queued (a donated carry is gone after that). The caller owns
    `progress.start/close`, as with an in-loop bar.
    """
    if num_steps < 1:
        return carry
    if progress is None and callback is None:
        return jax.block_until_ready(run_range(StepRange.of(0, num_steps), carry))
    pending: Any = None  # the finish marker of the step queued but not yet waited for
    for i in range(num_steps):
        carry = run_range(StepRange.of(i, i + 1), carry)
        if callback is not None:
            _finish_step(i, carry, progress, callback)
            continue
        marker = _finish_marker(carry)
        if pending is not None:
            _finish_step(i - 1, pending, progress, None)
        pending = marker
    if pending is not None:
        _finish_step(num_steps - 1, pending, progress, None)
    return carry


def _finish_marker(carry: Any) -> jax.Array:
    """A copy of one element of the carry's first array: ready when the step that made the carry is
    done, and its own buffer (indexing may hand back the array itself, e.g. a 0-d one)."""
    leaf = jax.tree.leaves(carry)[0]
    return jnp.array(jnp.ravel(leaf)[:1], copy=True)


def _finish_step(step: int, carry: Any, progress: StepProgress | None, callback: Callable[[int, Any], None] | None
                 ) -> None:
    jax.block_until_ready(carry)
    if progress is not None:
        progress.tick(step)
    if callback is not None:
        callback(step, carry)
