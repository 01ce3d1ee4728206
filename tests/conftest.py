"""Shared pytest fixtures: the path to tests/fixtures and GPU detection."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The upstream-made fixtures live in the repo (a clone needs nothing beside it); JAXVID_FIXTURES
# points the suite at another copy.
FIXTURES_ROOT = REPO_ROOT / "tests" / "fixtures"
# The CLI turns JAX's persistent compilation cache on by default (~/.cache/jaxvid/jax-compile); tests
# never write there: off unless a test (tests/test_compile_cache.py) names a folder of its own.
os.environ.setdefault("JAXVID_COMPILE_CACHE", "off")
# Nor does jaxvid's executable store (jaxvid.pipelines.executable_cache) keep the suite's programs next to the
# run's shared XLA cache below: the tests of tests/test_compile_cache.py turn it on themselves.
os.environ.setdefault("JAXVID_EXECUTABLE_CACHE", "off")
# The suite's tiny programs spend most of their CPU time in XLA's optimisation passes, not running
# (measured: LongCat t2v/i2v reference tests 27/20 s -> 7/10 s). Compile them unoptimised, here and
# in every subprocess; set before jax starts. JAXVID_TEST_XLA_OPT=1 keeps XLA's default passes.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if os.environ.get("JAXVID_TEST_XLA_OPT", "0") != "1" and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS).strip()


def _fixtures_root() -> Path:
    override = os.environ.get("JAXVID_FIXTURES")
    return Path(override) if override else FIXTURES_ROOT


_XLA_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_XLA_CACHE_KEY = pytest.StashKey[str]()


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole run, removed at the end.

    Set in the environment before jax is imported, so the xdist workers and the subprocesses the tests
    start (`jaxvid generate`, `jaxvid-convert`, notebook kernels) share it: the same tiny pipeline's
    programs compile once per run instead of once per process. It caches only compilations slower than
    jax's threshold (1 s) and changes no result. JAXVID_TEST_XLA_CACHE=0 turns it off; a
    JAX_COMPILATION_CACHE_DIR already set is used as it is (and kept).
    """
    if os.environ.get("JAXVID_TEST_XLA_CACHE", "1") == "0" or _XLA_CACHE_ENV in os.environ:
        return
    folder = tempfile.mkdtemp(prefix="jaxvid-tests-xla-cache-")
    os.environ[_XLA_CACHE_ENV] = folder
    config.stash[_XLA_CACHE_KEY] = folder
    if "jax" in sys.modules:  # a plugin imported jax before us: it read the environment already
        sys.modules["jax"].config.update("jax_compilation_cache_dir", folder)


def pytest_unconfigure(config):
    folder = config.stash.get(_XLA_CACHE_KEY, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(_XLA_CACHE_ENV, None)


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


# The heaviest test modules, heaviest first (per-module time from `--durations=0` on 2 cores, session 5).
# They are collected first, and with `-n N` each module runs on one worker (see pytest_xdist_make_scheduler),
# so the long ones start at once instead of finishing last on one worker while the other idles.
SLOW_MODULES_FIRST = (
    "test_notebooks.py", "test_pipeline_longcat.py", "test_vae_cogvideox.py", "test_convert_reliability.py",
    "test_cogvideox_parity.py", "test_pipeline_cogvideox.py", "test_vae_wan.py", "test_compile_cache.py",
    "test_synthetic_world.py", "test_parallel.py", "test_convert_cli.py", "test_attention_reference.py",
    "test_fp8_weights.py", "test_longcat_model.py", "test_longcat_parity.py", "test_offload.py",
    "test_bad_inputs_generate.py", "test_generate_cli_cogvideox.py", "test_pipeline_cogvideox_features.py",
)


def _module_rank(item) -> int:
    try:
        return SLOW_MODULES_FIRST.index(item.path.name)
    except ValueError:
        return len(SLOW_MODULES_FIRST)


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # before xdist's own, which would pick LoadScheduling
def pytest_xdist_make_scheduler(config, log):
    """`pytest -n N` (xdist's default `--dist load`) -> one module per worker, modules in collection order.

    A module's fixtures (a built torch reference, a loaded pipeline) and its jit compilations are made
    once per process: spread over two workers, every heavy module paid for them twice. An explicit
    `--dist` other than load is left alone.
    """
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # keep SLOW_MODULES_FIRST's order, not "most tests first"
    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_module_rank)  # stable: the order within a module and among the rest is kept
    # GPU tests skip (with a reason) on machines without a Hopper GPU, e.g. CI.
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if not gpu_items:
        return
    if not has_hopper():
        skip = pytest.mark.skip(reason="needs an NVIDIA Hopper GPU (run on the device machine)")
        for it in gpu_items:
            it.add_marker(skip)
