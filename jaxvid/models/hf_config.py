"""Reading a config.json dict (diffusers / transformers) into a frozen config dataclass.

Two rules shared by every model config: keys this port does not know are ignored with one
warning that lists them (diffusers does the same; checkpoints in the wild carry extra keys), and a
known key whose value has the wrong type is one ValueError naming the file and the key, before
anything is built from it. Known keys with unsupported values stay hard errors in each config.
"""
from __future__ import annotations

import dataclasses
import logging
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["drop_unknown_keys", "check_field_types"]


def drop_unknown_keys(d: Mapping[str, Any], known: Iterable[str], *, what: str) -> dict[str, Any]:
    """The entries of `d` whose key is in `known`; one warning lists the others (sorted)."""
    known = set(known)
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        log.warning("%s: ignoring keys jaxvid does not use: %s", what, ", ".join(unknown))
    return {k: v for k, v in d.items() if k in known}


def check_field_types(cls: type, values: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """Check every value against the annotation of the field it sets; JSON lists become tuples.

    Raises ValueError "<what>: <key>=<value> (<type>); expected <annotation>" on the first value
    of the wrong type (ints pass for floats, bools never pass for numbers).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            out[key] = value
            continue
        ok, converted = _conform(value, hints[key])
        if not ok:
            raise ValueError(f"{what}: {key}={value!r} ({type(value).__name__}); expected {_describe(hints[key])}")
        out[key] = converted
    return out


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(does value fit hint, value with lists turned into tuples)."""
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _conform(value, option)
            if ok:
                return True, converted
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(hint)
        item_hints = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_hints) != len(value):
            return False, value
        items = [_conform(v, h) for v, h in zip(value, item_hints)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if hint is bool:
        return isinstance(value, (bool, np.bool_)), value
    if hint is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)), value
    if hint is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)), value
    if hint is str:
        return isinstance(value, str), value
    if dataclasses.is_dataclass(hint):  # nested config: its own from_dict checks the inside
        return isinstance(value, (hint, Mapping)), value
    return True, value  # anything else is checked by the config's own __post_init__


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} {_describe(args[0])}"
    if dataclasses.is_dataclass(hint):
        return f"an object ({hint.__name__})"
    return getattr(hint, "__name__", str(hint))
