"""The one jitted denoising loop both pipelines share, and its host-side progress bar.

The loop is a `lax.fori_loop` over steps whose body is a pure `step_fn(i, carry) -> carry`; the
step index is traced, so anything that depends on it (timestep, guidance scale, dense-vs-sparse
attention) must be an array lookup or a `lax.cond` inside `step_fn`, never a Python branch.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
from jax import lax

Carry = TypeVar("Carry")


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


def denoise_loop(
    step_fn: Callable[[jax.Array, Carry], Carry],
    carry: Carry,
    num_steps: int,
    progress: StepProgress | None = None,
) -> Carry:
    """Run `carry = step_fn(i, carry)` for i in range(num_steps) as one `lax.fori_loop`.

    Call it inside `jax.jit`. With `progress`, each finished step ticks the host bar (ordered
    callback, so ticks arrive in step order and after the step's results exist).
    """

    def body(i, c):
        c = step_fn(i, c)
        if progress is not None:
            # Depend on the new carry so the tick fires after the step's work, not before it.
            leaf = jax.tree.leaves(c)[0]
            jax.debug.callback(progress.tick, i + 0 * leaf.reshape(-1)[0].astype(i.dtype), ordered=True)
        return c

    return lax.fori_loop(0, num_steps, body, carry)
