"""Declarative key tables: which source tensor fills which target parameter, and how.

A key table is a list of `Rule`s built by a per-model function from the model's config (so layer
counts come from data, not from string replaces). Target paths are '.'-joined NNX state paths.
A target ending in `[i]` is slice i along axis 0 of a stacked (scanned) parameter.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from convert.transforms import Transform, identity

_SLICE = re.compile(r"^(?P<path>.+)\[(?P<index>\d+)\]$")


@dataclass(frozen=True, slots=True)
class Rule:
    """source tensor key -> target parameter path, through a named transform."""

    source: str
    target: str
    transform: Transform = field(default=identity)

    @property
    def target_path(self) -> str:
        m = _SLICE.match(self.target)
        return m["path"] if m else self.target

    @property
    def target_index(self) -> int | None:
        m = _SLICE.match(self.target)
        return int(m["index"]) if m else None


def repeat(rules: Iterable[Rule], n: int, var: str = "i") -> list[Rule]:
    """Expand templated rules (`{i}` in source and target) for i in range(n)."""
    rules = list(rules)
    return [
        Rule(r.source.replace("{" + var + "}", str(i)), r.target.replace("{" + var + "}", str(i)), r.transform)
        for i in range(n)
        for r in rules
    ]


def prefixed(rules: Iterable[Rule], source_prefix: str = "", target_prefix: str = "") -> list[Rule]:
    """Prepend fixed prefixes to every source key / target path."""
    return [Rule(source_prefix + r.source, target_prefix + r.target, r.transform) for r in rules]
