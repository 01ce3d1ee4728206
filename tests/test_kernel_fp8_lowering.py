"""The 8-bit Mosaic kernel lowers (on any machine: Mosaic GPU lowers in Python) to the 8-bit wgmma
instructions it promises: e4m3 x e4m3 -> f32 for fp8 Q.K^T and P.V, s8 x s8 -> s32 for int8 Q.K^T.
The GPU run itself (ptxas, numbers) is tests/test_kernel_fp8.py."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_mgpu_fp8 import block_sparse_attention_mgpu_fp8
from pallas_kernels.reference import block_mask_to_indices


@pytest.mark.parametrize("dim, block, kv_len, precision, pv, expected", [
    (128, 64, 1000, "fp8", "fp8", {"m64n64k32.f32.e4m3.e4m3", "m64n128k32.f32.e4m3.e4m3"}),
    (64, 128, 700, "int8-fp8", "bf16", {"m64n128k32.s32.s8.s8", "m64n64k16.f32.bf16.bf16"}),
])
def test_fp8_kernel_lowers_to_8bit_wgmma(dim, block, kv_len, precision, pv, expected):
    seq = 1024
    q = jnp.zeros((1, seq, 2, dim), jnp.bfloat16)
    idx, cnt = block_mask_to_indices(np.ones((1, 2, seq // block, seq // block), bool))

    def fn(q, k, v):
        return block_sparse_attention_mgpu_fp8(q, k, v, idx, cnt, block_q=block, block_kv=block, kv_len=kv_len,
                                               precision=precision, pv=pv)

    text = jax.jit(fn).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    found = {m.removeprefix("wgmma.mma_async.sync.aligned.") for m in re.findall(r"wgmma\.mma_async[^ ]*", text)}
    assert found == expected, found
