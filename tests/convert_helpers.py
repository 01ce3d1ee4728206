"""Helpers shared by the conversion reliability tests: tree hashes and a tiny component on disk."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def tree_hash(root: Path) -> str:
    """sha256 over every entry under `root`: relative path, kind, mode, symlink target, file bytes."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}\0{st.st_mode}\0".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def copy_component(fixtures_dir: Path, dst: Path) -> Path:
    """A writable copy of the tiny 5b-like fixture's transformer folder."""
    shutil.copytree(fixtures_dir / "cogvideox" / "tiny_5b_rope" / "transformer", dst)
    return dst


def leftovers(parent: Path, name: str) -> list[Path]:
    """Temp folders a conversion into `parent/name` may leave (`.name.convert-*`, `.name.tmp-*`)."""
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")] if parent.is_dir() else []
