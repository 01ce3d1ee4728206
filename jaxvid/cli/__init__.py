"""The `jaxvid` command. Subcommands:

    jaxvid generate [--model DIR] ...    text/image to video (no --model: the embedded tiny default)
    jaxvid demo [--out DIR] [--seed N]   tiny random CogVideoX: write diffusers folder, convert, load, forward
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from jaxvid.generate import add_generate_parser

log = logging.getLogger("jaxvid")


def _demo(args: argparse.Namespace) -> int:
    from jaxvid.demo import run_demo

    summary = run_demo(args.out, seed=args.seed)
    log.info("demo finished: output %s, %d parameters, timings %s",
             summary["output_shape"], summary["params"], {k: round(v, 3) for k, v in summary["timings"].items()})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxvid", description="CogVideoX and LongCat-Video in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="build a tiny random CogVideoX checkpoint, convert it, load it and run a forward pass",
        description="Writes a tiny random CogVideoX pipeline folder in diffusers' layout (numpy only), converts it "
        "with jaxvid-convert, loads it with load_transformer and runs one jitted forward pass, logging what it did.",
    )
    demo.add_argument("--out", default=None, help="keep the files in this folder (default: a temp folder, removed)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    add_generate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        for noisy in ("absl", "jax._src.xla_bridge"):  # orbax logs every save step at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
