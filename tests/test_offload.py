"""Offload policies (issue 15): parked components live in pinned host memory (jax's CPU backend has
that memory kind too), the text encoder is read from its checkpoint on demand under every policy
but "none", and the video equals the one with every component resident (the reference:
offload="none", one loop call without a progress bar)."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvid.models.offload import Offload, check_policy, memory_kinds
from jaxvid.pipelines.cogvideox import CogVideoXPipeline

KW = dict(num_frames=9, height=32, width=32, num_inference_steps=2, seed=1)


class DeviceLoaderSpy:
    """Stands in for jaxvid.models.loading.load_arrays (the device loader) while `on`: records the
    target paths of each call in `calls`, then runs the real loader (`real`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        import jaxvid.models.loading as loading

        self._patch, self._loading, self.real = monkeypatch, loading, loading.load_arrays
        self.calls: list[set[str]] = []
        self.on()

    def __call__(self, rules, *args, **kwargs):
        self.calls.append({r.target_path for r in rules})
        return self.real(rules, *args, **kwargs)

    @property
    def paths(self) -> set[str]:
        """Every path asked for so far."""
        return set().union(*self.calls)

    def on(self) -> None:
        self._patch.setattr(self._loading, "load_arrays", self)

    def off(self) -> None:
        self._patch.setattr(self._loading, "load_arrays", self.real)



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from jaxvid.synthetic.cogvideox import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="module")
def resident_pipe(folder):
    return CogVideoXPipeline.from_pretrained(folder, offload="none")


@pytest.fixture(scope="module")
def resident(resident_pipe):
    return resident_pipe("a prompt", progress=False, **KW)


# "text" is the default, so every other pipeline test runs it (against diffusers); "blocks" only
# changes the denoiser, so its check stops at the latents (no second VAE compile). Under both the
# T5 encoder is read on demand, so the videos also check its on-demand weights.
@pytest.mark.parametrize("policy", ["model", "blocks"])
def test_offloaded_video_equals_resident(folder, resident, policy):
    pipe = CogVideoXPipeline.from_pretrained(folder, offload=policy)
    assert pipe.text_encoder.on_demand is not None  # read from its checkpoint at each encode
    parked = {"model": {"transformer", "vae"}, "blocks": {"vae"}}[policy]

    def where():
        return {name: memory_kinds(getattr(pipe, name).state) for name in ("transformer", "vae")}

    before = where()
    for name in ("transformer", "vae"):
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


def test_longcat_blocks_stream_from_host_and_match_resident(tmp_path, monkeypatch):
    """LongCat's DiT under offload="blocks": its blocks load straight into pinned host memory (the
    device loader never sees them; the umT5 encoder is not read at all) and stream into the layer
    scan; the denoised latents equal those of a resident pipeline bit for bit. umT5 is read from
    its checkpoint once per encode_prompt (both CFG halves) and leaves nothing behind."""
    from flax import nnx

    from jaxvid.pipelines.longcat import LongCatPipeline
    from jaxvid.synthetic.longcat import write_tiny_longcat

    folder = write_tiny_longcat(tmp_path / "longcat", seed=0, loras=False)
    kw = dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=4.0, seed=1,
              max_sequence_length=16, output_type="latent")
    resident = LongCatPipeline.from_pretrained(folder, progress=False, offload="none")
    s = resident.vae_scale_factor_spatial
    shape = (1, resident.dit.cfg.in_channels, (kw["num_frames"] - 1) // resident.vae_scale_factor_temporal + 1,
             kw["height"] // s, kw["width"] // s)
    spy = DeviceLoaderSpy(monkeypatch)
    pipe = LongCatPipeline.from_pretrained(folder, progress=False, offload="blocks")
    spy.off()
    to_device = spy.paths
    # what the device loader got: the DiT's non-block weights only (umT5 and VAE parked whole)
    dit_paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(pipe.dit, nnx.Param))}
    assert to_device and set(to_device) <= dit_paths and not any(p.startswith("blocks.") for p in to_device)
    dit = pipe.components["dit"].state
    assert memory_kinds(dit["blocks"]) == {"pinned_host"} and memory_kinds(dit) == {"pinned_host", "device"}
    assert pipe.components["text_encoder"].on_demand is not None
    with pytest.raises(ValueError, match=r"text_encoder.module: its weights are not kept.*load_module\(\)"):
        pipe.text_encoder  # noqa: B018 (LongCat's property: a clear error, not a module without weights)
    # the caller's latents (float32, as the loop runs) go in; the loop donates only its own copy
    noise = jax.random.normal(jax.random.key(3), shape, jnp.float32)
    want = resident.generate_t2v("a cat", "blurry", latents=noise, **kw).latents
    got = pipe.generate_t2v("a cat", "blurry", latents=noise, **kw).latents
    assert not noise.is_deleted()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # umT5 is read to the device once for both CFG halves, and no copy of it stays anywhere
    spy.calls.clear()
    spy.on()
    before = _live_arrays()
    embeds, mask = pipe.encode_prompt("a cat", "blurry", max_sequence_length=16)
    assert len(spy.calls) == 1
    assert {i for i in _live_arrays() if i not in before} == {id(embeds), id(mask)}
    want_embeds, want_mask = resident.encode_prompt("a cat", "blurry", max_sequence_length=16)
    np.testing.assert_array_equal(np.asarray(embeds), np.asarray(want_embeds))
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(want_mask))


# "text" parks only the text encoder, which "model" covers
@pytest.mark.parametrize("policy", ["model", "blocks"])
def test_parked_weights_load_straight_to_host(folder, monkeypatch, policy):
    """Offloaded weights never pass through the device while loading: the device loader
    (loading.load_arrays) is never asked for a parked Param, the host loader puts them in pinned
    host memory, and every loaded array equals the one a resident load reads from the same file."""
    from flax import nnx

    import jaxvid.models.loading as loading

    spy = DeviceLoaderSpy(monkeypatch)
    off = Offload(policy)
    parked = {"text": {"text_encoder"}, "model": {"text_encoder", "transformer", "vae"},
              "blocks": {"vae"}}[policy]
    streamed = {"transformer": "transformer_blocks", "text_encoder": "blocks"}
    for name in ("text_encoder", "transformer", "vae"):
        spy.calls.clear()
        model = loading.load_model(folder / name, host=off.host_paths(name))
        to_device = spy.paths
        state = nnx.state(model, nnx.Param)
        if name in parked:
            assert not to_device and memory_kinds(state) == {"pinned_host"}, name
        elif policy == "blocks":  # the stacked blocks on the host, the other weights on the device
            blocks = streamed[name]
            assert to_device and not any(p.startswith(blocks + ".") for p in to_device)
            assert memory_kinds(state[blocks]) == {"pinned_host"}
            assert memory_kinds(state) == {"pinned_host", "device"}
        else:
            assert memory_kinds(state) == {"device"} and to_device, name
        spy.off()
        reference = nnx.state(loading.load_model(folder / name), nnx.Param)
        spy.on()
        for (path, want), (_, got) in zip(nnx.to_flat_state(reference), nnx.to_flat_state(state)):
            assert got.get_value().dtype == want.get_value().dtype, path
            np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(want.get_value()), err_msg=str(path))


def test_host_loader_casts_per_tensor_like_numpy(folder):
    """A dtype change while loading to host memory (the tiny T5's fp32 file as bf16): each stored
    tensor is transposed, cast and placed in its stacked layer slot on its own, and equals numpy's
    round-to-nearest-even cast of the file's tensor."""
    import ml_dtypes

    from convert.safetensors_io import SafetensorsReader
    from jaxvid.models.loading import load_model

    model = load_model(folder / "text_encoder", dtype="bf16", host=lambda path: True)
    got = model.blocks.attention.q.kernel.get_value()  # [layers, in, out] from per-layer [out, in]
    assert got.dtype == ml_dtypes.bfloat16 and got.sharding.memory_kind == "pinned_host"
    reader = SafetensorsReader(folder / "text_encoder")
    for i in range(got.shape[0]):
        stored = reader.read(f"encoder.block.{i}.layer.0.SelfAttention.q.weight")
        assert stored.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(got)[i],
                                      stored.T.astype(ml_dtypes.bfloat16))


def _live_arrays() -> dict[int, jax.Array]:
    """Every live array, device and pinned host alike (references held, so no id is reused)."""
    return {id(a): a for a in jax.live_arrays()}


def test_text_encoder_is_read_on_demand_and_leaves_nothing(folder, resident_pipe, monkeypatch, caplog):
    """Under the default policy from_pretrained reads no T5 weight; each encode_prompt reads them
    from the checkpoint to the device once (one call of the device loader), and afterwards the
    process holds exactly the arrays it held before plus the embeddings: no weight survives on
    the device or in pinned host memory. The embeddings equal offload="none"'s bit for bit, whose
    encoder stays on the device by contract."""

    spy = DeviceLoaderSpy(monkeypatch)
    reads = spy.calls
    pipe = CogVideoXPipeline.from_pretrained(folder)  # offload="text"
    t5_paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(resident_pipe.text_encoder.module,
                                                                               nnx.Param))}
    assert len(reads) == 2 and t5_paths not in reads  # the transformer and the VAE only
    with pytest.raises(ValueError, match="text_encoder.state: its weights are not kept.*offload='none'"):
        pipe.text_encoder.state
    reads.clear()
    prompts = ["", "a prompt"]
    want = resident_pipe.encode_prompt(prompts)
    for n in (1, 2):  # once per encode, every time
        before = _live_arrays()
        with caplog.at_level("INFO", logger="jaxvid.pipelines.loop"):
            embeds = pipe.encode_prompt(prompts)
        assert reads == [t5_paths] * n
        new = [a for i, a in _live_arrays().items() if i not in before]
        assert [id(a) for a in new] == [id(embeds)], [(a.shape, a.dtype, a.sharding.memory_kind) for a in new]
        assert all(not a.is_deleted() for a in before.values())
        np.testing.assert_array_equal(np.asarray(embeds), np.asarray(want))
    assert caplog.text.count("text_encoder: read 0.00 GB from") == 2
    assert pipe._encode_text.num_compiled == 1  # each read's state fits the one executable (same graphdef)
    assert memory_kinds(resident_pipe.text_encoder.state) == {"device"}


def test_blocks_streams_the_text_encoder_from_host(folder, resident_pipe, monkeypatch):
    """offload="blocks": each encode reads the T5 blocks into pinned host memory (never through the
    device loader) and its embeddings and final norm to the device; the layer scan streams the
    blocks in, the embeddings equal offload="none"'s bit for bit, and nothing of the weights
    survives the encode."""
    spy = DeviceLoaderSpy(monkeypatch)
    pipe = CogVideoXPipeline.from_pretrained(folder, offload="blocks")
    host_kinds = []
    real_update = pipe.text_encoder.on_demand.load

    def load(**kw):  # the module the encode runs: where its weights are
        module = real_update(**kw)
        host_kinds.append(memory_kinds(nnx.state(module, nnx.Param)["blocks"]))
        host_kinds.append(memory_kinds(nnx.state(module, nnx.Param)["shared"]))
        return module

    monkeypatch.setattr(pipe.text_encoder.on_demand, "load", load)
    spy.calls.clear()
    prompts = ["", "a prompt"]
    before = _live_arrays()
    embeds = pipe.encode_prompt(prompts)
    assert host_kinds == [{"pinned_host"}, {"device"}]
    assert spy.paths and not any(p.startswith("blocks.") for p in spy.paths)
    new = [a for i, a in _live_arrays().items() if i not in before]
    assert [id(a) for a in new] == [id(embeds)], [(a.shape, a.dtype, a.sharding.memory_kind) for a in new]
    np.testing.assert_array_equal(np.asarray(embeds), np.asarray(resident_pipe.encode_prompt(prompts)))


def test_bad_text_encoder_checkpoint_fails_at_from_pretrained(folder, tmp_path, monkeypatch):
    """The on-demand text encoder's checkpoint is checked when the pipeline loads, before anything
    else is read: a missing tensor or one of the wrong shape fails in from_pretrained, naming it
    (load_model's check); a file changed after the check fails at the next read, clearly."""
    import os
    import shutil

    import jaxvid.models.loading as loading
    from convert.safetensors_io import SafetensorsReader, write_safetensors

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read before the text encoder was checked")

    good = dict(SafetensorsReader(folder / "text_encoder").items())
    missing, wrong = "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    monkeypatch.setattr(loading, "load_arrays", no_reads)
    for case, tensors in (("missing", {k: v for k, v in good.items() if k != missing}),
                          ("wrong shape", {**good, wrong: good[wrong][:, :-1]})):
        bad = tmp_path / case
        # the folder without T5's weight files, then the bad one written in their place
        shutil.copytree(folder, bad, ignore=lambda d, names: [n for n in names if Path(d).name == "text_encoder"
                                                               and ".safetensors" in n])
        write_safetensors(bad / "text_encoder" / "model.safetensors", {k: np.ascontiguousarray(v) for k, v in tensors.items()})
        with pytest.raises(ValueError, match=missing if case == "missing" else wrong):
            CogVideoXPipeline.from_pretrained(bad)  # offload="text": checked, not read
    monkeypatch.undo()
    changed = tmp_path / "changed"
    shutil.copytree(folder / "text_encoder", changed)
    checked = loading.check_model(changed)
    weights = next(changed.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="changed: its files changed after the pipeline checked them"):
        checked.load()


def test_step_end_callback_keeps_its_latents(resident_pipe, resident):
    """The loop donates its carry step to step; latents a step-end callback was shown (and kept)
    are the caller's and stay valid, and the video equals the one without a callback."""
    kept = []

    def keep(pipe, step, timestep, kwargs):
        kept.append(kwargs["latents"])
        return kwargs  # diffusers' usual callback: hand the same latents back

    out = resident_pipe("a prompt", progress=False, callback_on_step_end=keep, **KW)
    assert len(kept) == KW["num_inference_steps"] and not any(a.is_deleted() for a in kept)
    np.testing.assert_array_equal(np.asarray(kept[-1], np.float32), out.latents)
    np.testing.assert_array_equal(out.latents, resident.latents)


@pytest.mark.parametrize("host", [False, True], ids=["to device", "to host"])
def test_loading_with_a_cast_leaves_one_copy_of_each_weight(folder, host):
    """Loading the fp32 T5 as bf16 (to the device, or straight to pinned host memory): once loaded,
    the only new live arrays are the model's own weights; no stored-dtype copy or staging buffer
    survives its cast."""
    from flax import nnx

    from jaxvid.models.loading import load_model

    before = {id(a): a for a in jax.live_arrays()}  # references held, so no id is reused
    model = load_model(folder / "text_encoder", dtype="bf16", host=(lambda path: True) if host else None)
    weights = {id(a) for a in jax.tree.leaves(nnx.state(model))}
    new = [a for a in jax.live_arrays() if id(a) not in before]
    assert {id(a) for a in new} == weights, [(a.shape, a.dtype) for a in new if id(a) not in weights]
    assert {a.dtype for a in new} == {jnp.dtype(jnp.bfloat16)}


def test_host_loader_falls_back_through_the_device_one_tensor_at_a_time(folder, monkeypatch, caplog):
    """A jax that cannot copy numpy straight into pinned memory: the loader says so once and routes
    each tensor through the device; the arrays still end in pinned_host, equal to a resident load."""
    from flax import nnx

    from jaxvid.models.loading import load_model

    real_put = jax.device_put

    def refuse_numpy_to_host(x, device=None, **kwargs):
        if isinstance(x, np.ndarray) and getattr(device, "memory_kind", None) == "pinned_host":
            raise ValueError("cannot fill pinned_host from numpy")
        return real_put(x, device, **kwargs)

    want = nnx.state(load_model(folder / "vae"), nnx.Param)
    monkeypatch.setattr(jax, "device_put", refuse_numpy_to_host)
    with caplog.at_level("WARNING", logger="jaxvid.models.loading"):
        got = nnx.state(load_model(folder / "vae", host=lambda path: True), nnx.Param)
    monkeypatch.setattr(jax, "device_put", real_put)
    assert caplog.text.count("passes through the device") == 1
    assert memory_kinds(got) == {"pinned_host"}
    for (path, a), (_, b) in zip(nnx.to_flat_state(want), nnx.to_flat_state(got)):
        np.testing.assert_array_equal(np.asarray(b.get_value()), np.asarray(a.get_value()), err_msg=str(path))
