"""Tuning presets for the sparse attention schemes: pure functions of the video size.

Radial attention (`radial_preset`): how many leading layers and leading denoising steps stay dense,
chosen by the number of pixel frames. Block sparse attention (`bsa_params_for`): LongCat's
sparsity and 3D chunk shapes chosen by resolution (the mixed strategy of the BSA guide: sparser
where the token grid is larger), from a built-in table or a per-resolution table in config.json.
Both return which row they used, so a summary line can say it.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "RADIAL_PRESETS", "RadialPreset", "radial_preset",
    "BSARow", "BSAChoice", "DEFAULT_BSA_TABLE", "bsa_params_for", "bsa_table_from_config", "min_pixels_of",
    "resolve_bsa", "BSA_FIELDS",
]

# ---------------------------------------------------------------------------------------------
# Radial: dense layers / dense timesteps by video length
# ---------------------------------------------------------------------------------------------

# (dense_layers, dense_timesteps) per preset. "short" and "long" are the radial seed's settings
# (< 30 frames: 1 layer, 3 steps; > 50 frames: 3 layers, 8 steps): longer videos put more tokens
# far apart in time, where the radial mask is sparsest, so more of the run stays dense.
# The radial-attention reference (mit-han-lab/radial-attention) has no rule by frame count in
# between: its scripts fix the two numbers per model and LoRA (scripts/hunyuan_t2v_inference.sh:
# 117 frames 0 layers / 12 steps, 4x length 509 frames 2 / 2; scripts/wan_t2v_inference_fusionx.sh:
# 81 frames 1 / 2; scripts/wan_t2v_inference_lightx2v.sh: 69 frames 1 / 1). For 30..50 frames
# (CogVideoX's 49 among them) "medium" takes the midpoint of the two seed rows, rounded down.
RADIAL_PRESETS: dict[str, tuple[int, int]] = {
    "none": (0, 0),
    "short": (1, 3),
    "medium": (2, 5),
    "long": (3, 8),
}
SHORT_BELOW_FRAMES = 30  # auto: fewer frames than this -> "short"
LONG_ABOVE_FRAMES = 50  # auto: more frames than this -> "long"; in between -> "medium"


class RadialPreset(NamedTuple):
    """Dense layers and dense timesteps for a radial plan, and which preset row gave them."""

    dense_layers: int
    dense_timesteps: int
    which: str  # e.g. "short (auto: 25 frames < 30)"


def radial_preset(num_frames: int, preset: str = "auto") -> RadialPreset:
    """(dense_layers, dense_timesteps, which) for a video of `num_frames` pixel frames.

    preset: "auto" picks by length (< 30 frames "short", > 50 "long", else "medium"); "short",
    "medium", "long" force a row; "none" keeps nothing dense (0, 0). Explicit dense-layer /
    dense-timestep values given by a user should replace these (the caller decides).
    """
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r}; expected a positive integer (pixel frames)")
    if preset not in ("auto", *RADIAL_PRESETS):
        raise ValueError(f"preset={preset!r}; expected one of {['auto', *RADIAL_PRESETS]}")
    if preset != "auto":
        return RadialPreset(*RADIAL_PRESETS[preset], preset)
    if num_frames < SHORT_BELOW_FRAMES:
        name, why = "short", f"{num_frames} frames < {SHORT_BELOW_FRAMES}"
    elif num_frames > LONG_ABOVE_FRAMES:
        name, why = "long", f"{num_frames} frames > {LONG_ABOVE_FRAMES}"
    else:
        name, why = "medium", f"{SHORT_BELOW_FRAMES} <= {num_frames} frames <= {LONG_ABOVE_FRAMES}"
    return RadialPreset(*RADIAL_PRESETS[name], f"{name} (auto: {why})")


# ---------------------------------------------------------------------------------------------
# BSA: sparsity and chunk shapes by resolution
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class BSARow:
    """One row of a per-resolution BSA table: frames of at least `min_pixels` pixels (height x width).

    params: upstream's `bsa_params` dict (sparsity, cdf_threshold, chunk_3d_shape_q,
    chunk_3d_shape_k), or None for dense attention at this resolution.
    """

    name: str
    min_pixels: int
    params: Mapping[str, Any] | None

    def __hash__(self) -> int:  # params is a dict: hash a frozen copy (rows sit in static model configs)
        frozen = None if self.params is None else tuple(sorted(
            (k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in self.params.items()))
        return hash((self.name, self.min_pixels, frozen))


class BSAChoice(NamedTuple):
    """The bsa_params to use (None = dense) and which table row chose them."""

    params: dict[str, Any] | None
    which: str  # e.g. "720p (704x1280 = 901120 px >= 691200)"


def _params(sparsity: float, chunk: Sequence[int]) -> dict[str, Any]:
    return {"sparsity": sparsity, "cdf_threshold": None, "chunk_3d_shape_q": list(chunk),
            "chunk_3d_shape_k": list(chunk)}


# A row "<N>p" covers frames with at least 3/4 of the pixels of a 16:9 frame N lines high. By
# pixel count, not by the shorter side, because LongCat's own size buckets are equal-area tables:
# its 720p buckets (704x1280 for 16:9, what upstream refines at, 960x960, 480x1920) all hold about
# 1280*720 pixels, its 480p buckets (480x832, 320x1216, 608x640) about 832*480; 3/4 also lets a
# 4:3 frame N lines high (480x640) count as Np.
AREA_FRACTION = 0.75


def min_pixels_of(lines: int) -> int:
    """The `min_pixels` of a row named "<lines>p": 3/4 of a 16:9 frame `lines` high."""
    return round(AREA_FRACTION * lines * lines * 16 / 9)


# The BSA guide's mixed strategy: 720p and up 0.9375 with 4x4x4 chunks (upstream's refinement
# setting), 480p 0.875 with 4x4x8 chunks (fewer, wider chunks on the smaller grid), below dense
# (too few tokens for sparsity to pay).
DEFAULT_BSA_TABLE: tuple[BSARow, ...] = (
    BSARow("720p", min_pixels_of(720), _params(0.9375, (4, 4, 4))),
    BSARow("480p", min_pixels_of(480), _params(0.875, (4, 4, 8))),
)

_RESOLUTION_KEY = re.compile(r"^(?P<side>\d+)p$")
_PARAM_KEYS = {"sparsity", "cdf_threshold", "chunk_3d_shape_q", "chunk_3d_shape_k"}


def bsa_table_from_config(bsa_params: Any) -> tuple[BSARow, ...] | None:
    """A per-resolution table from config.json's `bsa_params`, or None if it holds one params dict.

    Table form: keys "<N>p" ("720p", "480p", ...), each a params dict or null (dense), e.g.
    {"720p": {"sparsity": 0.9375, ...}, "480p": {"sparsity": 0.875, ...}}; row "<N>p" covers
    frames of at least `min_pixels_of(N)` pixels. The single upstream form {"sparsity": ...,
    "chunk_3d_shape_q": ...} returns None (use it as it is).
    """
    if bsa_params is None:
        return None
    if not isinstance(bsa_params, Mapping):
        raise ValueError(f"bsa_params={bsa_params!r}; expected a dict (one params dict or a table per resolution)")
    if not bsa_params or set(bsa_params) <= _PARAM_KEYS:
        return None
    rows = []
    for key, params in bsa_params.items():
        m = _RESOLUTION_KEY.match(str(key))
        if not m:
            raise ValueError(f"bsa_params key {key!r}: expected the keys of one params dict ({sorted(_PARAM_KEYS)}) "
                             "or resolution rows like '720p' / '480p'")
        if params is not None:
            if not isinstance(params, Mapping) or not set(params) <= _PARAM_KEYS:
                raise ValueError(f"bsa_params[{key!r}]={params!r}; expected null or a dict with keys from "
                                 f"{sorted(_PARAM_KEYS)}")
            params = dict(params)
        rows.append(BSARow(str(key), min_pixels_of(int(m["side"])), params))
    return tuple(sorted(rows, key=lambda r: -r.min_pixels))


def _check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r}; expected a positive integer (pixels)")


def _rows(table: Sequence[BSARow] | Mapping[str, Any]) -> tuple[BSARow, ...]:
    if isinstance(table, Mapping):
        rows = bsa_table_from_config(table)
        if rows is None:
            raise ValueError("table: this bsa_params holds one params dict, not a table per resolution")
        return rows
    return tuple(sorted(table, key=lambda r: -r.min_pixels))


def bsa_params_for(height: int, width: int, table: Sequence[BSARow] | Mapping[str, Any] = DEFAULT_BSA_TABLE) -> BSAChoice:
    """The BSA row for a `height` x `width` video (pixels): the first row whose `min_pixels` the
    frame reaches, rows taken from the largest; below every row -> dense (params None).

    `table`: rows (default DEFAULT_BSA_TABLE) or config.json's per-resolution `bsa_params` dict.
    """
    _check_size(height, width)
    rows = _rows(table)
    pixels = height * width
    for row in rows:
        if pixels >= row.min_pixels:
            params = None if row.params is None else {k: (list(v) if isinstance(v, (list, tuple)) else v)
                                                      for k, v in row.params.items()}
            return BSAChoice(params, f"{row.name} ({height}x{width} = {pixels} px >= {row.min_pixels})")
    lowest = rows[-1].min_pixels if rows else 0
    return BSAChoice(None, f"dense ({height}x{width} = {pixels} px < {lowest})")


BSA_FIELDS = ("sparsity", "cdf_threshold", "chunk_3d_shape_q", "chunk_3d_shape_k")


def resolve_bsa(height: int, width: int, explicit: Mapping[str, Any] | None = None, *,
                table: Sequence[BSARow] | Mapping[str, Any] | None = None,
                base: Mapping[str, Any] | None = None) -> BSAChoice:
    """The BSA params of a run with BSA on, and where they came from.

    No explicit values: the table's row for the size (`table`, default DEFAULT_BSA_TABLE; a row
    may say dense). Explicit values (sparsity, cdf_threshold, chunk_3d_shape_q, chunk_3d_shape_k;
    None entries are ignored) replace those fields of the row's params, or of `base` (the
    config's single bsa_params) where the row is dense: a user who gives values wants BSA.
    """
    explicit = {k: v for k, v in (explicit or {}).items() if v is not None}
    unknown = sorted(set(explicit) - set(BSA_FIELDS))
    if unknown:
        raise ValueError(f"BSA values {unknown}: expected some of {list(BSA_FIELDS)}")
    choice = bsa_params_for(height, width, DEFAULT_BSA_TABLE if table is None else table)
    if not explicit:
        return choice
    params, which = choice.params, choice.which
    if params is None:
        if base is None:
            raise ValueError(f"explicit BSA values {explicit} at {height}x{width}: the table says dense there "
                             "and there are no base bsa_params to complete them")
        params, which = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(base).items()}, \
            f"config bsa_params ({choice.which})"
    given = ", ".join(f"{k}={v}" for k, v in explicit.items())
    params = {**params, **{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in explicit.items()}}
    return BSAChoice(params, f"{which} + explicit {given}")
