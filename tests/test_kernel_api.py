"""CPU checks of the block-sparse entry point: argument validation, dispatch, index tables."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import api
from pallas_kernels.block_sparse_mgpu import TuningConfig, prepare_index_tables, streams_for, validate_mgpu_args
from pallas_kernels.heuristics import default_config, tuning_space
from pallas_kernels.reference import block_mask_to_indices, block_sparse_attention_reference, indices_to_block_mask


def _inputs(seq=256, heads=2, dim=64, dtype=jnp.bfloat16, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(k, (1, seq, heads, dim), jnp.float32).astype(dtype) for k in keys)


def _tables(seq=256, heads=2, block_q=128, block_kv=128, seed=0):
    rng = np.random.default_rng(seed)
    return block_mask_to_indices(rng.random((1, heads, seq // block_q, seq // block_kv)) < 0.6)


def test_default_dispatch_on_cpu_is_portable():
    assert api.resolve_implementation(None) == "portable"
    assert not api.is_hopper()


def test_forcing_mosaic_without_hopper_errors_clearly():
    with pytest.raises(ValueError, match="Hopper"):
        api.resolve_implementation("mosaic")


def test_unknown_implementation_is_rejected():
    with pytest.raises(ValueError, match="implementation='triton'"):
        api.resolve_implementation("triton")


def test_dispatch_matches_reference_on_cpu():
    q, k, v = _inputs(dtype=jnp.float32)
    indices, counts = _tables()
    out = api.block_sparse_attention(q, k, v, indices, counts, block_q=128, block_kv=128, kv_len=200)
    ref = api.block_sparse_attention(q, k, v, indices, counts, block_q=128, block_kv=128, kv_len=200,
                                     implementation="reference")
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 1e-5


def test_config_only_applies_to_mosaic():
    q, k, v = _inputs()
    indices, counts = _tables()
    with pytest.raises(ValueError, match="config="):
        api.block_sparse_attention(q, k, v, indices, counts, block_q=128, block_kv=128,
                                   implementation="portable", config=TuningConfig())


@pytest.mark.parametrize("change, match", [
    (dict(block_q=32), "block_q=32"),
    (dict(block_kv=256), "block_kv=256"),
    (dict(dim=96), "head_dim=96"),
    (dict(dtype=jnp.float32), "dtypes"),
    (dict(kv_len=0), "kv_len=0"),
    (dict(kv_len=300), "kv_len=300"),
    (dict(kv_len=1.5), "kv_len=1.5"),
    (dict(scale=-1.0), "scale=-1.0"),
    (dict(float_tables=True), "kv_indices.dtype"),
    (dict(config=TuningConfig(kv_tile=128), block_kv=64), "kv_tile=128"),
    (dict(config=TuningConfig(num_slots=4), dim=128), "shared memory"),
])
def test_mosaic_validation_names_the_bad_argument(change, match):
    block_q, block_kv = change.get("block_q", 128), change.get("block_kv", 128)
    q, k, v = _inputs(dim=change.get("dim", 64), dtype=change.get("dtype", jnp.bfloat16))
    seq = q.shape[1]
    bq_t, bkv_t = (block_q if seq % block_q == 0 else 128), (block_kv if seq % block_kv == 0 else 128)
    indices, counts = _tables(block_q=bq_t, block_kv=bkv_t)
    if change.get("float_tables"):
        indices = indices.astype(np.float32)
    with pytest.raises(ValueError, match=match):
        validate_mgpu_args(q, k, v, indices, counts, block_q=block_q, block_kv=block_kv,
                           scale=change.get("scale"), kv_len=change.get("kv_len"),
                           config=change.get("config"))


def test_mosaic_validation_rejects_wrong_table_shape():
    q, k, v = _inputs()
    indices, counts = _tables()
    with pytest.raises(ValueError, match="kv_indices.shape"):
        validate_mgpu_args(q, k, v, indices[:, :, :1], counts[:, :, :1], block_q=128, block_kv=128,
                           scale=None, kv_len=None, config=None)
    with pytest.raises(ValueError, match="kv_counts.shape"):
        validate_mgpu_args(q, k, v, indices, counts[:, :1], block_q=128, block_kv=128,
                           scale=None, kv_len=None, config=None)


def test_tuning_config_validates_fields():
    with pytest.raises(ValueError, match="num_slots=1"):
        TuningConfig(num_slots=1)
    with pytest.raises(ValueError, match="kv_tile=32"):
        TuningConfig(kv_tile=32)
    with pytest.raises(ValueError, match="use_schedule_barrier"):
        TuningConfig(use_schedule_barrier=1)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("block_q", [64, 128])
@pytest.mark.parametrize("block_kv", [64, 128])
def test_every_supported_shape_has_a_config_that_fits(dim, block_q, block_kv):
    cfg = default_config(head_dim=dim, block_q=block_q, block_kv=block_kv)
    assert cfg.fits(block_q=block_q, block_kv=block_kv, head_dim=dim)
    space = tuning_space(head_dim=dim, block_q=block_q, block_kv=block_kv)
    assert space and all(c.fits(block_q=block_q, block_kv=block_kv, head_dim=dim) for c in space)


def test_prepare_tables_clamps_casts_and_pads_streams():
    # 5 query blocks (odd) of 3 slots over 4 key blocks; ids and counts partly out of range.
    indices = np.array([[[[0, 3, 9], [1, -2, 2], [5, 5, 5], [0, 1, 2], [2, 0, 0]]]], np.int64)
    counts = np.array([[[3, 2, 1, 7, -1]]], np.int64)
    out_i, out_c = prepare_index_tables(indices, counts, num_kv_blocks=4, streams=streams_for(64))
    assert out_i.dtype == jnp.int32 and out_c.dtype == jnp.int32
    assert out_i.shape == (1, 1, 6, 3) and out_c.shape == (1, 1, 6)  # padded to 2 streams
    assert int(out_i.min()) >= 0 and int(out_i.max()) <= 3
    np.testing.assert_array_equal(np.asarray(out_c)[0, 0], [3, 2, 1, 3, 0, 0])


def test_prepare_tables_split_keeps_the_same_token_mask():
    rng = np.random.default_rng(1)
    mask = rng.random((2, 3, 4, 4)) < 0.5
    indices, counts = block_mask_to_indices(mask)
    split_i, split_c = prepare_index_tables(indices, counts, num_kv_blocks=4, streams=1, kv_split=2)
    fine = np.asarray(indices_to_block_mask(np.asarray(split_i), np.asarray(split_c), 8))
    np.testing.assert_array_equal(fine, np.repeat(mask, 2, axis=-1))
    valid = np.arange(split_i.shape[-1]) < np.asarray(split_c)[..., None]
    rows = np.where(valid, np.asarray(split_i), 10 ** 6)
    assert np.all(np.diff(np.sort(rows, axis=-1), axis=-1) >= 0)
    assert np.all(np.sort(rows, axis=-1) == rows)  # still ascending


def test_prepared_split_tables_give_the_same_attention():
    q, k, v = _inputs(dtype=jnp.float32)
    indices, counts = _tables(block_q=128, block_kv=128)
    split_i, split_c = prepare_index_tables(indices, counts, num_kv_blocks=2, streams=1, kv_split=2)
    ref = block_sparse_attention_reference(q, k, v, indices, counts, block_q=128, block_kv=128)
    out = block_sparse_attention_reference(q, k, v, split_i, split_c, block_q=128, block_kv=64)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
