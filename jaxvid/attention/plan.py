"""Which attention each layer and denoising step uses: frozen, hashable specs (static jit args).

    plan = AttentionPlan.radial_cogvideox()          # Radial everywhere but layer 0 / steps < 12
    plan.spec_for_layer(i)    -> Dense() or plan.sparse   (i is a static Python int)
    plan.use_dense_at(step)   -> bool, a traced jnp bool when `step` is traced

How callers use it:
- models take the plan (static) and run their blocks as two scans split at
  `plan.dense_layers`: the first with `Dense()`, the rest with `plan.sparse` (see
  `plan.layer_split(num_layers)`), calling `attend(q, k, v, spec, layout=...)` in each block;
- pipelines, inside their jitted `lax.fori_loop` over steps, switch with
  `lax.cond(plan.use_dense_at(step), dense_call, sparse_call, ...)` where `dense_call` runs the
  model with `plan.all_dense()` and `sparse_call` with `plan` (never a Python `if` on a traced step).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["Dense", "Radial", "BSA", "Scene", "AttentionSpec", "AttentionPlan", "PRECISIONS"]

_RADIAL_MODEL_TYPES = ("cogvideox", "hunyuan", "wan")
# Attention arithmetic (pallas_kernels.quantized): "bf16" as the inputs are; "fp8" / "int8-fp8" are
# Sage-style 8-bit Q.K^T (fp8 or int8, per-block scales, K smoothed) and fp8 P.V.
PRECISIONS = ("bf16", "fp8", "int8-fp8")


def _check_precision(owner: str, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"{owner}.precision={precision!r}; expected one of {PRECISIONS}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Dense:
    """Full softmax attention (cuDNN on GPU, XLA elsewhere; 8-bit precisions: the block-sparse
    kernels with every block listed)."""

    precision: str = "bf16"

    def __post_init__(self) -> None:
        _check_precision("Dense", self.precision)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Scene:
    """Scene-aware restriction, AND-ed with a radial mask.

    boundaries: frame edges (0, ..., num_frames), scene s = frames [boundaries[s], boundaries[s+1]).
    adjacency: [n_scenes][n_scenes] bools, row = query scene, column = key scene, diagonal True.
    Checked against the video's frame count when the mask is built.
    """

    boundaries: tuple[int, ...]
    adjacency: tuple[tuple[bool, ...], ...]

    def __post_init__(self) -> None:
        bounds = tuple(int(b) for b in self.boundaries)
        adjacency = tuple(tuple(bool(x) for x in row) for row in self.adjacency)
        object.__setattr__(self, "boundaries", bounds)
        object.__setattr__(self, "adjacency", adjacency)
        if len(bounds) < 2 or bounds[0] != 0 or any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
            raise ValueError(f"Scene.boundaries={bounds}; expected strictly increasing frame edges from 0")
        n = len(bounds) - 1
        if len(adjacency) != n or any(len(row) != n for row in adjacency):
            raise ValueError(f"Scene.adjacency={adjacency}; expected {n}x{n} for boundaries={bounds}")
        if not all(adjacency[i][i] for i in range(n)):
            raise ValueError(f"Scene.adjacency={adjacency}; its diagonal must be True")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Radial:
    """Static radial block mask (jaxvid.attention.radial), optionally AND-ed with a scene mask."""

    decay_factor: float = 1.0
    block_size: int = 128
    model_type: str = "cogvideox"
    scene: Scene | None = None
    implementation: str | None = None  # kernel choice, None = automatic
    precision: str = "bf16"

    def __post_init__(self) -> None:
        _check_precision("Radial", self.precision)
        if not (isinstance(self.decay_factor, (int, float)) and self.decay_factor > 0):
            raise ValueError(f"Radial.decay_factor={self.decay_factor!r}; expected a float > 0")
        if self.block_size not in (64, 128):
            raise ValueError(f"Radial.block_size={self.block_size!r}; expected 64 or 128")
        if self.model_type not in _RADIAL_MODEL_TYPES:
            raise ValueError(f"Radial.model_type={self.model_type!r}; expected one of {_RADIAL_MODEL_TYPES}")
        if self.scene is not None and not isinstance(self.scene, Scene):
            raise ValueError(f"Radial.scene={self.scene!r}; expected a Scene or None")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BSA:
    """LongCat's block sparse attention (jaxvid.attention.bsa); selection is dynamic, per call.

    Also upstream's `bsa_params` (config.json, `BSA.from_dict`): sparsity keeps
    int((1 - sparsity) * n_key_chunks) key chunks per query chunk (top-k), cdf_threshold the chunks
    whose softmax mass adds up to it (both: CDF with a top-k floor); chunk_3d_shape_q / _k are the
    (t, h, w) token chunks of queries / keys.
    """

    sparsity: float | None = 0.9375
    cdf_threshold: float | None = None
    chunk_3d_shape_q: tuple[int, int, int] = (4, 4, 4)
    chunk_3d_shape_k: tuple[int, int, int] = (4, 4, 4)
    implementation: str | None = None  # kernel choice, None = automatic
    precision: str = "bf16"

    def __post_init__(self) -> None:
        _check_precision("BSA", self.precision)
        for name in ("chunk_3d_shape_q", "chunk_3d_shape_k"):
            value = getattr(self, name)
            try:
                dims = tuple(int(x) for x in value)
            except (TypeError, ValueError):
                dims = ()
            if len(dims) != 3 or any(d < 1 for d in dims):
                raise ValueError(f"BSA.{name}={value!r}; expected three positive ints")
            object.__setattr__(self, name, dims)
        if self.sparsity is None and self.cdf_threshold is None:
            raise ValueError("BSA.sparsity and BSA.cdf_threshold are both None; give at least one")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"BSA.sparsity={self.sparsity!r}; expected a float in [0, 1) or None")
        if self.cdf_threshold is not None and not 0.0 < self.cdf_threshold <= 1.0:
            raise ValueError(f"BSA.cdf_threshold={self.cdf_threshold!r}; expected a float in (0, 1] or None")


    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BSA:
        """From upstream's `bsa_params` (config.json): sparsity, cdf_threshold, chunk_3d_shape_q/_k."""
        if not isinstance(d, Mapping):
            raise ValueError(f"bsa_params={d!r}; expected a mapping (sparsity, cdf_threshold, chunk_3d_shape_q, "
                             "chunk_3d_shape_k)")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"bsa_params has unknown keys {sorted(unknown)}; expected sparsity, cdf_threshold, "
                             "chunk_3d_shape_q, chunk_3d_shape_k")
        return cls(**d)

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `jaxvid.attention.bsa.bsa_attention`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


AttentionSpec = Dense | Radial | BSA


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AttentionPlan:
    """`sparse` everywhere except the first `dense_layers` layers and the first `dense_timesteps` steps.

    `precision` ("bf16", "fp8", "int8-fp8") applies to every layer and step, dense ones included: it
    is stamped onto `sparse` and onto the Dense() specs the plan hands out. Left at "bf16", the plan
    takes the sparse spec's own precision.
    """

    sparse: AttentionSpec = Dense()
    dense_layers: int = 0
    dense_timesteps: int = 0
    precision: str = "bf16"

    def __post_init__(self) -> None:
        if not isinstance(self.sparse, (Dense, Radial, BSA)):
            raise ValueError(f"AttentionPlan.sparse={self.sparse!r}; expected Dense(), Radial(...) or BSA(...)")
        _check_precision("AttentionPlan", self.precision)
        if self.precision == "bf16" and self.sparse.precision != "bf16":
            object.__setattr__(self, "precision", self.sparse.precision)
        if self.sparse.precision != self.precision:
            object.__setattr__(self, "sparse", dataclasses.replace(self.sparse, precision=self.precision))
        for name in ("dense_layers", "dense_timesteps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"AttentionPlan.{name}={value!r}; expected an int >= 0")

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def dense(cls) -> AttentionPlan:
        return cls()

    @classmethod
    def radial_cogvideox(cls, *, decay_factor: float = 1.0, block_size: int = 128, dense_layers: int = 1,
                         dense_timesteps: int = 12, scene: Scene | None = None) -> AttentionPlan:
        """Radial attention for CogVideoX (project seed rule); defaults follow upstream's Wan scripts."""
        return cls(sparse=Radial(decay_factor=decay_factor, block_size=block_size, model_type="cogvideox",
                                 scene=scene),
                   dense_layers=dense_layers, dense_timesteps=dense_timesteps)

    @classmethod
    def bsa_longcat(cls, *, sparsity: float | None = 0.9375, cdf_threshold: float | None = None,
                    chunk_3d_shape_q: Sequence[int] = (4, 4, 4), chunk_3d_shape_k: Sequence[int] = (4, 4, 4),
                    dense_layers: int = 0, dense_timesteps: int = 0) -> AttentionPlan:
        """LongCat-Video's BSA settings (its config's bsa_params), on every layer and step."""
        return cls(sparse=BSA(sparsity=sparsity, cdf_threshold=cdf_threshold,
                              chunk_3d_shape_q=tuple(chunk_3d_shape_q), chunk_3d_shape_k=tuple(chunk_3d_shape_k)),
                   dense_layers=dense_layers, dense_timesteps=dense_timesteps)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def is_dense(self) -> bool:
        """True when no layer or step is sparse."""
        return isinstance(self.sparse, Dense)

    def all_dense(self) -> AttentionPlan:
        """The plan used during the dense timesteps (same precision)."""
        return AttentionPlan(precision=self.precision)

    def with_precision(self, precision: str) -> AttentionPlan:
        """This plan with attention arithmetic `precision` ("bf16", "fp8", "int8-fp8")."""
        _check_precision("AttentionPlan", precision)
        return dataclasses.replace(self, sparse=dataclasses.replace(self.sparse, precision=precision),
                                   precision=precision)

    def dense_spec(self) -> Dense:
        """The spec of a dense layer or step under this plan."""
        return Dense(precision=self.precision)

    def spec_for_layer(self, layer: int) -> AttentionSpec:
        """Spec of layer `layer` (a static Python int) during a sparse step."""
        if not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer={layer!r}; expected a static int >= 0")
        return self.dense_spec() if layer < self.dense_layers else self.sparse

    def layer_split(self, num_layers: int) -> tuple[int, int]:
        """(n_dense, n_sparse) layers, for models that run two scans."""
        n_dense = num_layers if self.is_dense else min(self.dense_layers, num_layers)
        return n_dense, num_layers - n_dense

    def use_dense_at(self, step: int | jax.Array) -> bool | jax.Array:
        """Whether denoising step `step` (0-based) runs fully dense.

        A Python int gives a Python bool; a traced step gives a traced bool for `lax.cond`.
        """
        if self.is_dense:
            return True if isinstance(step, int) else jnp.asarray(True)
        if isinstance(step, int):
            return step < self.dense_timesteps
        return jnp.asarray(step) < self.dense_timesteps

    def spec_for(self, layer: int, step: int) -> AttentionSpec:
        """Spec for a static (layer, step) pair, for Python-level loops."""
        return self.dense_spec() if self.use_dense_at(step) else self.spec_for_layer(layer)
