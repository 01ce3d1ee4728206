"""Loading at storage speed (issue 15): mapped bytes -> device, transformed and cast there.

References are independent of jaxvid's reader: the `safetensors` library (torch) for stored
values, numpy/ml_dtypes for layout changes and casts. Every comparison is bitwise.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from convert.apply import check_rules, iter_assembled  # noqa: E402
from convert.keymap import Rule  # noqa: E402
from convert.keymaps.cogvideox import conv_patch_to_linear  # noqa: E402
from convert.safetensors_io import SafetensorsReader, write_safetensors  # noqa: E402
from convert.transforms import chain, conv3d_to_dhwio, identity, linear_T, reshape  # noqa: E402
from jaxvid.models.loading import device_transform, load_arrays, load_model  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind in "fV" or a.dtype == BF16 else a


def _torch_values(path, key) -> np.ndarray:
    """The stored tensor as read by the safetensors library, as numpy (bf16 via its bits)."""
    t = safetensors_torch.load_file(str(path))[key]
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((6, 5)).astype(np.float32),
        "big": rng.standard_normal((1100, 1000)).astype(np.float32),
        "bf16": rng.standard_normal((4, 3, 2)).astype(BF16),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i32": rng.integers(-9, 9, (3, 4)).astype(np.int32),
        "u8": rng.integers(0, 255, (5,)).astype(np.uint8),
        "lin_bf16": rng.standard_normal((8, 6)).astype(BF16),
        "conv3d": rng.standard_normal((4, 3, 2, 3, 3)).astype(BF16),
        "patch": rng.standard_normal((5, 2, 2, 2)).astype(np.float32),
        "gamma": rng.standard_normal((6, 1, 1, 1)).astype(np.float32),
        "layer0": rng.standard_normal((6, 4)).astype(BF16),
        "layer1": rng.standard_normal((6, 4)).astype(BF16),
        "scalar": np.asarray(1.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        # fp32 values that round differently to bf16 (ties, subnormals, large)
        "to_bf16": np.concatenate([rng.standard_normal(64), [1 + 2**-8, 1 + 3 * 2**-8, 1e-40, 3e38, -0.0]])
        .astype(np.float32),
    }
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    write_safetensors(path, tensors)
    return path, tensors


def test_mapped_read_equals_safetensors_library(stored):
    path, tensors = stored
    reader = SafetensorsReader(path)
    for key in tensors:
        ours = reader.read_mapped(key)
        ref = _torch_values(path, key) if key != "empty" else tensors[key]
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, key
        np.testing.assert_array_equal(_bits(ours), _bits(ref), err_msg=key)


def test_loaded_arrays_are_bitwise_the_stored_values(stored):
    path, tensors = stored
    reader = SafetensorsReader(path)
    cases = [  # (rule, target dtype)
        (Rule("f32", "a.f32"), np.float32),
        (Rule("big", "a.big", linear_T), BF16),  # >= 4 MB: transposed and cast on the device
        (Rule("bf16", "a.bf16"), BF16),
        (Rule("f16", "a.f16"), np.float16),
        (Rule("i32", "a.i32"), np.int32),
        (Rule("u8", "a.u8"), np.uint8),
        (Rule("scalar", "a.scalar"), np.float32),
        (Rule("empty", "a.empty"), np.float32),
        (Rule("lin_bf16", "a.lin", linear_T), BF16),
        (Rule("conv3d", "a.conv3d", conv3d_to_dhwio), BF16),
        (Rule("patch", "a.patch", conv_patch_to_linear), np.float32),
        (Rule("gamma", "a.gamma", reshape((6,), name="flatten_gamma[6]")), np.float32),
        (Rule("to_bf16", "a.to_bf16"), BF16),  # cast on the device
        (Rule("bf16", "a.bf16_up", chain(identity, reshape((4, 6)))), np.float32),
        (Rule("layer0", "a.stacked[0]", linear_T), BF16),
        (Rule("layer1", "a.stacked[1]", linear_T), BF16),
    ]
    specs = {}
    for r, dt in cases:
        shape = r.transform.shape_fn(reader.shape(r.source))
        if r.target_index is not None:
            shape = (2, *shape)
        specs[r.target_path] = _spec(shape, dt)
    import jaxvid.models.loading as loading

    monkey = pytest.MonkeyPatch()
    try:
        # every tensor (stacked slices too) on the device path, then the default split
        for min_bytes, stack_bytes in ((0, -1), (loading.DEVICE_MIN_BYTES, loading.HOST_STACK_MAX_BYTES)):
            monkey.setattr(loading, "DEVICE_MIN_BYTES", min_bytes)
            monkey.setattr(loading, "HOST_STACK_MAX_BYTES", stack_bytes)
            got = load_arrays([r for r, _ in cases], reader, specs, progress=False)
            _check(cases, got, path, tensors)
    finally:
        monkey.undo()


def _check(cases, got, path, tensors):
    for r, dt in cases:
        if r.target_index is not None:
            continue
        ref = r.transform(_torch_values(path, r.source) if r.source != "empty" else tensors["empty"])
        ref = np.asarray(ref).astype(dt)  # numpy / ml_dtypes rounding is the reference for casts
        out = np.asarray(got[r.target_path])
        assert out.dtype == np.dtype(dt) and out.shape == ref.shape, r.target
        np.testing.assert_array_equal(_bits(out), _bits(ref), err_msg=r.target)
    stacked = np.stack([_torch_values(path, f"layer{i}").T for i in range(2)])
    np.testing.assert_array_equal(_bits(np.asarray(got["a.stacked"])), _bits(stacked))


def test_every_registered_transform_name_runs_on_the_device():
    from convert.transforms import conv1d_to_kio, conv2d_to_hwio

    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    for t in (conv2d_to_hwio, conv_patch_to_linear, reshape((6, 20))):
        fn = device_transform(t, x.shape, np.float32)
        assert fn is not None, t.name
        np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(x))), t(x))
    y = x.reshape(2, 3, 20)
    np.testing.assert_array_equal(np.asarray(device_transform(conv1d_to_kio, y.shape, np.float32)(jnp.asarray(y))),
                                  conv1d_to_kio(y))


def test_whole_tiny_pipeline_loads_as_the_host_path(tmp_path):
    """Every component of the tiny CogVideoX pipeline (real key tables): new path == old host path."""
    from flax import nnx

    from jaxvid.models.loading import abstract_params, class_name_of, config_for, entry_for, read_config, rules_for
    from jaxvid.synthetic.cogvideox import write_tiny_pipeline

    folder = write_tiny_pipeline(tmp_path / "tiny")
    for comp in ("transformer", "vae", "text_encoder"):
        model = load_model(folder / comp)
        entry = entry_for(class_name_of(read_config(folder / comp)))
        source = SafetensorsReader(folder / comp)
        cfg = model.cfg
        specs = abstract_params(nnx.eval_shape(lambda: model))[1]  # noqa: B023
        rules = check_rules(rules_for(entry, cfg, source), source, specs, ignore=entry.ignore)
        ref = dict(iter_assembled(rules, source, specs))
        state = {".".join(str(p) for p in path): v.get_value()
                 for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        assert set(state) == set(ref), comp
        for key, value in state.items():
            np.testing.assert_array_equal(_bits(np.asarray(value)), _bits(ref[key]), err_msg=f"{comp}: {key}")
        assert config_for  # imported for the registry check above


def test_tensors_in_flight_are_capped(tmp_path, monkeypatch):
    """Device memory while loading stays near the model's size: without the cap every per-layer
    slice of a stacked parameter could land on the device before the stacked buffer is written (up
    to 2x the model; how the 24 GiB run of CogVideoX-5b ran out of memory). Measured from outside
    the loader: the bytes of every live jax array, sampled by a thread while it loads (sampling can
    miss a short peak, so an uncapped load is not asserted to exceed the bound)."""
    import threading
    import time

    layers, shape = 64, (256, 256)
    rng = np.random.default_rng(1)
    tensors = {f"layer{i}": rng.standard_normal(shape).astype(np.float32) for i in range(layers)}
    path = tmp_path / "stacked.safetensors"
    write_safetensors(path, tensors)
    reader = SafetensorsReader(path)
    rules = [Rule(f"layer{i}", f"w[{i}]", linear_T) for i in range(layers)]
    specs = {"w": _spec((layers, *shape), np.float32)}
    model_bytes = layers * tensors["layer0"].nbytes  # 16 MiB

    def peak_while_loading(**cap):
        baseline = sum(a.nbytes for a in jax.live_arrays())
        peak, done = [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], sum(a.nbytes for a in jax.live_arrays()) - baseline)
                time.sleep(0.0005)

        thread = threading.Thread(target=sample)
        thread.start()
        try:
            out = load_arrays(rules, reader, specs, progress=False, **cap)
        finally:
            done.set()
            thread.join()
        ref = np.stack([t.T for t in tensors.values()])
        np.testing.assert_array_equal(np.asarray(out["w"]), ref)
        del out
        return peak[0]

    import jaxvid.models.loading as loading

    monkeypatch.setattr(loading, "HOST_STACK_MAX_BYTES", 0)  # the stacked target is filled on the device
    cap = 2 * 1024 * 1024
    capped = peak_while_loading(max_bytes_in_flight=cap)
    # at least the stacked buffer (the sampler sees the loader's arrays), at most it plus the cap
    assert model_bytes <= capped <= model_bytes + cap + tensors["layer0"].nbytes, capped / model_bytes
