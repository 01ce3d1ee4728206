"""AttentionPlan: hashable static configs, per-layer specs and a traced step switch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvid.attention import BSA, AttentionPlan, Dense, Radial, Scene


def test_plans_are_hashable_static_jit_arguments():
    plan = AttentionPlan.radial_cogvideox(scene=Scene(boundaries=[0, 2, 4], adjacency=[[1, 0], [1, 1]]))
    same = AttentionPlan.radial_cogvideox(scene=Scene(boundaries=(0, 2, 4), adjacency=((True, False), (True, True))))
    assert plan == same and hash(plan) == hash(same)
    assert hash(AttentionPlan.bsa_longcat()) == hash(AttentionPlan.bsa_longcat(chunk_3d_shape_q=[4, 4, 4]))

    f = jax.jit(lambda x, plan: x * (2.0 if isinstance(plan.spec_for_layer(1), Radial) else 3.0) + plan.dense_timesteps,
                static_argnames="plan")
    assert float(f(jnp.float32(1), plan=plan)) == 14.0
    assert float(f(jnp.float32(1), plan=AttentionPlan.dense())) == 3.0


def test_spec_for_layer_and_layer_split():
    plan = AttentionPlan(sparse=BSA(), dense_layers=2, dense_timesteps=3)
    assert [type(plan.spec_for_layer(i)) for i in range(4)] == [Dense, Dense, BSA, BSA]
    assert plan.layer_split(48) == (2, 46) and plan.layer_split(1) == (1, 0)
    assert AttentionPlan.dense().layer_split(30) == (30, 0)
    assert plan.all_dense().is_dense and not plan.is_dense
    assert plan.spec_for(layer=5, step=2) == Dense() and plan.spec_for(layer=5, step=3) == plan.sparse


def test_step_switch_inside_a_jitted_loop():
    plan = AttentionPlan.radial_cogvideox(dense_timesteps=3)

    def dense_model(x):
        return x + 1.0

    def sparse_model(x):
        return x + 100.0

    @jax.jit
    def loop(x):
        def body(step, carry):
            total, trace = carry
            total = jax.lax.cond(plan.use_dense_at(step), dense_model, sparse_model, total)
            return total, trace.at[step].set(plan.use_dense_at(step))
        return jax.lax.fori_loop(0, 5, body, (x, jnp.zeros(5, bool)))

    total, trace = loop(jnp.float32(0))
    np.testing.assert_array_equal(np.asarray(trace), [True, True, True, False, False])
    assert float(total) == 203.0
    assert plan.use_dense_at(2) is True and plan.use_dense_at(3) is False
    assert bool(AttentionPlan.dense().use_dense_at(jnp.int32(99)))


@pytest.mark.parametrize("build, match", [
    (lambda: AttentionPlan(sparse="radial"), "sparse"),
    (lambda: AttentionPlan(dense_layers=-1), "dense_layers"),
    (lambda: AttentionPlan(dense_timesteps=1.5), "dense_timesteps"),
    (lambda: Radial(block_size=96), "block_size"),
    (lambda: Radial(model_type="ltx"), "model_type"),
    (lambda: Radial(decay_factor=0), "decay_factor"),
    (lambda: BSA(sparsity=None, cdf_threshold=None), "both None"),
    (lambda: BSA(chunk_3d_shape_q=(4, 4)), "chunk_3d_shape_q"),
    (lambda: Scene(boundaries=(0, 2, 2), adjacency=((1, 0), (0, 1))), "boundaries"),
    (lambda: Scene(boundaries=(0, 2, 4), adjacency=((1,),)), "adjacency"),
])
def test_bad_plans_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()
