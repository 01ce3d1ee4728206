"""loop.run_steps drives one jitted denoise_loop over a traced StepRange: per step (progress bar,
callbacks) or in one call, the results equal a plain Python loop over the same step function."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvid.pipelines.loop import (
    CompiledFunction,
    StepProgress,
    StepRange,
    denoise_loop,
    pad_step_tables,
    run_steps,
)
from jaxvid.schedulers import cogvideox_ddim, flow_match

N = 5


def _step(i, c):
    x, y = c
    return x * 0.9 + jnp.sin(i.astype(jnp.float32)), y + x.sum()


def _loop(x0, steps):
    return denoise_loop(_step, x0, steps)


def _reference(x0):
    c = x0
    for i in range(N):
        c = _step(jnp.int32(i), c)
    return c


def test_per_step_and_one_call_equal_the_python_loop():
    x0 = (jnp.arange(6.0).reshape(2, 3), jnp.float32(0))
    ref = _reference(x0)
    fn = CompiledFunction(_loop, name="test loop")
    seen = []
    progress = StepProgress(enabled=False)
    progress.start(N)
    per_step = run_steps(lambda steps, c: fn(c, steps), x0, N, progress,
                         callback=lambda i, c: seen.append((i, np.asarray(c[1]))))
    whole = run_steps(lambda steps, c: fn(c, steps), x0, N)
    assert fn.num_compiled == 1  # one executable for every step range
    assert len(progress.step_times) == N and [i for i, _ in seen] == list(range(N))
    for got in (per_step, whole):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    np.testing.assert_allclose(seen[-1][1], np.asarray(ref[1]), rtol=1e-6)


def test_step_range_is_traced():
    fn = CompiledFunction(_loop)
    x0 = (jnp.ones((2, 3)), jnp.float32(0))
    fn(x0, StepRange.of(0, 2))
    fn(x0, StepRange.of(3, 4))
    assert fn.num_compiled == 1


def test_donated_carry_is_consumed_and_results_unchanged():
    """A loop that donates its carry (as the pipelines' do): per step with a bar, per step with a
    callback and in one call, each input carry is deleted by the call that consumed it, the
    callback still sees every step's values, and the results equal the Python loop's."""
    ref = _reference((jnp.arange(6.0).reshape(2, 3), jnp.float32(0)))
    fn = CompiledFunction(_loop, donate_argnums=(0,), name="donating loop")
    for mode in ("bar", "callback", "one call"):
        x0 = (jnp.arange(6.0).reshape(2, 3), jnp.float32(0))
        progress = StepProgress(enabled=False)
        progress.start(N)
        seen = []
        got = run_steps(lambda steps, c: fn(c, steps), x0, N, progress if mode != "one call" else None,
                        callback=(lambda i, c: seen.append(np.asarray(c[1]))) if mode == "callback" else None)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(x0)), mode
        assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(got)), mode
        if mode != "one call":
            assert len(progress.step_times) == N, mode
        if mode == "callback":
            np.testing.assert_allclose(seen[-1], np.asarray(ref[1]), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert fn.num_compiled == 1


def test_donated_scalar_carry_ticks_per_step():
    """The finish marker is its own buffer even when the carry is one 0-d array (indexing could
    hand back the very array the next step consumes)."""
    fn = CompiledFunction(lambda c, steps: denoise_loop(lambda i, x: x * 0.5 + 1.0, c, steps), donate_argnums=(0,))
    progress = StepProgress(enabled=False)
    progress.start(N)
    want = np.float32(3.0)
    for _ in range(N):
        want = want * np.float32(0.5) + np.float32(1.0)
    got = run_steps(lambda steps, c: fn(c, steps), jnp.float32(3.0), N, progress)
    assert len(progress.step_times) == N and float(got) == want


def test_step_tables_padded_to_one_shape_per_bucket():
    """Per-step tables ([N] and [N + 1] rows) get the same shapes for every N in a bucket; rows < their
    length are untouched; the padding repeats the last row; other leaves are left alone."""
    cfg = cogvideox_ddim.CogVideoXDDIMConfig()
    shapes = set()
    for n in (20, 30, 50):
        state = cogvideox_ddim.set_timesteps(cfg, n)
        scales = np.linspace(1.0, 6.0, n, dtype=np.float32)
        padded, padded_scales = pad_step_tables((state, scales), n)
        shapes.add(tuple(np.shape(x) for x in jax.tree.leaves((padded, padded_scales))))
        for before, after in zip(jax.tree.leaves((state, scales)), jax.tree.leaves((padded, padded_scales))):
            before, after = np.asarray(before), np.asarray(after)
            if before.ndim and before.shape[0] == n:
                assert after.shape[0] == 64
                np.testing.assert_array_equal(after[:n], before)
                np.testing.assert_array_equal(after[n:], np.broadcast_to(before[-1], after[n:].shape))
            else:
                np.testing.assert_array_equal(after, before)  # alphas_cumprod [1000], scalars
    assert len(shapes) == 1
    flow = flow_match.FlowMatchState(timesteps=np.arange(5, 0, -1, dtype=np.float32),
                                     sigmas=np.linspace(1.0, 0.0, 6, dtype=np.float32))
    out = pad_step_tables(flow, 5, bucket=8)
    assert out.timesteps.shape == (8,) and out.sigmas.shape == (9,)
    np.testing.assert_array_equal(np.asarray(out.sigmas)[:6], flow.sigmas)
    assert pad_step_tables(flow, 5, bucket=5).sigmas.shape == (6,)  # a full bucket: nothing added
    with pytest.raises(ValueError, match="num_steps=0"):
        pad_step_tables(flow, 0)
