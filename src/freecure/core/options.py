"""Option value types shared by every layer: checked numbers for argparse and for typed backend options.

Each type parses one command-line value and raises ``argparse.ArgumentTypeError`` with a message
that says what was wrong; argparse turns it into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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
    return parse


positive_int = int_range(1)


non_negative_int = int_range(0)
