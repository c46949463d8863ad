"""Exceptions raised by freecure. Every message says what was wrong and what to do."""


class FreeCureError(Exception):
    """Base class of freecure's own errors."""


class InputError(FreeCureError, ValueError):
    """A user-supplied value (file, prompt, option) cannot be used as given."""


class WeightsNotFoundError(FreeCureError, FileNotFoundError):
    """A model checkpoint could not be found or does not match the model."""


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to about ``limit`` characters for messages: "start … end" (a 10,000-word
    prompt is not echoed whole)."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit - 5, 10)
    return f"{text[: keep * 2 // 3].rstrip()} … {text[-(keep // 3):].lstrip()} ({len(text)} characters)"


def check_number(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    open_minimum: bool = False,
    integer: bool = False,
) -> None:
    """Refuse a value that is not a finite real number in [minimum, maximum]
    ((minimum, maximum] when ``open_minimum``): NaN fails every comparison, so ``x < 1``
    style checks let it through; this does not.

    Raises:
        InputError: naming ``name``, the value and the allowed range.
    """
    import math
    import numbers

    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        what = "a whole number" if integer else "a finite number"
        raise InputError(f"{name} must be {what}, got {value!r}")
    too_low = minimum is not None and (value <= minimum if open_minimum else value < minimum)
    if too_low or (maximum is not None and value > maximum):
        bounds = []
        if minimum is not None:
            bounds.append(f"{'greater than' if open_minimum else 'at least'} {minimum}")
        if maximum is not None:
            bounds.append(f"at most {maximum}")
        raise InputError(f"{name} must be {' and '.join(bounds)}, got {value!r}")


class BlankImageError(FreeCureError):
    """A run produced an image that is none: NaN or infinite numbers, or one colour everywhere."""


BLANK_IMAGE_ADVICE = (
    "the model overflowed or was fed values out of range: check the guidance scale, the identity embedding "
    "(--face-embedding, --identity-embedding) and the other numeric settings, or try --dtype float32"
)
