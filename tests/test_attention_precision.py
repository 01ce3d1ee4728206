"""8-bit attention precisions (pallas_kernels.quantized, the plan's `precision`): the jnp
quantize-dequantize reference against an independent numpy one and against fp32 attention;
smoothing with outlier key channels; padding and empty rows; the plan and attend() plumbing."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxvid.attention import BSA, AttentionPlan, Dense, Radial, attend
from pallas_kernels.quantized import PRECISIONS, quantize_qkv, quantized_attention_reference
from pallas_kernels.reference import block_mask_to_indices, block_sparse_attention_reference

B, S, H, D, BLK = 1, 256, 2, 64, 64
# Relative L2 vs fp32 attention on N(0, 1) inputs, D 64 (measured on CPU, jax 0.10.2): fp8 0.051,
# int8-fp8 0.036. Random V makes the output an average of uncorrelated values, so P's e4m3 rounding
# (~3.6% rms) shows nearly undamped; int8 Q/K are finer than e4m3 Q/K.
REL_L2_BOUND = {"fp8": 0.06, "int8-fp8": 0.045}


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _qkv(seed=0, outlier_offset=0.0, s=S):
    k = jax.random.split(jax.random.key(seed), 3)
    q, kk, v = (jax.random.normal(x, (B, s, H, D), jnp.float32) for x in k)
    if outlier_offset:
        # a few key channels carry a large offset shared by every token, as DiT keys do
        kk = kk.at[..., jnp.array([3, 17, 40])].add(outlier_offset)
    return q, kk, v


def _tables(seed=0, empty_row=True, s=S):
    n = s // BLK
    rng = np.random.default_rng(seed)
    mask = rng.random((1, H, n, n)) < 0.6
    mask[..., np.arange(n), np.arange(n)] = True
    if empty_row:
        mask[0, 1, 2] = False  # query block 2 of head 1 sees nothing
    idx, cnt = block_mask_to_indices(mask)
    return jnp.asarray(idx), jnp.asarray(cnt), mask


def _numpy_reference(q, k, v, mask, precision, kv_len, scale):
    """Independent quantize-dequantize attention in numpy + ml_dtypes, loops over blocks."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    valid = np.arange(k.shape[1]) < kv_len
    k = np.where(valid[None, :, None, None], k - k[:, valid].mean(axis=1, keepdims=True), 0.0)
    v = np.where(valid[None, :, None, None], v, 0.0)
    e4m3 = ml_dtypes.float8_e4m3fn

    def quant_blocks(x):
        out = np.empty_like(x)
        for s0 in range(0, x.shape[1], BLK):
            for h in range(H):
                blk = x[:, s0:s0 + BLK, h]
                if precision == "fp8":
                    sc = max(np.abs(blk).max() / 448.0, np.finfo(np.float32).tiny)
                    out[:, s0:s0 + BLK, h] = (blk / sc).astype(e4m3).astype(np.float32) * sc
                else:
                    sc = max(np.abs(blk).max() / 127.0, np.finfo(np.float32).tiny)
                    out[:, s0:s0 + BLK, h] = np.clip(np.round(blk / sc), -127, 127) * sc
        return out

    qd, kd = quant_blocks(q), quant_blocks(k)
    vs = np.maximum(np.abs(v).max(axis=1, keepdims=True) / 448.0, np.finfo(np.float32).tiny)
    vd = (v / vs).astype(e4m3).astype(np.float32) * vs
    tok = np.repeat(np.repeat(mask, BLK, -2), BLK, -1) & valid
    out = np.zeros_like(q)
    for h in range(H):
        logits = qd[0, :, h] @ kd[0, :, h].T * scale
        m = tok[0, h]
        logits = np.where(m, logits, -np.inf)
        rmax = logits.max(axis=1, keepdims=True)
        rmax = np.where(np.isfinite(rmax), rmax, 0.0)
        p = np.where(m, np.exp(logits - rmax), 0.0)
        den = p.sum(axis=1, keepdims=True)
        p8 = (p * 448.0).astype(e4m3).astype(np.float32) / 448.0
        out[0, :, h] = (p8 @ vd[0, :, h]) / np.where(den > 0, den, 1.0)
    return out


@pytest.mark.parametrize("precision", ["fp8", "int8-fp8"])
def test_reference_matches_independent_numpy(precision):
    q, k, v = _qkv(seed=1, outlier_offset=8.0)
    idx, cnt, mask = _tables(seed=1)
    kv_len = S - 37  # padded keys
    got = quantized_attention_reference(q, k, v, idx, cnt, block_q=BLK, block_kv=BLK, precision=precision,
                                        kv_len=kv_len)
    want = _numpy_reference(q, k, v, mask, precision, kv_len, 1.0 / np.sqrt(D))
    # the same maths; a value sitting on an e4m3 rounding boundary may round the other way when the
    # two sum in different orders (0.2% of outputs move by < 3e-4), so compare in aggregate
    assert _rel_l2(got, want) < 2e-3
    close = np.isclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)
    assert close.mean() > 0.99 and np.abs(np.asarray(got) - want).max() < 2e-3


@pytest.mark.parametrize("precision", ["fp8", "int8-fp8"])
def test_error_vs_fp32_padding_and_empty_rows(precision):
    q, k, v = _qkv(seed=2)
    idx, cnt, _ = _tables(seed=2)
    kv_len = S - 50
    exact = block_sparse_attention_reference(q, k, v, idx, cnt, block_q=BLK, block_kv=BLK, kv_len=kv_len)
    got = quantized_attention_reference(q, k, v, idx, cnt, block_q=BLK, block_kv=BLK, precision=precision,
                                        kv_len=kv_len)
    err = _rel_l2(got, exact)
    assert 0 < err < REL_L2_BOUND[precision], err
    # the empty query block is exactly zero; garbage in padded keys changes nothing
    assert not np.asarray(got[0, 2 * BLK:3 * BLK, 1]).any()
    k2 = k.at[:, kv_len:].set(1e4)
    v2 = v.at[:, kv_len:].set(-1e4)
    again = quantized_attention_reference(q, k2, v2, idx, cnt, block_q=BLK, block_kv=BLK, precision=precision,
                                          kv_len=kv_len)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


@pytest.mark.parametrize("precision", ["fp8", "int8-fp8"])
def test_smoothing_matters_with_outlier_key_channels(precision):
    # Measured (rel. L2 vs fp32, smoothed / not): offset 10: fp8 0.051 / 0.076, int8-fp8 0.036 / 0.045;
    # 30: 0.051 / 0.151, 0.036 / 0.082; 50: 0.051 / 0.250, 0.036 / 0.123.
    idx, cnt, _ = _tables(seed=3, empty_row=False)
    kw = dict(block_q=BLK, block_kv=BLK, precision=precision)
    q, k, v = _qkv(seed=3)
    plain = _rel_l2(quantized_attention_reference(q, k, v, idx, cnt, **kw),
                    block_sparse_attention_reference(q, k, v, idx, cnt, block_q=BLK, block_kv=BLK))
    q, k, v = _qkv(seed=3, outlier_offset=50.0)  # 50x the keys' spread on 3 of 64 channels
    exact = block_sparse_attention_reference(q, k, v, idx, cnt, block_q=BLK, block_kv=BLK)
    smooth = _rel_l2(quantized_attention_reference(q, k, v, idx, cnt, **kw), exact)
    raw = _rel_l2(quantized_attention_reference(q, k, v, idx, cnt, smooth=False, **kw), exact)
    assert abs(smooth - plain) < 1e-3 * plain  # smoothing removes the offset entirely
    assert raw > 3 * smooth, (raw, smooth)


def test_smoothing_leaves_exact_attention_unchanged():
    q, k, v = _qkv(seed=4, outlier_offset=20.0)
    idx, cnt, _ = _tables(seed=4)
    a = block_sparse_attention_reference(q, k, v, idx, cnt, block_q=BLK, block_kv=BLK)
    b = block_sparse_attention_reference(q, k - k.mean(axis=1, keepdims=True), v, idx, cnt, block_q=BLK,
                                         block_kv=BLK)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_quantize_qkv_layouts_and_errors():
    q, k, v = _qkv(seed=5)
    qq = quantize_qkv(q, k, v, precision="int8-fp8", block_q=BLK, block_kv=128)
    assert qq.q8.dtype == jnp.int8 and qq.k8.dtype == jnp.int8 and qq.v8.dtype == jnp.float8_e4m3fn
    assert qq.q_scale.shape == (B, S // BLK, H) and qq.k_scale.shape == (B, S // 128, H)
    assert qq.v_scale.shape == (B, H, D)
    with pytest.raises(ValueError, match="precision='int4'"):
        quantize_qkv(q, k, v, precision="int4", block_q=BLK, block_kv=BLK)
    with pytest.raises(ValueError, match="not multiples"):
        quantize_qkv(q[:, :100], k, v, precision="fp8", block_q=BLK, block_kv=BLK)


def test_plan_precision():
    assert PRECISIONS == ("bf16", "fp8", "int8-fp8")
    plan = AttentionPlan.radial_cogvideox(dense_layers=1).with_precision("fp8")
    assert plan.precision == "fp8" and plan.sparse.precision == "fp8"
    assert plan.spec_for_layer(0) == Dense(precision="fp8") and plan.spec_for_layer(3).precision == "fp8"
    assert plan.all_dense().precision == "fp8" and plan.spec_for(5, 0) == Dense(precision="fp8")
    # a plan left at bf16 takes its sparse spec's precision; a plan's own precision wins
    assert AttentionPlan(sparse=BSA(precision="int8-fp8")).precision == "int8-fp8"
    assert AttentionPlan(sparse=BSA(precision="int8-fp8"), precision="fp8").sparse.precision == "fp8"
    assert BSA.from_dict({"sparsity": 0.5, "precision": "fp8"}).precision == "fp8"
    assert AttentionPlan().precision == "bf16" and AttentionPlan().sparse == Dense()
    for bad in (lambda: AttentionPlan(precision="fp4"), lambda: Dense(precision="int8"),
                lambda: Radial(precision="bf8"), lambda: AttentionPlan().with_precision("x")):
        with pytest.raises(ValueError, match="precision="):
            bad()
    assert dataclasses.replace(plan, precision="bf16").sparse.precision == "fp8"  # replace re-stamps only non-bf16


def test_attend_dense_fp8_uses_the_reference_on_cpu():
    s = 200  # not a multiple of the 128-token block: padded inside
    q, k, v = _qkv(seed=6, s=s)
    out = attend(q, k, v, Dense(precision="fp8"))
    exact = attend(q, k, v, Dense())
    assert out.shape == q.shape
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 256 - s), (0, 0), (0, 0)))  # noqa: E731
    idx = jnp.asarray(np.broadcast_to(np.arange(2, dtype=np.int32), (1, 1, 2, 2)))
    want = quantized_attention_reference(pad(q), pad(k), pad(v), idx, jnp.full((1, 1, 2), 2, jnp.int32),
                                         block_q=128, block_kv=128, precision="fp8", kv_len=s)[:, :s]
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert 0 < _rel_l2(out, exact) < REL_L2_BOUND["fp8"]


@pytest.mark.parametrize("argv, option", [(["--weights", "int4"], "--weights"),
                                          (["--attention-precision", "fp4"], "--attention-precision")])
def test_generate_rejects_bad_precision_options(argv, option, capsys):
    from jaxvid.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["generate", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0], err


def test_longcat_attention_precision_switch():
    from jaxvid.models.longcat import LongCatConfig

    cfg = LongCatConfig.tiny(enable_bsa=True, bsa_params=BSA(sparsity=0.5), attention_precision="int8-fp8")
    plan = cfg.attention_plan()
    assert plan.precision == "int8-fp8" and plan.sparse.precision == "int8-fp8"
    assert LongCatConfig.tiny().attention_plan() == AttentionPlan.dense()
    with pytest.raises(ValueError, match="attention_precision='fp4'"):
        LongCatConfig.tiny(attention_precision="fp4")


@pytest.mark.parametrize("precision, pv, bound", [("fp8", "fp8", 0.03), ("int8-fp8", "fp8", 0.03),
                                                  ("fp8", "bf16", 5e-3), ("int8-fp8", "bf16", 5e-3)])
def test_online_reference_agrees_with_reference(precision, pv, bound):
    """The kernels' step-by-step arithmetic (quantized_attention_online, what GPU tests compare with)
    against the two-pass reference: they differ only by where P is rounded (measured: 0.013 with fp8
    P, 0.0013 with bf16 P), and are equally far from fp32 attention."""
    from pallas_kernels.quantized import quantized_attention_online

    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(seed=7, outlier_offset=30.0))
    idx, cnt, _ = _tables(seed=7)
    kw = dict(block_q=BLK, block_kv=BLK, precision=precision, kv_len=200, pv_precision=pv)
    ref = quantized_attention_reference(q, k, v, idx, cnt, **kw)
    online = quantized_attention_online(q, k, v, idx, cnt, **kw)
    assert _rel_l2(online, ref) < bound
    exact = block_sparse_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), idx, cnt, block_q=BLK,
                                             block_kv=BLK, kv_len=200)
    assert abs(_rel_l2(online, exact) - _rel_l2(ref, exact)) < 0.2 * _rel_l2(ref, exact)
    assert not np.asarray(online[0, 2 * BLK:3 * BLK, 1].astype(jnp.float32)).any()  # the empty row


def test_round_to_e4m3_matches_ml_dtypes_cast():
    """The explicit e4m3 rounding (no float8 convert pair for XLA to drop on the GPU) against
    ml_dtypes' float32 -> float8_e4m3fn cast: every e4m3 value, every midpoint between neighbours
    (ties to even) and the floats just beside it, subnormals, random values; +-448 saturation."""
    from pallas_kernels.quantized import round_to_e4m3

    e4m3 = ml_dtypes.float8_e4m3fn
    grid = np.arange(256, dtype=np.uint8).view(e4m3).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid) & (grid >= 0)])  # 0 .. 448
    mids = (grid[:-1] + grid[1:]) / 2
    xs = np.concatenate([grid, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
                         np.random.default_rng(0).uniform(0, 448, 20000).astype(np.float32),
                         np.random.default_rng(1).uniform(0, 2.0 ** -5, 2000).astype(np.float32),
                         np.float32([2.0 ** -10, 2.0 ** -11, 1e-30])]).astype(np.float32)
    xs = np.concatenate([xs, -xs])
    got = np.asarray(round_to_e4m3(jnp.asarray(xs)))
    want = xs.astype(e4m3).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(round_to_e4m3(jnp.float32([460.0, 1e6, -1e6, jnp.inf]))),
                                  [448.0, 448.0, -448.0, 448.0])  # satfinite
    assert np.isnan(np.asarray(round_to_e4m3(jnp.float32([jnp.nan])))).all()
