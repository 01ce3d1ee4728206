"""The `jaxvid` command. Subcommands:

    jaxvid generate [--model DIR] ...    text/image to video (no --model: the embedded tiny default)
    jaxvid demo [--out DIR] [--seed N]   tiny random CogVideoX: write diffusers folder, convert, load, forward

`python -m jaxvid ...` runs the same command.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from jaxvid.cli.demo import add_demo_parser
from jaxvid.cli.generate import OneLineParser, add_generate_parser

log = logging.getLogger("jaxvid")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="jaxvid", description="CogVideoX and LongCat-Video in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_demo_parser(sub)
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
