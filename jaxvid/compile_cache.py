"""JAX's persistent compilation cache, on by default, so a second process with the same shapes compiles nothing.

Every executable XLA builds (denoising loop, text encoder, VAE tiles) is written to a folder and
read back by later processes whose program and options hash the same. Default folder:
`$XDG_CACHE_HOME/jaxvid/jax-compile` (`~/.cache/jaxvid/jax-compile` without XDG_CACHE_HOME).
`JAXVID_COMPILE_CACHE=DIR` picks another folder, `JAXVID_COMPILE_CACHE=off` (or 0/false/none)
turns the cache off; the CLI's `--compile-cache DIR` / `--no-compile-cache` override both.

JAX only writes entries that took >= 1 s to compile by default; we set the minimum compile time
to 0 and the minimum entry size to -1 (no limit) so small CPU programs are cached too (the same
names and meaning on jax 0.10.2 and 0.11.2). On GPU, JAX's default also enables XLA's per-fusion
autotuning cache inside the same folder, so a new program with already-tuned kernels (e.g. a VAE
tile of another video size) skips most autotuning.

On GPU our programs compile with XLA's autotuning at level 1 (`compiler_options()`): it still
times every candidate convolution / GEMM algorithm and keeps the fastest, but skips filling the
buffers with random data and cross-checking every candidate's result (level 4, XLA's default).
Measured on an H200 (CogVideoX-2b, 49 x 480 x 720, jax 0.11.2): the tiled VAE decode's four tile
programs took 190-197 s to compile at level 4 and 41 s at level 1, the whole first run 215 s -> 55 s,
with the same step (0.527 / 0.518 s) and decode (2.55 / 2.33 s) times; level 0 (no autotuning)
compiled in 27 s but stepped 6x slower. The VAE's programs (`stage="vae"`) can take their own level:
at level 1 their autotuning is still 46 of a cold CogVideoX-5b run's 55 s of compiling, but level 0
cut that to ~10 s and made the tiled decode itself unusable (not done after 125 s, vs 2.7 s; H200,
session 6), so they stay at the general level. `JAXVID_GPU_AUTOTUNE_LEVEL=N` picks another level for
every program, `JAXVID_GPU_AUTOTUNE_LEVEL_VAE=N` for the VAE's alone, and an
`--xla_gpu_autotune_level` in XLA_FLAGS is left alone. The VAE's programs also compile without
Triton GEMMs and time only deterministic convolution algorithms (`GPU_STAGE_OPTIONS`): their
autotuning took 10 s instead of 36 s (H200, session 7), which is what a cold CogVideoX-5b run
spends most of its compile on. Other XLA options for jaxvid's programs alone:
`JAXVID_XLA_OPTIONS=name=value,...` (all) and `JAXVID_XLA_OPTIONS_VAE=...` (the VAE's, e.g.
`xla_gpu_exclude_nondeterministic_ops=false` to time every algorithm again).

`CompileCounter` listens to JAX's monitoring events, so callers and tests can tell how many
executables were really compiled and how many came from the cache. jaxvid's own programs also go
through a second store in the same folder (jaxvid.pipelines.executable_cache: serialized
executables keyed without tracing, so a warm process neither traces nor lowers them); its loads
count as cache hits too.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType

import jax

log = logging.getLogger(__name__)

ENV_VAR = "JAXVID_COMPILE_CACHE"
_OFF = {"0", "off", "false", "no", "none", ""}
# Events recorded by jax._src (same names in jax 0.10.2 and 0.11.2).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # every XLA compile request, hit or miss
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # a top-level jit traced to a jaxpr (kwarg fun_name)
# jaxvid.pipelines.executable_cache: an executable read from disk without tracing or lowering
EXECUTABLE_LOAD_EVENT = "/jaxvid/executable_cache/load_duration"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/jaxvid/jax-compile`, or `~/.cache/jaxvid/jax-compile`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jaxvid" / "jax-compile"


def resolve_cache_dir(path: str | os.PathLike | None = None, *, enabled: bool = True) -> Path | None:
    """The folder to use: `path` if given, else $JAXVID_COMPILE_CACHE, else the default; None when off.

    `enabled=False` (the CLI's --no-compile-cache) wins over everything.
    """
    if not enabled:
        return None
    if path is not None:
        if str(path).strip() == "":
            raise ValueError("compile cache dir is empty; expected a folder path (or --no-compile-cache)")
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    return default_cache_dir()


def enable_compile_cache(path: str | os.PathLike | None = None, *, enabled: bool = True) -> Path | None:
    """Turn JAX's persistent compilation cache on (folder from `resolve_cache_dir`) or off.

    Best called before the first compile of the process; a later call with another folder resets
    JAX's cache object so the new folder is used from then on. Returns the folder in use, or None
    when caching is off. Raises ValueError if the folder cannot be created.
    """
    folder = resolve_cache_dir(path, enabled=enabled)
    if (str(folder) if folder else None) != cache_dir_in_use():
        # JAX opens its cache once; forget it so a second call with another folder takes effect
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    if folder is None:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_enable_compilation_cache", False)
        log.info("persistent compilation cache off: every new process compiles again")
        return None
    try:
        # 0o700: JAX runs what it finds in this folder, so only its owner may write there.
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compile cache dir {str(folder)!r}: cannot create it ({e}); "
                         "pass another folder with --compile-cache DIR or turn it off with --no-compile-cache") from e
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache everything, however small or fast to compile (defaults skip programs under 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    log.info("persistent compilation cache: %s", folder)
    return folder


AUTOTUNE_ENV_VAR = "JAXVID_GPU_AUTOTUNE_LEVEL"
DEFAULT_GPU_AUTOTUNE_LEVEL = 1


# Programs that may autotune at their own level ($JAXVID_GPU_AUTOTUNE_LEVEL_<STAGE>). The VAE's
# autotuning is most of a cold CogVideoX run's compile (46 of 55 s at 49 x 480 x 720, H200), but
# level 0 made its decode unusable (> 125 s instead of 2.7 s), so no stage has a level of its own.
STAGES = ("default", "vae")
# Options a stage's programs get on GPU by default (before $JAXVID_XLA_OPTIONS[_<STAGE>]). The VAE's
# tiled decode: without Triton GEMMs and with only deterministic convolution algorithms to time, its
# four tile programs autotuned in 10.1 s instead of 36.3 s (CogVideoX-5b VAE, 49 x 480 x 720, H200,
# session 7, bench/vae_compile.py), decoding in 1.79 s instead of 1.66 s, frames within 0.001.
GPU_STAGE_OPTIONS: dict[str, dict[str, bool]] = {
    "vae": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_exclude_nondeterministic_ops": True},
}


OPTIONS_ENV_VAR = "JAXVID_XLA_OPTIONS"
OptionValue = bool | int | float | str


def _parse_option_value(raw: str) -> OptionValue:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def extra_options(stage: str = "default") -> dict[str, OptionValue]:
    """XLA debug options from $JAXVID_XLA_OPTIONS and, for `stage`, $JAXVID_XLA_OPTIONS_<STAGE>
    (the stage's win): "name=value,name=value" with true/false, numbers or strings as values, e.g.
    `JAXVID_XLA_OPTIONS_VAE=xla_gpu_enable_triton_gemm=false`. Unlike XLA_FLAGS they change only
    jaxvid's own programs (and their cache keys). Raises ValueError for an entry without "=" or a
    name that is not an xla_* option."""
    found: dict[str, OptionValue] = {}
    names = [OPTIONS_ENV_VAR] + ([f"{OPTIONS_ENV_VAR}_{stage.upper()}"] if stage != "default" else [])
    for var in names:
        for item in os.environ.get(var, "").split(","):
            item = item.strip()
            if not item:
                continue
            name, eq, value = item.partition("=")
            name = name.strip().lstrip("-")
            if not eq or not name.startswith("xla_") or not value.strip():
                raise ValueError(f"${var}: {item!r}; expected comma-separated xla_<option>=<value> entries")
            found[name] = _parse_option_value(value.strip())
    return found


def compiler_options(backend: str | None = None, stage: str = "default") -> dict[str, OptionValue]:
    """XLA options for the pipelines' own programs: on GPU, autotuning at level 1 (see the module
    docstring) unless $JAXVID_GPU_AUTOTUNE_LEVEL says otherwise or XLA_FLAGS sets the level itself;
    nothing on other backends. `stage="vae"` (the VAE programs, whose cold compile is mostly
    convolution autotuning) read $JAXVID_GPU_AUTOTUNE_LEVEL_VAE first, then
    $JAXVID_GPU_AUTOTUNE_LEVEL and add GPU_STAGE_OPTIONS["vae"] on GPU. Options from
    `extra_options(stage)` are added on every backend and win over those defaults.
    Raises ValueError for a level outside 0..4 or an unknown stage."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}; expected one of {STAGES}")
    extra = extra_options(stage)
    if (backend or jax.default_backend()) not in ("gpu", "cuda", "rocm"):
        return extra
    options: dict[str, OptionValue] = {**GPU_STAGE_OPTIONS.get(stage, {}), **extra}
    if "xla_gpu_autotune_level" in os.environ.get("XLA_FLAGS", ""):
        return options
    var = f"{AUTOTUNE_ENV_VAR}_{stage.upper()}"
    if stage == "default" or var not in os.environ:
        var = AUTOTUNE_ENV_VAR
    raw = os.environ.get(var, str(DEFAULT_GPU_AUTOTUNE_LEVEL)).strip()
    if raw not in {"0", "1", "2", "3", "4"}:
        raise ValueError(f"${var}={raw!r}; expected an XLA autotune level 0..4 (4 = XLA's default)")
    return {"xla_gpu_autotune_level": int(raw), **options}


def cache_dir_in_use() -> str | None:
    """The folder JAX is configured to cache compiled programs in (None = off)."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir


class CompileCounter:
    """Counts the programs asked for, how many came from a cache, and what was traced, while active.

        with CompileCounter() as c:
            f(x)
        c.compiled         # executables built by XLA (requests that no cache served)
        c.cache_hits       # served by JAX's persistent cache or by jaxvid's executable store
        c.executable_hits  # of those, read from jaxvid's executable store (no tracing, no lowering)
        c.traced           # names of the top-level functions traced to a jaxpr (eager ops included)

    `requests` = XLA compile requests + executables read from jaxvid's store. Uses jax.monitoring
    listeners, registered on enter and removed on exit.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.cache_hits = 0
        self.executable_hits = 0
        self.seconds = 0.0
        self.traced: list[str] = []

    @property
    def compiled(self) -> int:
        return self.requests - self.cache_hits

    def _on_duration(self, event: str, duration: float, **kwargs: object) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.requests += 1
            self.seconds += duration
        elif event == EXECUTABLE_LOAD_EVENT:
            self.requests += 1
            self.cache_hits += 1
            self.executable_hits += 1
            self.seconds += duration
        elif event == TRACE_EVENT:
            self.traced.append(str(kwargs.get("fun_name", "?")))

    def _on_event(self, event: str, **_: object) -> None:
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)


def describe(counter: CompileCounter, what: str) -> str:
    """One line for the log: what was compiled, or that it came from the cache."""
    folder = cache_dir_in_use()
    if counter.requests and counter.compiled == 0:
        untraced = f", {counter.executable_hits} without tracing" if counter.executable_hits else ""
        return (f"{what}: loaded from the compilation cache ({counter.cache_hits} programs{untraced}, "
                f"{counter.seconds:.1f} s)")
    tail = f"cached in {folder} for next time" if folder else "compilation cache off: compiles again next run"
    return f"{what}: compiled {counter.compiled} programs in {counter.seconds:.1f} s ({tail})"
