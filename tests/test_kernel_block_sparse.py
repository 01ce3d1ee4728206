"""The Mosaic GPU block-sparse kernel against the fp32 reference (Hopper GPU only).

Fresh random inputs every case; the output's memory is poisoned with NaN right before each run
(the allocator hands the freed NaN buffer to the kernel's output), and every element is checked:
no NaN, each within a per-element bound, and relative L2 <= 5e-3 overall.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

REL_L2_BOUND = 5e-3


def _block_mask(rng, shape, kind: str) -> np.ndarray:
    """Bool block mask [bt, ht, nq, nk] of the named kind."""
    if kind == "dense":
        return np.ones(shape, bool)
    if kind == "single":
        mask = np.zeros(shape, bool)
        cols = rng.integers(0, shape[-1], size=shape[:-1])
        np.put_along_axis(mask, cols[..., None], True, axis=-1)
        return mask
    density = {"half": 0.5, "eighth": 0.125}[kind]
    return rng.random(shape) < density


def _poison_then_run(fn, out_shape, dtype):
    import jax.numpy as jnp

    for _ in range(2):
        nan = jnp.full(out_shape, jnp.nan, dtype)
        nan.block_until_ready()
        nan.delete()
    out = fn()
    return np.asarray(out.astype(jnp.float32))


def _check_case(*, batch=1, seq=512, heads=2, dim=64, block_q=128, block_kv=128, kind="half",
                table="per_head", kv_len=None, zero_rows=0, dtype="bfloat16", config=None,
                seed=0):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.api import block_sparse_attention
    from pallas_kernels.reference import block_mask_to_indices, block_sparse_attention_reference

    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q, k, v = (jax.random.normal(kk, (batch, seq, heads, dim), jnp.float32).astype(dtype) for kk in keys)
    tb = {"broadcast": 1, "per_head": 1, "per_batch_head": batch}[table]
    th = 1 if table == "broadcast" else heads
    mask = _block_mask(rng, (tb, th, seq // block_q, seq // block_kv), kind)
    if zero_rows:
        mask[..., rng.choice(seq // block_q, zero_rows, replace=False), :] = False
    indices, counts = block_mask_to_indices(mask)
    indices, counts = jnp.asarray(indices), jnp.asarray(counts)
    kwargs = dict(block_q=block_q, block_kv=block_kv, kv_len=kv_len)
    out = _poison_then_run(
        lambda: block_sparse_attention(q, k, v, indices, counts, implementation="mosaic", config=config,
                                       **kwargs), q.shape, dtype)
    ref = np.asarray(block_sparse_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                                      v.astype(jnp.float32), indices, counts, **kwargs))
    assert not np.isnan(out).any(), f"{np.isnan(out).sum()} NaN (unwritten) outputs"
    rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
    worst = float(np.max(np.abs(out - ref)))
    assert np.all(np.abs(out - ref) <= 0.05 + 0.05 * np.abs(ref)), f"max abs err {worst}"
    assert rel <= REL_L2_BOUND, f"relative L2 {rel:.2e}"
    return rel


CASES = {
    # name: kwargs
    "d64_b128_dense_broadcast": dict(dim=64, kind="dense", table="broadcast"),
    "d128_b128_half_per_head": dict(dim=128, kind="half"),
    "d128_b64_eighth_per_batch_head": dict(dim=128, batch=2, block_q=64, block_kv=64, kind="eighth",
                                          table="per_batch_head", seq=1024),
    "d64_q64_kv128_half_padded": dict(dim=64, block_q=64, block_kv=128, kv_len=512 - 37),
    "d128_q64_kv128_split_padded": dict(dim=128, block_q=64, block_kv=128, kv_len=512 - 100),
    "d128_q128_kv64_single": dict(dim=128, block_q=128, block_kv=64, kind="single"),
    "d64_q128_kv64_zero_rows_pad2": dict(dim=64, block_q=128, block_kv=64, kind="half", zero_rows=1,
                                        kv_len=512 - 150, table="broadcast"),
    "d64_q64_odd_blocks_eighth": dict(dim=64, seq=320, block_q=64, block_kv=64, kind="eighth", heads=3),
    "d128_fp16_dense_padded": dict(dim=128, kind="dense", dtype="float16", kv_len=500),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(name):
    rel = _check_case(**CASES[name], seed=hash(name) % 1000)
    print(f"{name}: rel L2 {rel:.2e}")


def test_kernel_traced_kv_len():
    import jax
    import jax.numpy as jnp

    from pallas_kernels.api import block_sparse_attention
    from pallas_kernels.reference import block_mask_to_indices, block_sparse_attention_reference

    rng = np.random.default_rng(7)
    q, k, v = (jax.random.normal(kk, (1, 512, 2, 64), jnp.float32).astype(jnp.bfloat16)
               for kk in jax.random.split(jax.random.PRNGKey(7), 3))
    indices, counts = block_mask_to_indices(rng.random((1, 2, 4, 8)) < 0.6)
    run = jax.jit(lambda q, k, v, n: block_sparse_attention(
        q, k, v, indices, counts, block_q=128, block_kv=64, kv_len=n, implementation="mosaic"))
    for n in (512, 450, 300):
        out = np.asarray(run(q, k, v, jnp.int32(n)).astype(jnp.float32))
        ref = np.asarray(block_sparse_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), indices, counts, block_q=128,
                                                          block_kv=64, kv_len=n).astype(jnp.float32))
        rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert not np.isnan(out).any() and rel <= REL_L2_BOUND, (n, rel)


def test_every_tuning_config_matches():
    from pallas_kernels.heuristics import tuning_space

    for cfg in tuning_space(head_dim=64, block_q=64, block_kv=128):
        rel = _check_case(dim=64, block_q=64, block_kv=128, kind="half", kv_len=480, config=cfg, seed=3)
        print(f"{cfg}: rel L2 {rel:.2e}")


def test_default_dispatch_is_mosaic_on_hopper():
    from pallas_kernels.api import resolve_implementation

    assert resolve_implementation(None) == "mosaic"
