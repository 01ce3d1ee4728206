"""Tuning presets: radial dense layers / steps by length, BSA parameters by resolution.

The expected values are the specification (issue 17: the radial seed's short / long settings and
the BSA guide's per-resolution table), and every BSA choice must be accepted by the LongCat
config that consumes it.
"""
from __future__ import annotations

import pytest

from jaxvid.attention.presets import (
    DEFAULT_BSA_TABLE,
    BSARow,
    bsa_params_for,
    bsa_table_from_config,
    radial_preset,
)
from jaxvid.models.longcat import BSAParams


@pytest.mark.parametrize("frames,expected,row", [
    (1, (1, 3), "short"), (13, (1, 3), "short"), (29, (1, 3), "short"),  # radial seed: < 30 frames
    (30, (2, 5), "medium"), (49, (2, 5), "medium"), (50, (2, 5), "medium"),
    (51, (3, 8), "long"), (81, (3, 8), "long"), (93, (3, 8), "long"),  # radial seed: > 50 frames
])
def test_radial_auto_by_frame_count(frames, expected, row):
    p = radial_preset(frames)
    assert (p.dense_layers, p.dense_timesteps) == expected
    assert p.which.startswith(f"{row} (auto:") and str(frames) in p.which


@pytest.mark.parametrize("preset,expected", [("short", (1, 3)), ("long", (3, 8)), ("none", (0, 0)), ("medium", (2, 5))])
def test_radial_named_preset_ignores_length(preset, expected):
    for frames in (9, 49, 121):
        p = radial_preset(frames, preset)
        assert (p.dense_layers, p.dense_timesteps, p.which) == (*expected, preset)


def test_radial_preset_is_a_tuple_of_three():
    layers, steps, which = radial_preset(25, "auto")
    assert (layers, steps) == (1, 3) and "25 frames < 30" in which


@pytest.mark.parametrize("bad", [dict(num_frames=0), dict(num_frames=2.5), dict(num_frames=True),
                                 dict(num_frames=49, preset="fast")])
def test_radial_bad_input_names_the_argument(bad):
    with pytest.raises(ValueError, match="num_frames|preset"):
        radial_preset(**bad)


@pytest.mark.parametrize("h,w,sparsity,chunk,row", [
    (720, 1280, 0.9375, [4, 4, 4], "720p"), (1280, 720, 0.9375, [4, 4, 4], "720p"),  # portrait too
    (1080, 1920, 0.9375, [4, 4, 4], "720p"),  # "720p and up"
    (704, 1280, 0.9375, [4, 4, 4], "720p"), (960, 960, 0.9375, [4, 4, 4], "720p"),  # LongCat's 720p buckets
    (480, 832, 0.875, [4, 4, 8], "480p"), (320, 1216, 0.875, [4, 4, 8], "480p"),  # LongCat's 480p buckets
    (480, 640, 0.875, [4, 4, 8], "480p"),  # 4:3 at 480 lines
])
def test_bsa_default_table(h, w, sparsity, chunk, row):
    choice = bsa_params_for(h, w)
    assert choice.params == {"sparsity": sparsity, "cdf_threshold": None, "chunk_3d_shape_q": chunk,
                             "chunk_3d_shape_k": chunk}
    assert choice.which.startswith(row)
    BSAParams.from_dict(choice.params)  # the LongCat config accepts it as it is


@pytest.mark.parametrize("h,w", [(256, 256), (320, 512), (400, 640)])
def test_bsa_below_480p_is_dense(h, w):
    choice = bsa_params_for(h, w)
    assert choice.params is None and choice.which.startswith("dense")


def test_bsa_choice_is_a_copy():
    a = bsa_params_for(720, 1280)
    a.params["chunk_3d_shape_q"][0] = 99
    assert bsa_params_for(720, 1280).params["chunk_3d_shape_q"] == [4, 4, 4]
    assert DEFAULT_BSA_TABLE[0].params["chunk_3d_shape_q"] == [4, 4, 4]


CONFIG_TABLE = {
    "480p": {"sparsity": 0.75, "cdf_threshold": None, "chunk_3d_shape_q": [2, 4, 4], "chunk_3d_shape_k": [2, 4, 4]},
    "1080p": {"sparsity": 0.96875, "cdf_threshold": 0.9, "chunk_3d_shape_q": [4, 8, 8], "chunk_3d_shape_k": [4, 8, 8]},
    "360p": None,
}


@pytest.mark.parametrize("h,w,row,sparsity", [
    (1080, 1920, "1080p", 0.96875), (720, 1280, "480p", 0.75), (480, 640, "480p", 0.75), (360, 640, "360p", None),
    (256, 256, "dense", None),
])
def test_bsa_table_from_config_json(h, w, row, sparsity):
    choice = bsa_params_for(h, w, CONFIG_TABLE)
    assert choice.which.startswith(row)
    if sparsity is None:
        assert choice.params is None
    else:
        assert choice.params == CONFIG_TABLE[row]
        BSAParams.from_dict(choice.params)


def test_single_params_dict_is_not_a_table():
    single = {"sparsity": 0.9375, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
    assert bsa_table_from_config(single) is None
    assert bsa_table_from_config(None) is None
    with pytest.raises(ValueError, match="one params dict"):
        bsa_params_for(720, 1280, single)


@pytest.mark.parametrize("bad,match", [
    ({"720": {"sparsity": 0.9}}, "resolution rows"),
    ({"720p": {"sparsity": 0.9, "chunk": [4, 4, 4]}}, r"bsa_params\['720p'\]"),
    ([1, 2], "expected a dict"),
])
def test_bad_config_table_names_the_entry(bad, match):
    with pytest.raises(ValueError, match=match):
        bsa_table_from_config(bad)


def test_bsa_bad_size_names_the_argument():
    with pytest.raises(ValueError, match="width"):
        bsa_params_for(480, 0)


def test_custom_rows_sorted_by_size():
    rows = [BSARow("small", 200 * 200, {"sparsity": 0.5}), BSARow("big", 600 * 600, {"sparsity": 0.9})]
    assert bsa_params_for(600, 800, rows).params == {"sparsity": 0.9}
    assert bsa_params_for(300, 800, rows).params == {"sparsity": 0.5}


def test_resolve_bsa_explicit_values_replace_fields_of_the_row():
    from jaxvid.attention.presets import resolve_bsa

    # no explicit values: the row as it is
    assert resolve_bsa(480, 832) == bsa_params_for(480, 832)
    # explicit values replace fields of the row; the summary names both
    choice = resolve_bsa(704, 1280, {"sparsity": 0.9, "chunk_3d_shape_k": (2, 4, 4), "cdf_threshold": None})
    assert choice.params == {"sparsity": 0.9, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4],
                             "chunk_3d_shape_k": [2, 4, 4]}
    assert choice.which.startswith("720p") and "explicit sparsity=0.9" in choice.which
    # a dense row with explicit values: the config's params complete them
    base = {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
    choice = resolve_bsa(32, 64, {"chunk_3d_shape_q": [1, 2, 2]}, base=base)
    assert choice.params == {**base, "chunk_3d_shape_q": [1, 2, 2]} and choice.which.startswith("config bsa_params")
    assert resolve_bsa(32, 64, base=base).params is None  # no explicit values: the table's dense row
    with pytest.raises(ValueError, match="no base bsa_params"):
        resolve_bsa(32, 64, {"sparsity": 0.5})
    with pytest.raises(ValueError, match=r"\['chunk'\]"):
        resolve_bsa(480, 832, {"chunk": [1, 1, 1]})
    # a config table replaces the built-in one
    assert resolve_bsa(720, 1280, table=CONFIG_TABLE).params == CONFIG_TABLE["480p"]
