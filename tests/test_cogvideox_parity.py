"""CogVideoX transformer vs diffusers' CogVideoXTransformer3DModel on tiny random models (fp32, CPU).

Each case is a tiny diffusers model (2b-like sincos, 5b-like RoPE, 1.5-like patch_size_t=2, I2V-like
with a learned table and ofs), saved with save_pretrained, converted with the CLI, loaded with
load_transformer and run on the same inputs as the torch model. Positional embeddings for the
torch side come from diffusers' own functions (as its pipelines compute them); ours are computed
inside the model.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import CogVideoXTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid  # noqa: E402
from flax import nnx  # noqa: E402

from convert.keymaps.cogvideox import diffusers_shapes  # noqa: E402
from jaxvid.cli import convert as convert_cli  # noqa: E402
from jaxvid.models import load_transformer  # noqa: E402
from jaxvid.models.cogvideox import CogVideoXConfig, rotary_table, sincos_table  # noqa: E402

MODEL_RTOL = 1e-4
LAYER_RTOL = 1e-5
TABLE_RTOL = 1e-6

_TINY = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
    text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, max_text_seq_length=4,
)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: dict
    frames: int
    height: int
    width: int
    text_tokens: int = 4
    ofs: bool = False


CASES = [
    # 2b: sincos table recomputed for a non-sample size; exact GELU for coverage
    Case("2b_sincos", dict(activation_fn="gelu"), frames=2, height=8, width=12),
    # 5b: RoPE with a crop region off the base grid; text length free under RoPE
    Case("5b_rope", dict(use_rotary_positional_embeddings=True), frames=3, height=8, width=12, text_tokens=6),
    # 1.5: patch_size_t=2, slice grid smaller than the base grid, no affine norms, no patch bias
    Case(
        "15_pt2",
        dict(use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, norm_elementwise_affine=False),
        frames=4, height=6, width=8,
    ),
    # I2V: 2x input channels, learned table (sample size, so the stored table is used), ofs
    Case(
        "i2v_learned_ofs",
        dict(in_channels=8, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True, ofs_embed_dim=8),
        frames=3, height=8, width=8, ofs=True,
    ),
]


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_rotary(model, frames: int, height: int, width: int):
    """diffusers' pipeline logic (_prepare_rotary_positional_embeddings) on latent sizes."""
    c = model.config
    gh, gw = height // c.patch_size, width // c.patch_size
    base_w, base_h = c.sample_width // c.patch_size, c.sample_height // c.patch_size
    if c.patch_size_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
        return get_3d_rotary_pos_embed(c.attention_head_dim, crops, (gh, gw), frames)
    t = (frames + c.patch_size_t - 1) // c.patch_size_t
    return get_3d_rotary_pos_embed(
        c.attention_head_dim, None, (gh, gw), t, grid_type="slice", max_size=(base_h, base_w)
    )


def make_inputs(case: Case, cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = 2
    return {
        "hidden_states": rng.standard_normal((b, case.frames, cfg["in_channels"], case.height, case.width)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((b, case.text_tokens, cfg["text_embed_dim"])).astype(np.float32),
        "timestep": np.array([999, 321], np.int64),
        "ofs": np.array([2.0], np.float32) if case.ofs else None,
    }


def torch_forward(model, inputs: dict, case: Case) -> np.ndarray:
    rope = torch_rotary(model, case.frames, case.height, case.width) if model.config.use_rotary_positional_embeddings else None
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(inputs["hidden_states"]),
            encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]),
            timestep=torch.from_numpy(inputs["timestep"]),
            ofs=None if inputs["ofs"] is None else torch.from_numpy(inputs["ofs"]),
            image_rotary_emb=rope,
            return_dict=False,
        )[0]
    return out.numpy()


@jax.jit(static_argnums=0)
def _forward(graphdef, state, hidden_states, encoder_hidden_states, timestep, ofs):
    return nnx.merge(graphdef, state)(hidden_states, encoder_hidden_states, timestep, ofs)


def jax_forward(model, inputs: dict) -> np.ndarray:
    """One module-level jit keyed on the (hashable) graphdef: every test of a case, LoRA states included,
    reuses the same compilation instead of tracing a fresh lambda each call."""
    ofs = None if inputs["ofs"] is None else jnp.asarray(inputs["ofs"])
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(inputs["hidden_states"]),
                               jnp.asarray(inputs["encoder_hidden_states"]), jnp.asarray(inputs["timestep"]), ofs))


@pytest.fixture(scope="session", params=CASES, ids=lambda c: c.name)
def built(request, tmp_path_factory):
    """(case, config dict, torch model, converted jaxvid model, diffusers folder) built once per case."""
    case: Case = request.param
    cfg = {**_TINY, **case.config}
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # move every weight off its init so no gate / norm is trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    root = tmp_path_factory.mktemp(f"cogvideox_{case.name}")
    model.save_pretrained(root / "diffusers")
    assert convert_cli.main([str(root / "diffusers"), str(root / "jaxvid"), "--quiet"]) == 0
    return case, cfg, model, load_transformer(root / "jaxvid"), root / "diffusers"


def test_key_layout_matches_diffusers(built):
    case, cfg, model, _, _ = built
    ours = diffusers_shapes(CogVideoXConfig(**cfg))
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == theirs


def test_whole_model_matches_diffusers(built):
    case, cfg, model, jmodel, _ = built
    inputs = make_inputs(case, cfg)
    ref = torch_forward(model, inputs, case)
    out = jax_forward(jmodel, inputs)
    assert out.shape == ref.shape == inputs["hidden_states"].shape[:2] + (cfg["out_channels"],) + inputs["hidden_states"].shape[3:]
    err = rel_l2(out, ref)
    print(f"{case.name}: whole model rel L2 = {err:.2e}")
    assert err <= MODEL_RTOL


def test_direct_load_equals_converted(built):
    case, cfg, _, jmodel, hf_folder = built
    direct = load_transformer(hf_folder)
    a = nnx.to_flat_state(nnx.state(direct, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(jmodel, nnx.Param)))
    for path, v in a:
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(b[path].get_value()), err_msg=str(path))


def test_one_block_matches_diffusers(built):
    case, cfg, model, jmodel, _ = built
    c = CogVideoXConfig(**cfg)
    graphdef, state = nnx.split(jmodel.transformer_blocks)
    layer = 1
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))
    rng = np.random.default_rng(1)
    f = case.frames // (c.patch_size_t or 1)
    n = f * (case.height // c.patch_size) * (case.width // c.patch_size)
    x = rng.standard_normal((2, n, c.inner_dim)).astype(np.float32)
    enc = rng.standard_normal((2, case.text_tokens, c.inner_dim)).astype(np.float32)
    temb = rng.standard_normal((2, c.time_embed_dim)).astype(np.float32)
    rope = torch_rotary(model, case.frames, case.height, case.width) if c.use_rotary_positional_embeddings else None
    with torch.no_grad():
        rx, renc = model.transformer_blocks[layer](
            torch.from_numpy(x), torch.from_numpy(enc), torch.from_numpy(temb), image_rotary_emb=rope
        )
    from jaxvid.attention import VideoLayout

    layout = VideoLayout(frames=f, height=case.height // c.patch_size, width=case.width // c.patch_size,
                         text_tokens=case.text_tokens)
    jrope = None if rope is None else (jnp.asarray(rope[0].numpy()), jnp.asarray(rope[1].numpy()))
    ox, oenc = block(jnp.asarray(x), jnp.asarray(enc), jnp.asarray(temb), jrope, layout=layout)
    ex, eenc = rel_l2(ox, rx.numpy()), rel_l2(oenc, renc.numpy())
    print(f"{case.name}: block rel L2 video {ex:.2e} text {eenc:.2e}")
    assert ex <= LAYER_RTOL and eenc <= LAYER_RTOL


def test_learned_table_quirk_other_frame_count(built):
    """diffusers swaps the learned table for the sincos one when the frame count differs from the sample."""
    case, cfg, model, jmodel, _ = built
    if not cfg.get("use_learned_positional_embeddings"):
        pytest.skip("only for learned positional embeddings")
    other = dataclasses.replace(case, frames=2)
    inputs = make_inputs(other, cfg, seed=3)
    err = rel_l2(jax_forward(jmodel, inputs), torch_forward(model, inputs, other))
    assert err <= MODEL_RTOL


@pytest.mark.parametrize(
    "patch_size_t,grid",
    [(None, (1, 8, 8)), (None, (3, 8, 12)), (None, (2, 12, 8)), (None, (2, 16, 16)), (2, (4, 8, 8)), (2, (5, 4, 6))],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"pt{v}",
)
def test_rotary_table_matches_diffusers(patch_size_t, grid):
    frames, height, width = grid
    cfg = CogVideoXConfig(**{**_TINY, "use_rotary_positional_embeddings": True, "patch_size_t": patch_size_t})

    class _M:  # the attributes torch_rotary reads
        config = cfg

    cos, sin = rotary_table(cfg, frames, height, width)
    rcos, rsin = torch_rotary(_M, frames, height, width)
    assert cos.shape == tuple(rcos.shape)
    np.testing.assert_allclose(cos, rcos.numpy(), rtol=0, atol=TABLE_RTOL)
    np.testing.assert_allclose(sin, rsin.numpy(), rtol=0, atol=TABLE_RTOL)


@pytest.mark.parametrize("grid", [(3, 8, 8), (2, 8, 12), (4, 6, 10)], ids=lambda g: "x".join(map(str, g)))
def test_sincos_table_matches_diffusers(grid):
    from diffusers.models.embeddings import CogVideoXPatchEmbed

    frames, height, width = grid
    cfg = CogVideoXConfig(**{**_TINY, "num_attention_heads": 3})
    embed = CogVideoXPatchEmbed(
        patch_size=2, in_channels=4, embed_dim=cfg.inner_dim, text_embed_dim=16, sample_width=8, sample_height=8,
        sample_frames=9, max_text_seq_length=4, use_positional_embeddings=True,
        use_learned_positional_embeddings=False,
    )
    ref = embed._get_positional_embeddings(height, width, (frames - 1) * 4 + 1)[0, 4:].numpy()
    np.testing.assert_allclose(sincos_table(cfg, frames, height, width), ref, rtol=0, atol=TABLE_RTOL)


def test_attention_plan_splits_the_scan(built):
    """A radial plan runs two scans (dense layer 0, radial after); on a sequence shorter than one
    radial block the radial mask is full, so the output equals the plain dense run."""
    from jaxvid.attention import AttentionPlan, Dense

    case, cfg, _, jmodel, _ = built
    if case.name != "5b_rope":
        pytest.skip("one case is enough")
    plan = AttentionPlan.radial_cogvideox(block_size=64, dense_layers=1)
    assert jmodel._segments(plan) == [(0, 1, Dense()), (1, cfg["num_layers"], plan.sparse)]
    inputs = make_inputs(case, cfg)
    args = [jnp.asarray(inputs[k]) for k in ("hidden_states", "encoder_hidden_states", "timestep")]
    plain = np.asarray(jmodel(*args))
    split = np.asarray(jmodel(*args, attention=plan))
    assert rel_l2(split, plain) <= 1e-6
    with pytest.raises(ValueError, match="AttentionPlan"):
        jmodel(*args, attention="radial")
    with pytest.raises(ValueError, match=r"timestep.shape=\(3,\)"):
        jmodel(args[0], args[1], jnp.zeros((3,)))
