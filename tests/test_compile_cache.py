"""The persistent compilation cache: a second process with the same shapes compiles nothing, and
traces nothing (jaxvid's executable store).

Each run is a fresh Python process (the cache only matters across processes); compiles are counted
with JAX's monitoring events (jaxvid.compile_cache.CompileCounter), the reference being JAX's own
count of XLA compile requests and its own tracing events. The executable store's hit / miss / damage
cases run in this process with fresh CompiledFunctions (what a new process has), their outputs compared
with a plain jax.jit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvid import compile_cache
from jaxvid.compile_cache import CompileCounter
from jaxvid.pipelines import executable_cache
from jaxvid.pipelines.loop import CompiledFunction

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
print(json.dumps({"rc": rc, "requests": c.requests, "hits": c.cache_hits, "compiled": c.compiled,
                  "executable_hits": c.executable_hits, "traced": c.traced}))
"""
# The tiny pipeline's jitted stages (CompiledFunction), by the names JAX's trace events give them.
_STAGES = {"_encode_text", "_initial_noise", "_denoise", "_decode"}


def _run(script: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", executable_cache.ENV_VAR: "on"}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_off_reads_and_writes_nothing(tmp_path):
    run = _run(_JIT_SCRIPT, "OFF")
    assert run["compiled"] >= 1 and run["hits"] == 0


@pytest.mark.slow
def test_tiny_pipeline_second_run_compiles_nothing(tmp_path):
    """Text encoder, denoising loop (progress bar on), VAE decode: all from the cache the second time,
    and the pipeline's stages not even traced (executables read from jaxvid's store)."""
    cache = str(tmp_path / "cache")
    first = _run(_CLI_SCRIPT, str(tmp_path / "a.mp4"), cache)
    second = _run(_CLI_SCRIPT, str(tmp_path / "b.mp4"), cache)
    assert first["rc"] == 0 and second["rc"] == 0
    assert first["compiled"] >= 3
    assert second["compiled"] == 0, second
    assert second["hits"] == first["requests"]
    assert _STAGES <= set(first["traced"]), first["traced"]
    assert first["executable_hits"] == 0 and second["executable_hits"] == len(_STAGES), second
    assert not _STAGES & set(second["traced"]), second["traced"]
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
    monkeypatch.delenv(compile_cache.AUTOTUNE_ENV_VAR + "_VAE", raising=False)
    monkeypatch.delenv(compile_cache.OPTIONS_ENV_VAR, raising=False)
    monkeypatch.delenv(compile_cache.OPTIONS_ENV_VAR + "_VAE", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert compile_cache.compiler_options("cpu") == {}
    assert compile_cache.compiler_options("cpu", stage="vae") == {}
    gpu = compile_cache.compiler_options("gpu")
    assert gpu == {"xla_gpu_autotune_level": 1}
    vae_defaults = {"xla_gpu_enable_triton_gemm": False, "xla_gpu_exclude_nondeterministic_ops": True}
    assert compile_cache.compiler_options("gpu", stage="vae") == {"xla_gpu_autotune_level": 1, **vae_defaults}
    # XLA knows the option by this name (an unknown one is an INVALID_ARGUMENT error at compile)
    out = jax.jit(lambda x: x * 2).lower(jnp.arange(3.0)).compile(gpu)(jnp.arange(3.0))
    assert out.tolist() == [0.0, 2.0, 4.0]
    monkeypatch.setenv(compile_cache.AUTOTUNE_ENV_VAR, "4")
    assert compile_cache.compiler_options("gpu") == {"xla_gpu_autotune_level": 4}
    # a general level set by the user covers the VAE's programs too, unless their own variable is set
    assert compile_cache.compiler_options("gpu", stage="vae") == {"xla_gpu_autotune_level": 4, **vae_defaults}
    monkeypatch.setenv(compile_cache.AUTOTUNE_ENV_VAR + "_VAE", "0")
    assert compile_cache.compiler_options("gpu", stage="vae") == {"xla_gpu_autotune_level": 0, **vae_defaults}
    assert compile_cache.compiler_options("gpu") == {"xla_gpu_autotune_level": 4}
    with pytest.raises(ValueError, match="stage='dit'"):
        compile_cache.compiler_options("gpu", stage="dit")
    monkeypatch.setenv(compile_cache.AUTOTUNE_ENV_VAR + "_VAE", "x")
    with pytest.raises(ValueError, match="JAXVID_GPU_AUTOTUNE_LEVEL_VAE"):
        compile_cache.compiler_options("gpu", stage="vae")
    monkeypatch.delenv(compile_cache.AUTOTUNE_ENV_VAR + "_VAE")
    monkeypatch.setenv(compile_cache.AUTOTUNE_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="JAXVID_GPU_AUTOTUNE_LEVEL"):
        compile_cache.compiler_options("gpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=2")  # the user's own choice stands
    assert compile_cache.compiler_options("gpu") == {}
    assert compile_cache.compiler_options("gpu", stage="vae") == vae_defaults


def test_extra_xla_options(monkeypatch):
    import jax
    import jax.numpy as jnp

    monkeypatch.delenv(compile_cache.AUTOTUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(compile_cache.AUTOTUNE_ENV_VAR + "_VAE", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(compile_cache.OPTIONS_ENV_VAR, "xla_cpu_enable_fast_math=false, xla_backend_optimization_level=2")
    monkeypatch.setenv(compile_cache.OPTIONS_ENV_VAR + "_VAE", "--xla_backend_optimization_level=1,xla_dump_hlo_as_text=true")
    assert compile_cache.compiler_options("cpu") == {"xla_cpu_enable_fast_math": False,
                                                     "xla_backend_optimization_level": 2}
    # the stage's own variable wins over the general one
    vae = compile_cache.compiler_options("cpu", stage="vae")
    assert vae == {"xla_cpu_enable_fast_math": False, "xla_backend_optimization_level": 1,
                   "xla_dump_hlo_as_text": True}
    # on GPU the VAE's defaults come first and the variables win over them
    monkeypatch.setenv(compile_cache.OPTIONS_ENV_VAR, "xla_gpu_exclude_nondeterministic_ops=false")
    assert compile_cache.compiler_options("gpu", stage="vae") == {
        "xla_gpu_autotune_level": 1, "xla_gpu_enable_triton_gemm": False,
        "xla_gpu_exclude_nondeterministic_ops": False, "xla_backend_optimization_level": 1,
        "xla_dump_hlo_as_text": True}
    # XLA accepts them as compile options (an unknown name is an INVALID_ARGUMENT error)
    monkeypatch.setenv(compile_cache.OPTIONS_ENV_VAR + "_VAE", "")
    cpu = compile_cache.compiler_options("cpu")
    out = jax.jit(lambda x: x * 2).lower(jnp.arange(3.0)).compile(cpu)(jnp.arange(3.0))
    assert out.tolist() == [0.0, 2.0, 4.0]
    for bad in ("xla_cpu_enable_fast_math", "fast_math=true", "xla_backend_optimization_level="):
        monkeypatch.setenv(compile_cache.OPTIONS_ENV_VAR, bad)
        with pytest.raises(ValueError, match="JAXVID_XLA_OPTIONS"):
            compile_cache.compiler_options("cpu")


def _affine(x, scale):
    return jnp.sin(x) * scale + 1.0


class _Opaque:
    """A static argument with no description by value (identity-hashed): never stored."""

    def method(self, v):
        return v


def _opaque(x, how):
    return x * 2.0


def test_executable_store_hit_miss_and_damage(tmp_path, monkeypatch):
    """A fresh CompiledFunction (what a second process has) loads the stored executable without
    tracing and gives the plain jit's bits; another static value / shape / dtype misses; a damaged
    entry is compiled again and rewritten; an undescribable static argument stores nothing."""
    monkeypatch.setattr(compile_cache, "cache_dir_in_use", lambda: str(tmp_path))
    monkeypatch.setenv(executable_cache.ENV_VAR, "on")
    folder = tmp_path / executable_cache.SUBFOLDER
    reference = jax.jit(_affine, static_argnums=1)

    def run(fn, *args, **kw):
        with CompileCounter() as counter:
            out = CompiledFunction(fn, **kw)(*args)
        return out, counter

    x = jnp.linspace(-2.0, 2.0, 16, dtype=jnp.float32)
    out, first = run(_affine, x, 2.0, static_argnums=(1,))
    assert first.requests == 1 and first.executable_hits == 0 and "_affine" in first.traced
    np.testing.assert_array_equal(out, reference(x, 2.0))
    (entry,) = folder.glob("*.jaxexe")

    out, second = run(_affine, x, 2.0, static_argnums=(1,))
    assert second.executable_hits == 1 and second.compiled == 0 and second.traced == [], second.traced
    np.testing.assert_array_equal(out, reference(x, 2.0))

    for args in [(x, 3.0), (x[:8], 2.0), (x.astype(jnp.bfloat16), 2.0)]:  # static value, shape, dtype
        out, miss = run(_affine, *args, static_argnums=(1,))
        assert miss.executable_hits == 0 and miss.requests == 1 and "_affine" in miss.traced  # XLA asked
        np.testing.assert_array_equal(out, reference(*args))
    assert len(list(folder.glob("*.jaxexe"))) == 4

    blob = entry.read_bytes()
    for damaged in (blob[: len(blob) // 2], blob[:-1] + bytes([blob[-1] ^ 1]), b"not an executable"):
        entry.write_bytes(damaged)
        out, again = run(_affine, x, 2.0, static_argnums=(1,))
        assert again.executable_hits == 0  # the plain path (JAX's in-process caches may serve it)
        np.testing.assert_array_equal(out, reference(x, 2.0))
        assert entry.read_bytes() != damaged  # rewritten whole by the compile
    assert run(_affine, x, 2.0, static_argnums=(1,))[1].executable_hits == 1

    out, opaque = run(_opaque, x, _Opaque(), static_argnums=(1,))
    assert opaque.executable_hits == 0 and len(list(folder.glob("*.jaxexe"))) == 4
    np.testing.assert_array_equal(out, x * 2.0)

    # donation survives the store: the donated argument is consumed, the result is the plain jit's
    donated = jnp.arange(8.0)
    run(_affine, donated, 1.5, static_argnums=(1,), donate_argnums=(0,))
    donated = jnp.arange(8.0)
    out, hit = run(_affine, donated, 1.5, static_argnums=(1,), donate_argnums=(0,))
    assert hit.executable_hits == 1 and donated.is_deleted()
    np.testing.assert_array_equal(out, reference(jnp.arange(8.0), 1.5))


def test_executable_store_loads_mosaic_gpu_runtime_and_retries(tmp_path, monkeypatch):
    """A stored program whose load fails on Mosaic GPU's host symbols (a warm process that never
    imported Mosaic GPU) is loaded again after the runtime is imported, and gives the stored bits;
    without that runtime, or for another error, the entry is compiled instead."""
    import jax.experimental.serialize_executable as serialize_executable

    monkeypatch.setattr(compile_cache, "cache_dir_in_use", lambda: str(tmp_path))
    monkeypatch.setenv(executable_cache.ENV_VAR, "on")
    x = jnp.linspace(-2.0, 2.0, 16, dtype=jnp.float32)
    want = jax.jit(_affine, static_argnums=1)(x, 2.0)
    CompiledFunction(_affine, static_argnums=(1,))(x, 2.0)  # stores it
    real = serialize_executable.deserialize_and_load
    for error, runtime, hits in [("Failed to lookup host symbol: { anonymous_mosaic_gpu }", True, 1),
                                 ("Failed to lookup host symbol: { anonymous_mosaic_gpu }", False, 0),
                                 ("some other failure", True, 0)]:
        calls = []

        def fail_once(*args, error=error, calls=calls, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError(error)
            return real(*args, **kw)

        imports = []
        monkeypatch.setattr(serialize_executable, "deserialize_and_load", fail_once)
        monkeypatch.setattr(executable_cache, "_load_mosaic_gpu_runtime",
                            lambda runtime=runtime, imports=imports: imports.append(1) or runtime)
        with CompileCounter() as counter:
            out = CompiledFunction(_affine, static_argnums=(1,))(x, 2.0)
        assert counter.executable_hits == hits, error
        assert len(imports) == ("mosaic" in error)
        np.testing.assert_array_equal(out, want)


def test_static_descriptions_are_by_value():
    """Equal configs describe alike, different ones differently; closures and plain objects cannot be described."""
    from jaxvid.models.cogvideox import CogVideoXConfig

    describe = executable_cache.describe_static
    assert describe(CogVideoXConfig()) == describe(CogVideoXConfig())
    assert describe(CogVideoXConfig()) != describe(CogVideoXConfig(num_layers=3))
    assert describe((1, 2.0)) != describe((True, 2.0))
    assert describe(jnp.bfloat16) != describe(jnp.float32)
    for bad in (_Opaque(), lambda v: v, _Opaque().method):
        with pytest.raises(executable_cache.Uncacheable):
            describe(bad)


def test_executable_store_follows_the_cache_switches(tmp_path, monkeypatch):
    """No compilation cache, no executable store; JAXVID_EXECUTABLE_CACHE=off turns the store off alone."""
    monkeypatch.setenv(executable_cache.ENV_VAR, "on")
    monkeypatch.setattr(compile_cache, "cache_dir_in_use", lambda: None)
    assert executable_cache.store_in_use() is None
    monkeypatch.setattr(compile_cache, "cache_dir_in_use", lambda: str(tmp_path))
    assert executable_cache.store_in_use().folder == tmp_path / executable_cache.SUBFOLDER
    monkeypatch.setenv(executable_cache.ENV_VAR, "off")
    assert executable_cache.store_in_use() is None
