"""Which paths a conversion may read and write: plain names inside the source, nothing outside.

A source folder may hold symlinks only when they stay inside it, or inside one Hugging Face cache
repo: a downloaded checkpoint is `models--org--name/snapshots/<rev>/<file>` pointing at
`models--org--name/blobs/<sha>`, so the allowed root of anything under `snapshots/` is the repo.
"""
from __future__ import annotations

import os
from pathlib import Path


class UnsafePathError(ValueError):
    """A name or link would read or write outside the folder it belongs to."""


def allowed_root(folder: str | os.PathLike) -> Path:
    """The resolved folder a source's files must lie in: the folder itself, or its HF cache repo."""
    absolute = Path(os.path.abspath(folder))
    for parent in (absolute, *absolute.parents):
        if parent.name == "snapshots" and (parent.parent / "blobs").is_dir():
            return parent.parent.resolve()
    return absolute.resolve()


def plain_name(name: str, *, what: str) -> str:
    """`name` if it is one plain file/folder name (no separator, not '.', '..' or empty); else raise."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UnsafePathError(f"{what}: {name!r} is not a plain file or folder name; expected a name inside the folder")
    return name


def inside(path: str | os.PathLike, root: Path, *, what: str) -> Path:
    """`path` if it resolves (following every symlink) to a place inside `root`; else raise."""
    resolved = Path(path).resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise UnsafePathError(f"{what}: {path} resolves to {resolved}, outside {root}; symlinks must stay inside the folder")
    return Path(path)


def child(folder: Path, name: str, root: Path, *, what: str) -> Path:
    """`folder/name` for a plain `name` that resolves inside `root`."""
    return inside(folder / plain_name(name, what=what), root, what=what)


def check_disjoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Raise when SRC and DST are the same folder or one lies inside the other (resolved, both ways).

    Writing DST (or replacing it with --overwrite) would then change or delete the source.
    """
    s, d = Path(src).resolve(), Path(dst).resolve()
    if s == d or s.is_relative_to(d) or d.is_relative_to(s):
        relation = "the same folder" if s == d else ("inside DST" if s.is_relative_to(d) else "a parent of DST")
        raise UnsafePathError(f"SRC={str(src)!r} ({s}) and DST={str(dst)!r} ({d}) overlap: SRC is {relation}; "
                              "choose a DST outside the source folder")
