"""`jaxvid-convert SRC DST [--dtype bf16|fp32|fp16] [--weights fp8] [--overwrite] [--quiet]` and `jaxvid-convert --verify DIR`.

The jaxvid-aware half of conversion: which model classes jaxvid has, their abstract parameter
shapes and key tables (a `TargetResolver` over `jaxvid.models.registry`), and the command line.
The conversion itself (layouts, checks, atomic output) is `convert.pipeline`, which imports nothing
from jaxvid. Exit status: 0 ok, 1 the conversion or verification failed, 2 a bad argument or source
folder (one line on stderr, nothing written), 130/143 interrupted by SIGINT/SIGTERM (temp folders removed;
see `convert.cancel` for why the signal handlers only record the request).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from convert import pipeline
from convert.cancel import Cancellation, Cancelled, handling_signals
from convert.checkpoint import verify_checkpoint
from convert.pipeline import DTYPES, Target

log = logging.getLogger("jaxvid.convert")


def _entry_importable(entry: Any) -> bool:
    """True when the entry's model and key-table modules exist (other models land over time)."""
    modules = {ref.split(":")[0] for ref in (entry.config, entry.model, entry.rules)}
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:
        return False


class JaxvidResolver:
    """`convert.pipeline.TargetResolver` over jaxvid's model registry."""

    def supports(self, class_name: str) -> bool:
        from jaxvid.models.registry import MODELS

        return class_name in MODELS and _entry_importable(MODELS[class_name])

    def supported(self) -> list[str]:
        from jaxvid.models.registry import MODELS

        return sorted(c for c in MODELS if self.supports(c))

    def target(self, class_name: str, hf_config: dict[str, Any], source: Any, dtype: np.dtype,
               *, weights: str | None = None) -> Target:
        from jaxvid.models.loading import config_for, entry_for, model_specs, rules_for
        from jaxvid.models.registry import resolve

        entry = entry_for(class_name)
        cfg = config_for(entry, hf_config, dtype)
        model_cls = resolve(entry.model)
        specs = model_specs(model_cls, cfg)
        quantize = None
        if weights == "fp8":
            from jaxvid.models.fp8 import FP8_TARGETS, fp8_checkpoint_quantizer

            if model_cls.__name__ in FP8_TARGETS:  # the DiTs; text encoders and VAEs keep float weights
                quantize = fp8_checkpoint_quantizer(model_cls.__name__)
        return Target(specs=specs, rules=rules_for(entry, cfg, source), ignore=entry.ignore,
                      param_dtype=np.dtype(cfg.param_dtype), quantize=quantize)


RESOLVER = JaxvidResolver()


def convert_path(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
                 overwrite: bool = False, show_progress: bool = True, weights: str | None = None,
                 cancel: Cancellation | None = None) -> Path:
    """Convert a component, pipeline or component-set folder into jaxvid checkpoints (see `convert.pipeline`).

    `weights="fp8"` stores the DiT's linear kernels as e4m3 + per-channel scales (jaxvid.models.fp8)."""
    return pipeline.convert_path(src, dst, RESOLVER, dtype=dtype, overwrite=overwrite, show_progress=show_progress,
                                 weights=weights, cancel=cancel)


def convert_component(src: Path, dst: Path, *, dtype: str | None = None, show_progress: bool = True,
                      label: str | None = None) -> Path:
    """Convert one component folder (config.json + safetensors) into a jaxvid checkpoint at `dst`."""
    return pipeline.convert_component(src, dst, RESOLVER, dtype=dtype, show_progress=show_progress, label=label)


def is_component_set(path: str | os.PathLike) -> bool:
    """True for a folder of component subfolders without model_index.json (LongCat-Video's release layout)."""
    return pipeline.is_component_set(path, RESOLVER)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxvid-convert",
        description="Convert diffusers/transformers safetensors (a component, a pipeline folder, or a folder of "
        "component subfolders such as LongCat-Video's dit/ text_encoder/ vae/ tokenizer/ scheduler/ lora/) "
        "into jaxvid checkpoints; or check a converted checkpoint with --verify DIR.",
    )
    parser.add_argument("src", nargs="?", help="component folder (config.json + safetensors), pipeline folder "
                        "(model_index.json) or folder of component subfolders (LongCat-Video)")
    parser.add_argument("dst", nargs="?", help="output folder (must not exist unless --overwrite; must not overlap SRC)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="stored parameter dtype (default: the dtype holding most of the source's bytes)")
    parser.add_argument("--weights", choices=pipeline.WEIGHT_FORMATS, default=None,
                        help="fp8: store the DiT's attention/MLP kernels as float8 e4m3 with per-output-channel "
                        "scales (half the bytes of bf16); default: float weights of --dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("--verify", metavar="DIR", default=None,
                        help="read every tensor of the converted checkpoint DIR (or of each component checkpoint in "
                        "it) and check sizes, shapes, dtypes and crc32 checksums; exit 1 naming bad tensors")
    return parser


def _fail(message: str, status: int = 2) -> int:
    sys.stderr.write(f"jaxvid-convert: error: {' '.join(str(message).split())}\n")
    return status


def _verify(folder: str) -> int:
    path = Path(folder)
    checkpoints = pipeline.iter_checkpoints(path)
    if not checkpoints:
        return _fail(f"--verify {folder!r}: not a jaxvid checkpoint or a folder of them (no jaxvid.json)")
    problems: list[str] = []
    for ckpt in checkpoints:
        try:
            found = verify_checkpoint(ckpt)
        except ValueError as e:
            found = [str(e)]
        problems += found
        log.info("%s: %s", ckpt, "ok" if not found else f"{len(found)} problem(s)")
    for line in problems:
        sys.stderr.write(f"jaxvid-convert: bad: {' '.join(line.split())}\n")
    if problems:
        return 1
    log.info("verified %d checkpoint(s): every tensor's size, shape, dtype and checksum match", len(checkpoints))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if args.verify is not None and (args.src or args.dst):
        return _fail("--verify DIR takes no SRC/DST; run it on its own")
    if args.verify is None and (args.src is None or args.dst is None):
        return _fail("SRC and DST are required (or --verify DIR)")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("absl", "jax._src.xla_bridge"):  # orbax logs every save step at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.verify is not None:
        return _verify(args.verify)
    cancel = Cancellation()
    try:
        with handling_signals(cancel):
            dst = convert_path(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                               show_progress=not args.quiet, weights=args.weights, cancel=cancel)
    except (Cancelled, KeyboardInterrupt) as e:  # KeyboardInterrupt: a SIGINT before our handler was installed
        stop = e if isinstance(e, Cancelled) else Cancelled(signal.SIGINT)
        return _fail(f"stopped by {signal.Signals(stop.signum).name}; nothing was written", stop.exit_code)
    except (ValueError, FileExistsError) as e:  # bad source, destination or option
        return _fail(e)
    except OSError as e:  # the disk, not the input
        return _fail(f"conversion failed: {e}", 1)
    if cancel.signum is not None:  # the signal came after the final rename: the output is whole, but say so
        stop = Cancelled(cancel.signum)
        return _fail(f"stopped by {signal.Signals(stop.signum).name} after {dst} was completely written "
                     "(it is whole and usable)", stop.exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
