"""The persistent compilation cache: a second process with the same shapes compiles nothing.

Each run is a fresh Python process (the cache only matters across processes); compiles are counted
with JAX's monitoring events (jaxvid.compile_cache.CompileCounter), the reference being JAX's own
count of XLA compile requests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxvid import compile_cache

ROOT = Path(__file__).resolve().parents[1]

_JIT_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from jaxvid.compile_cache import CompileCounter, enable_compile_cache
enable_compile_cache(sys.argv[1] if sys.argv[1] != "OFF" else None, enabled=sys.argv[1] != "OFF")
with CompileCounter() as c:
    y = jax.jit(lambda x: jnp.sin(x) * 2 + x.sum())(jnp.arange(8.0))
    jax.block_until_ready(y)
print(json.dumps({"requests": c.requests, "hits": c.cache_hits, "compiled": c.compiled}))
"""

# The whole CLI on the embedded tiny pipeline, with the progress bar on: the denoising loop runs
# one step per call from the host, so no host callback keeps it out of the cache.
_CLI_SCRIPT = """
import json, sys
from jaxvid.cli.main import main
from jaxvid.compile_cache import CompileCounter
with CompileCounter() as c:
    rc = main(["generate", "--output", sys.argv[1], "--compile-cache", sys.argv[2], "--steps", "2"])
print(json.dumps({"rc": rc, "requests": c.requests, "hits": c.cache_hits, "compiled": c.compiled}))
"""


def _run(script: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_off_reads_and_writes_nothing(tmp_path):
    run = _run(_JIT_SCRIPT, "OFF")
    assert run["compiled"] >= 1 and run["hits"] == 0


@pytest.mark.slow
def test_tiny_pipeline_second_run_compiles_nothing(tmp_path):
    """Text encoder, denoising loop (progress bar on), VAE decode: all from the cache the second time."""
    cache = str(tmp_path / "cache")
    first = _run(_CLI_SCRIPT, str(tmp_path / "a.mp4"), cache)
    second = _run(_CLI_SCRIPT, str(tmp_path / "b.mp4"), cache)
    assert first["rc"] == 0 and second["rc"] == 0
    assert first["compiled"] >= 3
    assert second["compiled"] == 0, second
    assert second["hits"] == first["requests"]
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_resolve_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.resolve_cache_dir() == tmp_path / "jaxvid" / "jax-compile"
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir() == tmp_path / "env"
    assert compile_cache.resolve_cache_dir(tmp_path / "flag") == tmp_path / "flag"
    assert compile_cache.resolve_cache_dir(tmp_path / "flag", enabled=False) is None
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve_cache_dir() is None
    with pytest.raises(ValueError, match="compile cache dir"):
        compile_cache.resolve_cache_dir("  ")


def test_gpu_compiler_options(monkeypatch):
    import jax
    import jax.numpy as jnp

    monkeypatch.delenv(compile_cache.AUTOTUNE_ENV_VAR, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert compile_cache.compiler_options("cpu") == {}
    gpu = compile_cache.compiler_options("gpu")
    assert gpu == {"xla_gpu_autotune_level": 1}
    # XLA knows the option by this name (an unknown one is an INVALID_ARGUMENT error at compile)
    out = jax.jit(lambda x: x * 2).lower(jnp.arange(3.0)).compile(gpu)(jnp.arange(3.0))
    assert out.tolist() == [0.0, 2.0, 4.0]
    monkeypatch.setenv(compile_cache.AUTOTUNE_ENV_VAR, "4")
    assert compile_cache.compiler_options("gpu") == {"xla_gpu_autotune_level": 4}
    monkeypatch.setenv(compile_cache.AUTOTUNE_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="JAXVID_GPU_AUTOTUNE_LEVEL"):
        compile_cache.compiler_options("gpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=2")  # the user's own choice stands
    assert compile_cache.compiler_options("gpu") == {}
