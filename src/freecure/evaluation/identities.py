"""Evaluation identities: reference photos with a class word each, listed in a manifest.

The paper's 50 identities (30 from CelebA-HQ, 20 of the authors') are not distributable; the
repository ships one example, ``examples/identities/``. Layout::

    identities/
      identities.json        the manifest
      astronaut/ref.png      reference photo(s), paths relative to the manifest

``identities.json``::

    {"identities": [
      {"id": "astronaut", "class_word": "woman", "references": ["astronaut/ref.png"]}
    ]}

or ``identities.csv`` with columns ``id,class_word,references`` (several references
separated by ``;``), both UTF-8. ``id`` names the identity in results and folders (letters, digits,
``-``, ``_``, ``.``); ``class_word`` replaces ``<S>`` in the prompts ("man", "woman",
"boy", …). The paper uses one reference photo per identity.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InputError
from .prompts import read_text_file

MANIFEST_NAMES = ("identities.json", "identities.csv")
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Identity:
    """One identity: an id, its class word and its reference photo(s)."""

    id: str
    class_word: str
    references: tuple[Path, ...]

    def to_dict(self) -> dict:
        return {"id": self.id, "class_word": self.class_word, "references": [str(p) for p in self.references]}


#: An identity entry as the message shows it.
EXAMPLE_ENTRY = '{"id": "astronaut", "class_word": "woman", "references": ["astronaut/ref.png"]}'


def _kind(value) -> str:
    """A JSON value's kind, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:60]!r}"
    return "a list" if isinstance(value, list) else "an object"


def _text(entry: dict, name: str, where: str) -> str:
    """Field ``name`` as text: a string (or a whole number), "" when missing."""
    value = entry.get(name)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{where}: {name} must be a string, got {_kind(value)}")
    return str(value).strip()


def _identity(entry: dict, base: Path, where: str) -> Identity:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: each identity is an object such as {EXAMPLE_ENTRY}, got {_kind(entry)}")
    identity_id = _text(entry, "id", where)
    if not _ID_PATTERN.fullmatch(identity_id):
        raise InputError(f"{where}: id {identity_id!r} must be letters, digits, '-', '_' or '.'")
    class_word = _text(entry, "class_word", where)
    if not class_word:
        raise InputError(f"{where}: identity {identity_id!r} needs a class_word such as 'woman' or 'man'")
    references = entry.get("references") or []
    if isinstance(references, str):
        references = [part for part in references.split(";") if part.strip()]
    if not isinstance(references, list):
        raise InputError(
            f"{where}: references of {identity_id!r} must be a list of photo paths (or one path), "
            f"got {_kind(references)}"
        )
    if not references:
        raise InputError(f"{where}: identity {identity_id!r} lists no reference photo")
    paths = []
    for number, reference in enumerate(references, start=1):
        if not isinstance(reference, str) or not reference.strip():
            raise InputError(
                f"{where}: reference {number} of {identity_id!r} must be the path of a photo (a string), "
                f"got {_kind(reference)}"
            )
        path = Path(reference.strip()).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise InputError(f"{where}: reference photo of {identity_id!r} not found: {path}")
        paths.append(path)
    return Identity(identity_id, class_word, tuple(paths))


def load_identities(path: str | os.PathLike) -> list[Identity]:
    """Read an identity manifest (JSON or CSV), or the manifest inside a folder.

    Raises:
        InputError: no manifest, a malformed entry, a duplicate id or a missing photo.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in MANIFEST_NAMES if (path / name).is_file()]
        if not found:
            raise InputError(f"no {' or '.join(MANIFEST_NAMES)} in {path}; see docs/evaluation.md for the layout")
        path = found[0]
    if not path.is_file():
        raise InputError(f"identity manifest not found: {path}")
    base = path.parent
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(read_text_file(path, "identity manifest"))
        except json.JSONDecodeError as error:
            raise InputError(f"{path} is not valid JSON: {error}") from None
        entries = data.get("identities") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise InputError(f'{path}: expected {{"identities": [...]}} or a list of identities')
        wheres = [f"{path} entry {n + 1}" for n in range(len(entries))]
    elif path.suffix.lower() == ".csv":
        entries, wheres = _csv_entries(path)
    else:
        raise InputError(f"{path}: an identity manifest is a .json or .csv file")
    identities = [_identity(entry, base, where) for entry, where in zip(entries, wheres)]
    if not identities:
        raise InputError(f"{path} lists no identity")
    seen: set[str] = set()
    for identity in identities:
        if identity.id in seen:
            raise InputError(f"{path}: identity id {identity.id!r} appears twice")
        seen.add(identity.id)
    return identities


def _csv_entries(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of an identity CSV (``#`` lines are comments) and where each is, "FILE line N"."""
    lines = read_text_file(path, "identity manifest").splitlines(keepends=True)
    numbers = [n for n, line in enumerate(lines, start=1) if not line.startswith("#")]
    reader = csv.DictReader(line for line in lines if not line.startswith("#"))
    entries, wheres = [], []
    try:
        for row in reader:
            # short rows give None, extra fields a None key: keep the named columns, as text
            entries.append({key: value or "" for key, value in row.items() if isinstance(key, str)})
            wheres.append(f"{path} line {numbers[reader.line_num - 1]}")
    except csv.Error as error:
        raise InputError(f"{path} line {numbers[min(reader.line_num, len(numbers)) - 1]}: {error}") from None
    return entries, wheres
