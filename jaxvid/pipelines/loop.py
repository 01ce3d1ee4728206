"""The one denoising loop both pipelines share, and everything around it that is not model-specific.

    Component(module)                   a loaded NNX module split once: graphdef (static) + state (jit argument)
    CompiledFunction(fn, static_argnums)  jit with an explicit executable cache: compile time reported apart
    StepProgress                        the tqdm bar a jitted loop ticks through jax.debug.callback
    guided_prediction(predict, x, ...)  classifier-free guidance by batch doubling [uncond; cond], any rule
    with_plan_switch(plan, step, run)   the attention plan's dense timesteps: lax.cond on the traced step
    denoise_loop(step_fn, carry, n)     the lax.fori_loop over steps, progress and per-step host callbacks

A pipeline writes only its model-specific step (`step_fn(i, carry) -> carry`: the model call, its
guidance rule, its scheduler) and runs it through `denoise_loop` inside one jitted function. The
step index is traced, so anything that depends on it (timestep, guidance scale, dense-vs-sparse
attention) must be an array lookup or a `lax.cond` inside `step_fn`, never a Python branch.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxvid.attention.plan import AttentionPlan
from jaxvid.schedulers.guidance import split_cfg_batch

__all__ = ["Component", "CompiledFunction", "StepProgress", "denoise_loop", "guided_prediction",
           "with_plan_switch"]

Carry = TypeVar("Carry")


@dataclasses.dataclass(eq=False)
class Component:
    """A loaded NNX module split once into its graphdef (static) and state (the jit argument).

    Jitted stages take `(component.graphdef, component.state, ...)`: the weights are arguments, never
    constants. A pipeline keeps its networks as Components; placement hooks (host offload, releasing a
    text encoder after use) belong here, on `state`. Call `refresh()` after changing the module.
    """

    module: nnx.Module
    graphdef: nnx.GraphDef = dataclasses.field(init=False)
    state: nnx.State = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Split the module again (its structure or weights changed)."""
        self.graphdef, self.state = nnx.split(self.module)

    @property
    def cfg(self) -> Any:
        return self.module.cfg


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
    """What a compiled executable depends on for one dynamic leaf: shape, dtype, weak type."""
    if isinstance(x, jax.Array) or hasattr(x, "shape"):
        return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)))
    return (type(x).__name__, x)  # Python scalars: jit treats them as weak-typed 0-d values


class CompiledFunction:
    """`jax.jit(fn, static_argnums=...)` with an explicit ahead-of-time executable cache.

    Each call looks up an executable by (static argument values, pytree structure, shapes and
    dtypes of the dynamic arguments); a miss lowers and compiles once and records the time it took
    in `last_compile_seconds` (0.0 on a hit). `num_compiled` counts distinct executables, so a test
    can check that a second call with the same shapes did not compile again.
    """

    def __init__(self, fn: Callable[..., Any], *, static_argnums: Sequence[int] = ()):
        self._static = tuple(sorted(static_argnums))
        self._jit = jax.jit(fn, static_argnums=self._static)
        self._executables: dict[Hashable, Any] = {}
        self.last_compile_seconds = 0.0

    @property
    def num_compiled(self) -> int:
        return len(self._executables)

    def _key(self, args: tuple[Any, ...]) -> Hashable:
        static = tuple(args[i] for i in self._static)
        dynamic = [a for i, a in enumerate(args) if i not in self._static]
        leaves, treedef = jax.tree.flatten(dynamic)
        # the device mesh set around the call (jaxvid.parallel.mesh_context) changes the executable
        return static, treedef, tuple(_abstract_key(x) for x in leaves), jax.sharding.get_mesh()

    def prepare(self, *args: Any) -> float:
        """Compile for these arguments unless cached; returns the seconds spent compiling (0.0 on a hit)."""
        key = self._key(args)
        self.last_compile_seconds = 0.0
        if key not in self._executables:
            t0 = time.perf_counter()
            self._executables[key] = self._jit.lower(*args).compile()
            self.last_compile_seconds = time.perf_counter() - t0
        return self.last_compile_seconds

    def __call__(self, *args: Any) -> Any:
        """Run (compiling first if needed; see `last_compile_seconds`)."""
        compile_seconds = self.prepare(*args)
        out = self._executables[self._key(args)](*[a for i, a in enumerate(args) if i not in self._static])
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


def denoise_loop(
    step_fn: Callable[[jax.Array, Carry], Carry],
    carry: Carry,
    num_steps: int,
    progress: StepProgress | None = None,
    callback: Callable[[Any, Carry], None] | None = None,
) -> Carry:
    """Run `carry = step_fn(i, carry)` for i in range(num_steps) as one `lax.fori_loop`.

    Call it inside `jax.jit`. With `progress`, each finished step ticks the host bar (ordered
    callback, so ticks arrive in step order and after the step's results exist). `callback(step,
    carry)` runs on the host after every step with the step's results (a device-to-host copy per
    step: for inspection, not for speed).
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

    return lax.fori_loop(0, num_steps, body, carry)
