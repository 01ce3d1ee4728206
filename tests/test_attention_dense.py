"""Dense attention backend choice: cuDNN only where its fused kernel supports the head size."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvid.attention import dense


@pytest.mark.parametrize(("head_dim", "dtype", "expected"), [
    (64, jnp.bfloat16, "cudnn"), (128, jnp.float16, "cudnn"),
    (384, jnp.bfloat16, "xla"),  # the Wan VAE's mid-block head
    (64, jnp.float32, "xla"),
])
def test_backend_choice_on_gpu(monkeypatch, head_dim, dtype, expected):
    seen = []
    monkeypatch.setattr(dense.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dense.jax.nn, "dot_product_attention",
                        lambda q, k, v, scale=None, implementation=None: seen.append(implementation) or q)
    q = jnp.zeros((1, 4, 1, head_dim), dtype)
    dense.dense_attention(q, q, q)
    assert seen == [expected]


def test_dense_attention_matches_softmax_reference():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 7, 3, 16)), jnp.float32) for _ in range(3))
    out = dense.dense_attention(q, k, v, scale=0.25)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
    ref = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
