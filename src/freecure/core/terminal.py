"""Text for the terminal: what the CLI prints of a user's text never carries raw control bytes.

A prompt (or a file name) may hold an escape sequence, a bell, a carriage return, a
right-to-left override or an unpaired surrogate from undecodable command-line bytes; echoed
as is, it would recolour or clear the terminal, hide what came before it on the line,
reorder the text, or fail to print at all. :func:`printable` writes each such character in a
visible form (``\\x1b``, ``\\r``, ``\\u202e``, like Python's ``repr``), keeping every other
character — accents, CJK, emoji, ``γ`` — as it is.
"""

from __future__ import annotations

import re
import unicodedata

# Candidates: everything but printable ASCII; each is then kept or escaped by its category.
_NOT_PLAIN_ASCII = re.compile(r"[^\x20-\x7e]")
# Control (C0, DEL, C1), format (bidi overrides, zero-width characters), surrogate, and the
# line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match) -> str:
    character = match.group()
    if unicodedata.category(character) not in _UNSAFE_CATEGORIES:
        return character  # printable text: accents, CJK, emoji, "γ", "…"
    if character in _NAMED:
        return _NAMED[character]
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object) -> str:
    """``str(text)`` with every control, format, separator or surrogate character written as
    an escape (ESC → ``\\x1b``, a newline → ``\\n``, U+202E → ``\\u202e``); the rest is kept.
    Linear in the text's length."""
    return _NOT_PLAIN_ASCII.sub(_escape, str(text))
