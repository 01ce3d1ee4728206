"""bench/bsa_peers.py on CPU: the index lists handed to cuDNN's BSA describe exactly our sparsity pattern.

cuDNN frontend's layout (read from its 1.32 wrappers): q/k/v [B, H, S, D], q2k_block_index int32
[B, H, S / block, k] and a fixed block_sparse_num k: query block i of (b, h) attends to key blocks
idx[b, h, i, :k]. These tests decode that layout independently and compare it, and attention computed
by that definition, with our own block mask and fp32 reference (pallas_kernels.reference).
"""
from __future__ import annotations

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


def test_smoke_row_checks_cudnn_arguments_and_semantics():
    spec = bsa_peers.peer_spec(64, 0.5, latent=(4, 4, 16), heads=2)  # 4 blocks of 64, 2 per row
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 256, 2, 128)), jnp.bfloat16) for _ in range(3))
    indices, counts, tables = bsa_peers.case_tables(spec, seed=0)
    row = bsa_peers._smoke_cudnn_row(spec, q, k, v, tables, indices, counts)
    assert "same block mask" in row.note
    wrong = bsa_peers.CudnnTables(idx=(tables.idx + 1) % 4, k_per_row=tables.k_per_row)  # other key blocks
    with pytest.raises(AssertionError, match="differ"):
        bsa_peers._smoke_cudnn_row(spec, q, k, v, wrong, indices, counts)


def _fake_cudnn_module(calls: list):
    """A stand-in for `cudnn` whose BSA checks its arguments as cuDNN frontend 1.32's wrappers
    document them and computes attention by that definition in fp32 (CPU torch tensors)."""
    import types

    import torch

    def attention(q, k, v, idx, k_per_row, block):
        assert q.dtype == torch.bfloat16 and q.is_contiguous() and q.shape == k.shape == v.shape  # BHSD
        b, h, s, _ = q.shape
        assert idx.dtype == torch.int32 and tuple(idx.shape[:3]) == (b, h, s // block)
        assert 1 <= k_per_row <= idx.shape[-1]
        qf, kf, vf = (x.float() for x in (q, k, v))
        out = torch.zeros_like(qf)
        for bi, hi, i in np.ndindex(b, h, s // block):
            keys = torch.cat([torch.arange(j * block, (j + 1) * block) for j in idx[bi, hi, i, :k_per_row].tolist()])
            p = torch.softmax(qf[bi, hi, i * block:(i + 1) * block] @ kf[bi, hi, keys].T / q.shape[-1] ** 0.5, -1)
            out[bi, hi, i * block:(i + 1) * block] = p @ vf[bi, hi, keys]
        return out.to(torch.bfloat16)

    def forward(q, k, v, idx, block_sparse_num, *, sparse_block_size, kv_splits=1):
        calls.append(("bf16", sparse_block_size, kv_splits))
        return {"o_tensor": attention(q, k, v, idx, block_sparse_num, sparse_block_size)}

    def fp8_forward(q, k, v, idx, block_sparse_num, *, sparse_block_size):
        calls.append(("fp8", sparse_block_size, None))
        return {"o_tensor": attention(q, k, v, idx, block_sparse_num, sparse_block_size)}

    module = types.ModuleType("cudnn")
    module.BSA = types.SimpleNamespace(block_sparse_attention_forward=forward,
                                       block_sparse_attention_fp8_forward=fp8_forward)
    return module


def test_cudnn_rows_pass_the_tables_and_read_the_output_in_cudnn_layout(monkeypatch):
    torch = pytest.importorskip("torch")
    calls: list = []
    monkeypatch.setitem(__import__("sys").modules, "cudnn", _fake_cudnn_module(calls))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    spec = bsa_peers.peer_spec(64, 0.5, latent=(4, 4, 16), heads=2)  # 4 blocks of 64, 2 per row
    q, k, v = bsa_peers.make_qkv(spec, 0)
    indices, counts, tables = bsa_peers.case_tables(spec, seed=0)
    plan = bsa_peers.slice_plan(spec, 2)
    ref = bsa_peers.fp32_reference_slice(q, k, v, indices, counts, spec, *plan)  # ours, on our tables
    rows = bsa_peers.cudnn_rows(spec, q, k, v, tables, ref, plan, repeats=1, dense_rate=None, kv_splits=1)
    by_impl = {r.impl: r for r in rows}
    assert calls[0] == ("bf16", 64, 1) and calls[-1] == ("fp8", 64, None)
    for impl in ("cudnn-bsa-bf16", "cudnn-bsa-sage-fp8"):
        assert not by_impl[impl].note.startswith("FAILED"), by_impl[impl].note
        assert by_impl[impl].rel_l2_fp32 < 1e-2, (impl, by_impl[impl].rel_l2_fp32)  # bf16 output vs fp32


def test_missing_cudnn_fails_its_rows_not_the_run(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setitem(__import__("sys").modules, "cudnn", None)  # `from cudnn import BSA` raises ImportError
    spec = bsa_peers.peer_spec(64, 0.5, latent=(4, 4, 16), heads=2)
    tables = bsa_peers.case_tables(spec, seed=0)[2]
    rows = bsa_peers.cudnn_rows(spec, None, None, None, tables, None, None, repeats=1, dense_rate=None, kv_splits=1)
    assert [r.impl for r in rows] == list(bsa_peers.CUDNN_IMPLS)
    assert all(r.note.startswith("FAILED ModuleNotFoundError") and "cudnn" in r.note for r in rows)
