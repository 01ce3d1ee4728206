"""bench/bsa_peers.py on CPU: the index lists handed to cuDNN's BSA describe exactly our sparsity pattern.

cuDNN frontend's layout (read from its 1.32 wrappers): q/k/v [B, H, S, D], q2k_block_index int32
[B, H, S / block, k] and a fixed block_sparse_num k: query block i of (b, h) attends to key blocks
idx[b, h, i, :k]. These tests decode that layout independently and compare it, and attention computed
by that definition, with our own block mask and fp32 reference (pallas_kernels.reference).
"""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from bench import bsa_peers
from pallas_kernels.reference import block_mask_to_indices, block_sparse_attention_reference


def _decode_cudnn(idx: np.ndarray, k_per_row: int, n_kv: int) -> np.ndarray:
    """cuDNN's meaning of its tables, one row at a time (independent of the bench's helpers)."""
    mask = np.zeros(idx.shape[:3] + (n_kv,), bool)
    for b, h, i in np.ndindex(*idx.shape[:3]):
        for j in range(k_per_row):
            mask[b, h, i, idx[b, h, i, j]] = True
    return mask


def test_cudnn_tables_describe_our_block_mask():
    mask = bsa_peers.random_block_mask(2, 3, 10, 4, seed=1)
    assert (mask.sum(-1) == 4).all() and not np.array_equal(mask[0, 0], mask[0, 1])  # per-head lists
    indices, counts = block_mask_to_indices(mask)
    tables = bsa_peers.to_cudnn_tables(indices, counts, batch=2, heads=3)
    assert tables.idx.dtype == np.int32 and tables.idx.shape == (2, 3, 10, 4) and tables.k_per_row == 4
    assert tables.idx.flags.c_contiguous
    np.testing.assert_array_equal(_decode_cudnn(tables.idx, tables.k_per_row, 10), mask)
    for b, h, i in np.ndindex(2, 3, 10):  # the same rows, ascending
        np.testing.assert_array_equal(tables.idx[b, h, i], np.flatnonzero(mask[b, h, i]))
    np.testing.assert_array_equal(bsa_peers.cudnn_tables_to_block_mask(tables, 10), mask)


def test_cudnn_tables_broadcast_shared_lists_and_drop_padding():
    mask = bsa_peers.random_block_mask(1, 1, 6, 2, seed=3)
    indices, counts = block_mask_to_indices(mask, max_blocks=5)  # padded slots repeat the last index
    tables = bsa_peers.to_cudnn_tables(indices, counts, batch=2, heads=4)
    assert tables.idx.shape == (2, 4, 6, 2)
    want = np.broadcast_to(mask, (2, 4, 6, 6))
    np.testing.assert_array_equal(_decode_cudnn(tables.idx, tables.k_per_row, 6), want)


@pytest.mark.parametrize("block", [64, 128])
def test_attention_by_cudnn_definition_matches_our_reference(block):
    rng = np.random.default_rng(block)
    b, h, s, d = 1, 2, 4 * block, 32
    q, k, v = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
    mask = bsa_peers.random_block_mask(b, h, s // block, 2, seed=block)
    indices, counts = block_mask_to_indices(mask)
    tables = bsa_peers.to_cudnn_tables(indices, counts, batch=b, heads=h)
    ours = block_sparse_attention_reference(*(jnp.asarray(x) for x in (q, k, v)), jnp.asarray(indices),
                                            jnp.asarray(counts), block_q=block, block_kv=block)
    bhsd = [np.transpose(x, (0, 2, 1, 3)) for x in (q, k, v)]
    theirs = np.transpose(bsa_peers.cudnn_semantics_reference(*bhsd, tables, block), (0, 2, 1, 3))
    np.testing.assert_allclose(theirs, np.asarray(ours), rtol=1e-5, atol=1e-5)


def test_to_cudnn_tables_rejects_what_cudnn_cannot_express():
    mask = bsa_peers.random_block_mask(1, 2, 8, 3, seed=0)
    indices, counts = block_mask_to_indices(mask)
    ragged = counts.copy()
    ragged[0, 0, 0] = 2
    with pytest.raises(ValueError, match="kv_counts"):
        bsa_peers.to_cudnn_tables(indices, ragged, batch=1, heads=2)
    unsorted = indices[..., ::-1].copy()
    with pytest.raises(ValueError, match="ascending"):
        bsa_peers.to_cudnn_tables(unsorted, counts, batch=1, heads=2)
    with pytest.raises(ValueError, match="kv_indices.shape"):
        bsa_peers.to_cudnn_tables(indices, counts, batch=1, heads=3)


def test_check_cudnn_args_names_the_wrong_argument():
    tables = bsa_peers.CudnnTables(idx=np.zeros((1, 2, 4, 3), np.int32), k_per_row=3)
    bsa_peers.check_cudnn_args((1, 2, 256, 128), tables, 64, sage=True)  # valid
    with pytest.raises(ValueError, match="q2k_block_index"):
        bsa_peers.check_cudnn_args((1, 2, 512, 128), tables, 64, sage=False)  # 8 query blocks, tables have 4
    with pytest.raises(ValueError, match="D=64"):
        bsa_peers.check_cudnn_args((1, 2, 256, 64), tables, 64, sage=True)
    with pytest.raises(ValueError, match="multiple"):
        bsa_peers.check_cudnn_args((1, 2, 250, 128), tables, 64, sage=False)


def test_smoke_mode_runs_on_cpu(tmp_path):
    out = tmp_path / "peers.json"
    argv = ["--smoke", "--blocks", "128", "--sparsities", "0.5", "--precisions", "--ref-blocks", "2", "--json", str(out)]
    assert bsa_peers.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["impl"] == "jaxvid-bf16"]
    assert len(ours) == 1 and ours[0]["rel_l2_fp32"] < 1e-2  # bf16 inputs vs fp32 maths
    assert [r["impl"] for r in rows].count("cudnn-args") == 1
