"""The shared diffusers-made fixtures (tests/fixtures/cogvideox) load and reproduce io.npz.

Each fixture is loaded straight from its diffusers folder and after conversion with the CLI; the
model computes its own positional embeddings from config.json and the input shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxvid.cli import convert as convert_cli
from jaxvid.models import load_transformer

FIXTURES = ["tiny_2b_sincos", "tiny_5b_rope", "tiny_15_i2v_pt2"]
MODEL_RTOL = 1e-4


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@jax.jit(static_argnums=0)
def _forward(graphdef, state, hidden_states, encoder_hidden_states, timestep, ofs):
    """Keyed on the (hashable) graphdef: the diffusers-folder and converted loads share one compilation."""
    return nnx.merge(graphdef, state)(hidden_states, encoder_hidden_states, timestep, ofs)


@pytest.fixture(scope="session", params=FIXTURES)
def fixture_case(request, fixtures_dir, tmp_path_factory):
    folder = fixtures_dir / "cogvideox" / request.param
    converted = tmp_path_factory.mktemp(request.param) / "jaxvid"
    assert convert_cli.main([str(folder / "transformer"), str(converted), "--quiet"]) == 0
    return request.param, folder, converted, dict(np.load(folder / "io.npz"))


@pytest.mark.parametrize("source", ["diffusers_folder", "converted"])
def test_fixture_matches_io(fixture_case, source):
    name, folder, converted, io = fixture_case
    model = load_transformer(folder / "transformer" if source == "diffusers_folder" else converted)
    ofs = jnp.asarray(io["ofs"]) if io["ofs"].size else None
    graphdef, state = nnx.split(model)
    out = _forward(graphdef, state, jnp.asarray(io["hidden_states"]), jnp.asarray(io["encoder_hidden_states"]),
                   jnp.asarray(io["timestep"]), ofs)
    assert out.shape == io["output"].shape
    err = rel_l2(out, io["output"])
    print(f"{name} ({source}): rel L2 = {err:.2e}")
    assert err <= MODEL_RTOL
