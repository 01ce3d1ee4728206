"""Offload policies (issue 15): parked components live in pinned host memory (jax's CPU backend has
that memory kind too) and the video equals the one with every component resident (the reference:
offload="none", one loop call without a progress bar)."""
from __future__ import annotations

import numpy as np
import pytest

from jaxvid.models.offload import Offload, check_policy, memory_kinds
from jaxvid.pipelines.cogvideox import CogVideoXPipeline

KW = dict(num_frames=9, height=32, width=32, num_inference_steps=2, seed=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from jaxvid.synthetic.cogvideox import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="module")
def resident(folder):
    return CogVideoXPipeline.from_pretrained(folder, offload="none")("a prompt", progress=False, **KW)


# "text" is the default, so every other pipeline test runs it (against diffusers); "blocks" only
# changes the denoiser, so its check stops at the latents (no second VAE compile).
@pytest.mark.parametrize("policy", ["model", "blocks"])
def test_offloaded_video_equals_resident(folder, resident, policy):
    pipe = CogVideoXPipeline.from_pretrained(folder, offload=policy)
    parked = {"text": {"text_encoder"}, "model": {"text_encoder", "transformer", "vae"},
              "blocks": {"text_encoder", "vae"}}[policy]

    def where():
        return {name: memory_kinds(getattr(pipe, name).state) for name in ("text_encoder", "transformer", "vae")}

    before = where()
    for name in ("text_encoder", "transformer", "vae"):
        if name in parked:
            assert before[name] == {"pinned_host"}, name
        elif not (policy == "blocks" and name == "transformer"):
            assert before[name] == {"device"}, name
    if policy == "blocks":  # the transformer's blocks on the host, its other weights on the device
        assert before["transformer"] == {"pinned_host", "device"}
        assert memory_kinds(pipe.transformer.state["transformer_blocks"]) == {"pinned_host"}
    # progress on: the loop runs one step per call from the host (the reference ran all steps in one call)
    out = pipe("a prompt", progress=True, output_type="latent" if policy == "blocks" else "uint8", **KW)
    np.testing.assert_array_equal(out.latents, resident.latents)
    if policy != "blocks":
        np.testing.assert_array_equal(out.frames, resident.frames)
    assert where() == before  # still parked after the call


def test_bad_policy_names_the_choices():
    with pytest.raises(ValueError, match="offload='layers'.*expected one of"):
        check_policy("layers")
    assert check_policy(None) == "text"


def test_device_without_pinned_host_keeps_everything_resident(caplog):
    class NoHostMemory:
        def addressable_memories(self):
            raise NotImplementedError

        def __str__(self):
            return "fake:0"

    with caplog.at_level("WARNING"):
        off = Offload("model", device=NoHostMemory())
    assert off.policy == "none" and off.requested == "model"
    assert "no pinned_host memory" in caplog.text and not off.parks("transformer")


def test_longcat_blocks_stream_from_host_and_match_resident(tmp_path):
    """LongCat's DiT under offload="blocks": its blocks stay in pinned host memory and stream into
    the layer scan; the denoised latents equal those of a resident pipeline bit for bit."""
    from jaxvid.pipelines.longcat import LongCatPipeline
    from jaxvid.synthetic.longcat import write_tiny_longcat

    folder = write_tiny_longcat(tmp_path / "longcat", seed=0, loras=False)
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=4.0, seed=1,
              max_sequence_length=16, output_type="latent")
    resident = LongCatPipeline.from_pretrained(folder, progress=False, offload="none")
    want = resident.generate_t2v("a cat", "blurry", **kw).latents
    pipe = LongCatPipeline.from_pretrained(folder, progress=False, offload="blocks")
    dit = pipe.components["dit"].state
    assert memory_kinds(dit["blocks"]) == {"pinned_host"} and memory_kinds(dit) == {"pinned_host", "device"}
    assert memory_kinds(pipe.components["text_encoder"].state) == {"pinned_host"}
    got = pipe.generate_t2v("a cat", "blurry", **kw).latents
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
