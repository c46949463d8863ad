"""The `freecure` command line. Each sub-command lives in its own module of this package
and exposes ``register(subparsers)``; the library itself never prints, the CLI does."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import traceback

from ..core.errors import FreeCureError
from ..core.terminal import printable

# Sub-command modules, in the order `freecure --help` lists them.
COMMANDS = ("generate", "embed", "attributes", "parse", "cost", "eval", "report", "analyze", "demo")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``freecure generate: error: argument --steps: …`` and a
    pointer to ``--help``, instead of the whole usage block (sub-command parsers inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = ArgumentParser(
        prog="freecure",
        description="FreeCure: recover the prompt consistency of face-personalized diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"freecure {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    for sub in subparsers.choices.values():  # `freecure generate ... --debug` works too
        if not any("--debug" in action.option_strings for action in sub._actions):
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def error_message(error: BaseException) -> str | None:
    """The one line shown for an error a user can cause and fix; None for a bug (which keeps
    its traceback). Every sub-command's errors go through here (see :func:`main`)."""
    import torch
    from PIL import Image

    if isinstance(error, FreeCureError):
        return str(error)
    if isinstance(error, Image.DecompressionBombError):
        return f"{error}; the image is too large to decode safely: give a smaller image"
    if isinstance(error, torch.cuda.OutOfMemoryError) or isinstance(error, MemoryError):
        return (
            "out of memory; try a smaller --height/--width, fewer --steps, --dtype float16 on a GPU, "
            "or a machine with more memory"
        )
    if isinstance(error, ModuleNotFoundError):
        return f"a needed package is not installed ({error}); see README.md § Set-up"
    if isinstance(error, OSError):
        where = f" {error.filename}" if error.filename else ""
        if error.errno == errno.ENOSPC:
            return f"no space left on the device{where}; free some space or choose another --out"
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write{where} ({error.strerror}); choose another --out"
        return f"{error.strerror or error}{':' + where if where else ''}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Errors a user can fix print one line, ``freecure CMD: error: …``,
    and exit with 2 (130 when interrupted); ``--debug`` adds the traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("FREECURE_DEBUG", "") not in ("", "0")
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"freecure {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted into expected kinds and bugs below
        message = error_message(error)
        if message is None:
            raise  # a bug: keep the traceback
        if debug:
            traceback.print_exc()
        # lines at "\n" only; a user's "\r", escape sequence or other control byte is shown escaped
        first, *rest = [printable(line) for line in message.strip("\n").split("\n")]
        print(f"freecure {args.command}: error: {first}", file=sys.stderr)
        for line in rest:
            print(f"  {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
