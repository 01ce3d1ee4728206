"""The benchmarks' folder writer (jaxvid.synthetic.cogvideox.write_random_full_pipeline): diffusers
reads the folder it writes as a whole CogVideoX pipeline, and jaxvid reads the same weights."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from jaxvid.synthetic import cogvideox as synth


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tcfg, vcfg, t5cfg = synth.tiny_configs()
    out = tmp_path_factory.mktemp("full") / "pipe"
    synth.write_random_full_pipeline(out, tcfg, vcfg, t5cfg, values=synth.pooled_random_values(1 << 12))
    return out


def test_pooled_values_are_bf16_and_norms_one():
    values = synth.pooled_random_values(1 << 10)
    x = values("blocks.0.attn.to_q.weight", (40, 50))  # larger than the pool: wraps around
    assert x.dtype == ml_dtypes.bfloat16 and x.shape == (40, 50)
    assert 0.01 < float(np.std(x.astype(np.float32))) < 0.03
    assert np.all(values("norm1.norm.weight", (7,)).astype(np.float32) == 1.0)


def test_diffusers_and_jaxvid_read_the_same_weights(folder):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")

    import jax
    from flax import nnx

    from jaxvid.pipelines.cogvideox import CogVideoXPipeline

    ref = diffusers.CogVideoXPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe = CogVideoXPipeline.from_pretrained(folder, dtype="fp32", offload="none")
    # layouts differ ([out, in] in torch, [in, out] here), so compare each component's parameter
    # count and the sorted multiset of its values
    for name in ("transformer", "vae", "text_encoder"):
        want = np.sort(np.concatenate([p.detach().numpy().ravel() for p in getattr(ref, name).parameters()]))
        leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(nnx.state(getattr(pipe, name).module, nnx.Param))]
        got = np.sort(np.concatenate(leaves))
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
