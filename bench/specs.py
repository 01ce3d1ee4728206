"""Named attention benchmark shapes (bench/attention.py): real model sizes on one GPU.

Each spec is a frozen description; `bench/attention.py` builds the inputs and index tables.
"""
from __future__ import annotations

import dataclasses
import math

__all__ = ["AttentionSpec", "SPECS", "spec_by_name"]

PATTERNS = ("radial", "dense", "bsa")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AttentionSpec:
    """One benchmark case.

    seq is the true token count; the kernel runs on seq padded to a multiple of 128 with
    kv_len = seq. pattern: "radial" (static mask, radial_frames x tokens_per_frame + text_tokens),
    "dense" (every block listed: the kernel at density 1), "bsa" (LongCat's 3D-chunk top-k on
    latent (T, H, W) with `chunk` and `sparsity`).
    """

    name: str
    batch: int
    seq: int
    heads: int
    head_dim: int
    block: int
    pattern: str
    radial_frames: int = 0
    tokens_per_frame: int = 0
    text_tokens: int = 0
    latent: tuple[int, int, int] | None = None
    chunk: tuple[int, int, int] | None = None
    sparsity: float | None = None
    inputs: str = "random"  # "random": i.i.d. normal q/k/v; "smooth": q, k spatially correlated

    def __post_init__(self):
        if self.inputs not in ("random", "smooth"):
            raise ValueError(f"AttentionSpec {self.name}: inputs={self.inputs!r}; expected 'random' or 'smooth'")
        if self.pattern not in PATTERNS:
            raise ValueError(f"AttentionSpec {self.name}: pattern={self.pattern!r}; expected one of {PATTERNS}")
        if self.pattern == "bsa":
            if self.latent is None or self.chunk is None or self.sparsity is None:
                raise ValueError(f"AttentionSpec {self.name}: bsa needs latent, chunk and sparsity")
            if math.prod(self.latent) != self.seq or math.prod(self.chunk) != self.block:
                raise ValueError(f"AttentionSpec {self.name}: latent {self.latent} / chunk {self.chunk} "
                                 f"disagree with seq={self.seq} / block={self.block}")

    @property
    def padded_seq(self) -> int:
        return -(-self.seq // 128) * 128


def _cogvideox(name: str, heads: int, pattern: str) -> AttentionSpec:
    # 49 frames -> 13 latent frames of 60 x 90 / 2x2 patches = 1350 tokens, plus 226 text tokens.
    return AttentionSpec(name=name, batch=2, seq=13 * 1350 + 226, heads=heads, head_dim=64, block=128,
                         pattern=pattern, radial_frames=13, tokens_per_frame=1350, text_tokens=226)


def _longcat(sparsity: float, chunk: tuple[int, int, int], inputs: str = "random") -> AttentionSpec:
    tag = "x".join(map(str, chunk)) + ("" if inputs == "random" else f"-{inputs}")
    return AttentionSpec(name=f"longcat720p-bsa{sparsity}-{tag}", batch=1, seq=24 * 44 * 80, heads=32,
                         head_dim=128, block=math.prod(chunk), pattern="bsa", latent=(24, 44, 80),
                         chunk=chunk, sparsity=sparsity, inputs=inputs)


SPECS: tuple[AttentionSpec, ...] = (
    _cogvideox("cogvx2b-radial", 30, "radial"),
    _cogvideox("cogvx2b-dense", 30, "dense"),
    _cogvideox("cogvx5b-radial", 48, "radial"),
    _cogvideox("cogvx5b-dense", 48, "dense"),
    _longcat(0.875, (4, 4, 4)),
    _longcat(0.875, (4, 4, 8)),
    _longcat(0.9375, (4, 4, 4)),
    _longcat(0.9375, (4, 4, 8)),
    # Spatially smooth q/k (as video activations are): neighbouring query chunks pick overlapping
    # key chunks ("pair overlap" in the select row); the kernel's traffic stays the same.
    _longcat(0.875, (4, 4, 4), "smooth"),
    _longcat(0.9375, (4, 4, 4), "smooth"),
)


def spec_by_name(name: str) -> AttentionSpec:
    for spec in SPECS:
        if spec.name == name:
            return spec
    raise ValueError(f"spec name={name!r}; expected one of {[s.name for s in SPECS]}")
