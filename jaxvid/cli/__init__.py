"""The command line: `jaxvid generate`, `jaxvid demo` (main.py builds the parser, one module per command).

The CLI parses options, checks them, reads input files and reports; the work itself is the
pipelines' Python API, so Python users get everything the commands do.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The `jaxvid` console script (see jaxvid.cli.main)."""
    from jaxvid.cli.main import main as _main

    return _main(argv)
