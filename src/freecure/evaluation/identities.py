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
separated by ``;``). ``id`` names the identity in results and folders (letters, digits,
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

from ..errors import InputError

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


def _identity(entry: dict, base: Path, where: str) -> Identity:
    identity_id = str(entry.get("id", "")).strip()
    if not _ID_PATTERN.fullmatch(identity_id):
        raise InputError(f"{where}: id {identity_id!r} must be letters, digits, '-', '_' or '.'")
    class_word = str(entry.get("class_word", "")).strip()
    if not class_word:
        raise InputError(f"{where}: identity {identity_id!r} needs a class_word such as 'woman' or 'man'")
    references = entry.get("references") or []
    if isinstance(references, str):
        references = [part for part in references.split(";") if part.strip()]
    if not references:
        raise InputError(f"{where}: identity {identity_id!r} lists no reference photo")
    paths = []
    for reference in references:
        path = Path(str(reference).strip()).expanduser()
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
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise InputError(f"{path} is not valid JSON: {error}") from None
        entries = data.get("identities") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise InputError(f'{path}: expected {{"identities": [...]}} or a list of identities')
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as file:
            entries = list(csv.DictReader(line for line in file if not line.startswith("#")))
    else:
        raise InputError(f"{path}: an identity manifest is a .json or .csv file")
    identities = [_identity(entry, base, f"{path} entry {n + 1}") for n, entry in enumerate(entries)]
    if not identities:
        raise InputError(f"{path} lists no identity")
    seen: set[str] = set()
    for identity in identities:
        if identity.id in seen:
            raise InputError(f"{path}: identity id {identity.id!r} appears twice")
        seen.add(identity.id)
    return identities
