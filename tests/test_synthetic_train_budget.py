"""jaxvid.synthetic.train's time budget: the step count fits the budget from the chunks' real
speed, not from a second call that compiled again (the reference: the wall time the fake chunks sleep)."""
from __future__ import annotations

import time

import jax.numpy as jnp

from jaxvid.synthetic.train import _run_stage


def test_budget_uses_the_faster_of_the_second_and_third_calls():
    seconds = {1: 0.0, 2: 0.30}  # the second call is slow (as when it compiles again); the rest 20 ms
    seen: list[tuple[int, int]] = []

    def run(state, start, total):
        seen.append((int(start), int(total)))
        time.sleep(seconds.get(len(seen), 0.02))
        return state + 1, jnp.zeros(1)

    budget = 1.0
    t0 = time.perf_counter()
    state, curve, total, _ = _run_stage("fake", run, 0, steps=10_000, budget=budget, chunk=1)
    elapsed = time.perf_counter() - t0
    assert state == total == len(seen)
    # what fits: 0.3 s + 0.02 s for the 2nd and 3rd calls, then ~0.68 / 0.02 = ~34 more (sleep overshoots)
    assert 15 <= total <= 40, total
    assert elapsed <= budget + 0.5
    assert seen[:3] == [(0, 10_000), (1, 10_000), (2, 10_000)] and {t for _, t in seen[3:]} == {total}
    assert curve[-1][0] == total
