"""The command line: `jaxvid generate`, `jaxvid demo` (main.py builds the parser, one module per command).

The CLI parses options, checks them, reads input files and reports; the work itself is the
pipelines' Python API, so Python users get everything the commands do.
"""
from __future__ import annotations

# Imported eagerly: a lazy wrapper named `main` would be replaced by the submodule jaxvid.cli.main
# as soon as anything imports that submodule, and `from jaxvid.cli import main` would then give a module.
from jaxvid.cli.main import main

__all__ = ["main"]
