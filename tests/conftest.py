"""Shared pytest fixtures: the path to tests/fixtures and GPU detection."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The upstream-made fixtures live in the repo (a clone needs nothing beside it); JAXVID_FIXTURES
# points the suite at another copy.
FIXTURES_ROOT = REPO_ROOT / "tests" / "fixtures"
# The CLI turns JAX's persistent compilation cache on by default (~/.cache/jaxvid/jax-compile); tests
# never write there: off unless a test (tests/test_compile_cache.py) names a folder of its own.
os.environ.setdefault("JAXVID_COMPILE_CACHE", "off")


def _fixtures_root() -> Path:
    override = os.environ.get("JAXVID_FIXTURES")
    return Path(override) if override else FIXTURES_ROOT


def has_gpu() -> bool:
    import jax

    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def has_hopper() -> bool:
    import jax

    if not has_gpu():
        return False
    kind = jax.devices("gpu")[0].device_kind.lower()
    return "h100" in kind or "h200" in kind or "h800" in kind or "gh200" in kind




@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    root = _fixtures_root()
    if not root.is_dir():
        pytest.fail(f"fixtures not found at {root}; they ship in tests/fixtures (or set JAXVID_FIXTURES)")
    return root


def pytest_collection_modifyitems(config, items):
    # GPU tests skip (with a reason) on machines without a Hopper GPU, e.g. CI.
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if not gpu_items:
        return
    if not has_hopper():
        skip = pytest.mark.skip(reason="needs an NVIDIA Hopper GPU (run on the device machine)")
        for it in gpu_items:
            it.add_marker(skip)
