"""Typed option declarations, and the checked value types they use.

A backend declares its own options once, as :class:`Option` values (``Backend.options``); the
command line (``freecure generate``, ``eval``, ``cost``, ``analyze``) adds them to its parsers
with :meth:`Option.add_to` and the web demo draws its controls from the same declarations
(:attr:`Option.control`), so neither keeps a list of any backend's options.

Each value type parses one command-line value and raises ``argparse.ArgumentTypeError`` with a
message that says what was wrong; argparse turns it into one line and exit code 2. The number
types carry their bounds (``parse.bounds``, ``parse.number``) for the demo's controls.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def _number(text: str, kind: Callable, what: str):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def finite_float(minimum: float | None = None, maximum: float | None = None, open_minimum: bool = False):
    """A float type that rejects NaN, ±inf and values outside [minimum, maximum]
    ((minimum, maximum] when ``open_minimum``)."""

    def parse(text: str) -> float:
        value = _number(text, float, "a number")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a plain number such as 7.5")
        low_bad = minimum is not None and (value <= minimum if open_minimum else value < minimum)
        if low_bad or (maximum is not None and value > maximum):
            low = "(" if open_minimum else "["
            high = "∞" if maximum is None else f"{maximum:g}"
            bounds = f"{low}{'-∞' if minimum is None else f'{minimum:g}'}, {high}]"
            raise argparse.ArgumentTypeError(f"{value:g} is outside {bounds}")
        return value

    parse.__name__ = "number"  # argparse names the type in its messages
    parse.number, parse.bounds = float, (minimum, maximum)
    return parse


def int_range(minimum: int | None = None, maximum: int | None = None, what: str = "a whole number"):
    """An int type that rejects values outside [minimum, maximum]."""

    def parse(text: str) -> int:
        value = _number(text.strip().replace("_", ""), int, what)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            high = "" if maximum is None else f" and at most {maximum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: it must be at least {minimum}{high}")
        return value

    parse.__name__ = "integer"
    parse.number, parse.bounds = int, (minimum, maximum)
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)


#: Metavars of options that name a file or folder the run reads (``freecure generate`` refuses to
#: replace a folder holding one, ``--overwrite``); the demo offers no control for them.
PATH_METAVARS = frozenset({"PATH", "FILE", "DIR", "FOLDER", "IMAGE", "PHOTO"})


@dataclass(frozen=True)
class Option:
    """One option of a backend, declared once.

    Attributes:
        flag: the command-line flag, ``--inject-fraction``; its attribute name (:attr:`dest`) is
            the flag without dashes, ``inject_fraction``.
        help: what it does, for ``--help`` and the demo.
        type: a checked value type (:func:`finite_float`, :func:`int_range`, …) or None (text).
        default: the value when not given.
        choices: the allowed values, or None.
        metavar: the value's name in ``--help``; ``FILE``, ``PATH``, ``DIR`` and ``FOLDER`` mark
            a file the run reads (:data:`PATH_METAVARS`).
        flag_only: a switch (``store_true``) rather than a value.
        unread: ``unread(args)`` → why the option would be ignored in that run (then giving it
            is refused), or None where it is read; None: always read by its backend.
    """

    flag: str
    help: str = ""
    type: Callable[[str], Any] | None = None
    default: Any = None
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    flag_only: bool = False
    unread: Callable[[Any], str | None] | None = None

    def __post_init__(self):
        if self.flag_only and self.default is None:
            object.__setattr__(self, "default", False)  # a switch is off unless given

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def is_path(self) -> bool:
        return self.metavar in PATH_METAVARS

    @property
    def control(self) -> str:
        """The kind of control that sets it: ``"switch"``, ``"choice"``, ``"number"``, ``"path"``
        or ``"text"``."""
        if self.flag_only:
            return "switch"
        if self.choices is not None:
            return "choice"
        if getattr(self.type, "number", None) is not None:
            return "number"
        return "path" if self.is_path else "text"

    @property
    def bounds(self) -> tuple[float | None, float | None]:
        """(minimum, maximum) of a number option, (None, None) otherwise."""
        return getattr(self.type, "bounds", (None, None))

    def add_to(self, group) -> None:
        """Add the option to an argparse parser or argument group."""
        if self.flag_only:
            group.add_argument(self.flag, action="store_true", default=self.default, help=self.help)
            return
        kwargs = dict(default=self.default, help=self.help)
        for name in ("type", "choices", "metavar"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        group.add_argument(self.flag, **kwargs)

    def parse(self, value: Any) -> Any:
        """A value given in Python or by the demo (text or number), checked as the command line
        checks it; None stays None.

        Raises:
            InputError: naming the option and what was wrong.
        """
        from .errors import InputError

        if value is None or self.flag_only:
            return bool(value) if self.flag_only else None
        text = str(value)
        try:
            parsed = self.type(text) if self.type is not None else text
        except argparse.ArgumentTypeError as error:
            raise InputError(f"{self.flag}: {error}") from None
        if self.choices is not None and parsed not in self.choices:
            raise InputError(f"{self.flag}: {parsed!r} is not one of {', '.join(map(str, self.choices))}")
        return parsed
