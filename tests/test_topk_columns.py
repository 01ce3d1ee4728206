"""Top-k column selection (BSA gating): the Pallas kernel picks exactly lax.top_k's set.

CPU: the kernel through the Pallas interpreter, on random scores, heavy ties, infinities and
signed zeros. GPU (skipped elsewhere): the Triton kernel at LongCat's 720p shape and others.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.topk_columns import topk_sorted_columns, topk_sorted_columns_reference


def _lax_top_k_sorted(scores: np.ndarray, k: int) -> np.ndarray:
    """Independent numpy definition: k largest, ties to the lower column, ascending."""
    order = np.lexsort((np.arange(scores.shape[-1]) + np.zeros_like(scores, dtype=np.int64), -scores), axis=-1)
    return np.sort(order[..., :k], axis=-1).astype(np.int32)


@pytest.mark.parametrize("shape,k", [((2, 3, 10, 37), 5), ((1, 17, 100), 13), ((2, 9, 660), 41),
                                     ((1, 5, 64), 64), ((1, 5, 64), 1)])
def test_interpreted_kernel_matches_top_k_on_random_scores(shape, k):
    scores = np.random.default_rng(sum(shape) + k).standard_normal(shape).astype(np.float32)
    got = np.asarray(topk_sorted_columns(jnp.asarray(scores), k, implementation="interpret"))
    np.testing.assert_array_equal(got, _lax_top_k_sorted(scores, k))
    np.testing.assert_array_equal(got, np.asarray(topk_sorted_columns_reference(jnp.asarray(scores), k)))


def test_ties_go_to_lower_columns_and_signed_zeros_are_equal():
    rng = np.random.default_rng(3)
    scores = rng.integers(-2, 3, (4, 6, 50)).astype(np.float32)  # five values: ties everywhere
    scores[0, 0] = 0.0
    scores[0, 1] = -0.0
    for k in (1, 7, 25, 50):
        got = np.asarray(topk_sorted_columns(jnp.asarray(scores), k, implementation="interpret"))
        np.testing.assert_array_equal(got, _lax_top_k_sorted(scores, k), err_msg=f"k={k}")


def test_infinities():
    scores = np.full((2, 4, 30), -np.inf, np.float32)
    scores[:, :, 3] = 1.0
    scores[1, :, 7] = np.inf
    got = np.asarray(topk_sorted_columns(jnp.asarray(scores), 4, implementation="interpret"))
    np.testing.assert_array_equal(got, _lax_top_k_sorted(scores, 4))


def test_dispatch_and_argument_errors():
    scores = jnp.zeros((3, 8), jnp.float32)
    if jax.devices()[0].platform != "gpu":
        with pytest.raises(ValueError, match="implementation='triton' needs a CUDA GPU"):
            topk_sorted_columns(scores, 2, implementation="triton")
    with pytest.raises(ValueError, match="implementation='cuda'"):
        topk_sorted_columns(scores, 2, implementation="cuda")
    with pytest.raises(ValueError, match=r"k=9; expected an int in \[1, 8\]"):
        topk_sorted_columns(scores, 9)
    with pytest.raises(ValueError, match=r"k=0"):
        topk_sorted_columns(scores, 0)
    with pytest.raises(ValueError, match="scores.shape"):
        topk_sorted_columns(jnp.zeros((8,)), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,k", [((1, 32, 1320, 1320), 82), ((1, 32, 660, 660), 41),
                                     ((2, 3, 1000, 3000), 300), ((1, 2, 70, 129), 129)])
def test_triton_kernel_matches_top_k_on_gpu(shape, k):
    key = jax.random.PRNGKey(sum(shape) + k)
    scores = jax.random.normal(key, shape, jnp.float32)
    # Some exact ties across the row, as identical chunks give.
    scores = scores.at[..., 5].set(scores[..., 9])
    got = topk_sorted_columns(scores, k, implementation="triton")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(topk_sorted_columns_reference(scores, k)))
