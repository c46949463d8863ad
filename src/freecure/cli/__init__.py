"""The `freecure` command line. Each sub-command lives in its own module of this package
and exposes ``register(subparsers)``; the library itself never prints, the CLI does."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import FreeCureError

# Sub-command modules, in the order `freecure --help` lists them.
COMMANDS = ("generate", "attributes", "parse", "cost", "eval", "report", "demo")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="freecure",
        description="FreeCure: recover the prompt consistency of face-personalized diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"freecure {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FreeCureError as error:
        print(f"freecure {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
