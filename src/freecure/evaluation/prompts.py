"""Evaluation prompts: the paper's Table 3 (supplementary §9) or a file of your own.

A prompt is a template with the placeholder ``<S>`` where the subject goes:
``"a <S> with blonde curly hair"``. For an identity whose class word is "woman" it becomes
"a woman with blonde curly hair" (the foundation prompt, scored by PC) and, for a backend
with a trigger word such as PhotoMaker's "img", "a woman img with blonde curly hair" (what
the backend generates from). The number of attributes of a prompt — Table 2's grouping — is
what :func:`freecure.attributes.parse_prompt` finds in it.

Prompt files (UTF-8): a CSV with a ``prompt`` column (other columns are kept as metadata;
``paper_group`` and ``n_attributes``, when filled in, are whole numbers; ``#`` lines are
comments), or a text file with one template per line.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..core.attributes import ParsedPrompt, parse_prompt
from ..core.errors import InputError

logger = logging.getLogger(__name__)

PLACEHOLDER = "<S>"
TABLE3 = "prompts_table3.csv"


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt.

    Attributes:
        index: its position in the prompt file (0-based): part of every result's key.
        template: the prompt with ``<S>`` for the subject.
        paper_group: the row group Table 3 prints it under (None for custom prompts).
        note: free text from the file.
    """

    index: int
    template: str
    paper_group: int | None = None
    note: str = ""

    def render(self, class_word: str, trigger: str | None = None) -> str:
        """The prompt for a subject: ``<S>`` → class word (and the trigger word after it)."""
        subject = class_word if not trigger else f"{class_word} {trigger}"
        return self.template.replace(PLACEHOLDER, subject)

    def parse(self, class_word: str) -> ParsedPrompt:
        """The foundation prompt's attributes (no trigger word)."""
        return parse_prompt(self.render(class_word), class_word)

    def n_attributes(self, class_word: str = "person") -> int:
        """Number of attributes the attribute parser finds (Table 2's grouping)."""
        return len(self.parse(class_word).attributes)


def _check_template(template: str, where: str) -> str:
    template = template.strip()
    if template.count(PLACEHOLDER) != 1:
        raise InputError(
            f"{where}: the prompt {template!r} must contain the subject placeholder {PLACEHOLDER} "
            "exactly once, e.g. 'a <S> with blonde curly hair'"
        )
    return template


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's content (a UTF-8 byte-order mark is allowed).

    Raises:
        InputError: the file is not UTF-8 (e.g. Latin-1): names the line and the byte.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise InputError(
            f"{what} {path} line {line}: byte 0x{data[error.start]:02x} is not UTF-8 text; save the file as "
            "UTF-8 (it looks like Latin-1 or another legacy encoding)"
        ) from None


def _whole_number(row: dict, name: str, where: str, example: str) -> int | None:
    """Column ``name`` of a CSV row as an int, None when empty."""
    value = row.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(
            f"{where}: {name} {value!r} is not a whole number; give one such as {example}, or leave it empty"
        ) from None


def read_prompts(text: str, source: str = "prompts") -> list[EvalPrompt]:
    """Parse a prompt file's content: CSV with a ``prompt`` column, or one template per line.

    Raises:
        InputError: no prompt, a template without ``<S>``, a malformed CSV or a ``paper_group`` /
            ``n_attributes`` that is not a whole number; the message names the line.
    """
    kept = [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not kept:
        raise InputError(f"{source}: no prompts found")
    numbers, lines = [number for number, _ in kept], [line for _, line in kept]
    header = next(csv.reader([lines[0]]))
    prompts: list[EvalPrompt] = []
    if "prompt" in [name.strip() for name in header]:
        reader = csv.DictReader(io.StringIO("\n".join(lines)))
        rows = iter(reader)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error as error:
                raise InputError(f"{source} line {numbers[min(reader.line_num, len(numbers)) - 1]}: {error}") from None
            where = f"{source} line {numbers[reader.line_num - 1]}"
            row = {key.strip(): (value or "").strip() for key, value in row.items() if isinstance(key, str)}
            prompts.append(
                EvalPrompt(
                    index=len(prompts),
                    template=_check_template(row["prompt"], where),
                    paper_group=_whole_number(row, "paper_group", where, "1 (the row group of Table 3)"),
                    note=row.get("note", ""),
                )
            )
            stated = _whole_number(row, "n_attributes", where, "2")
            found = prompts[-1].n_attributes()
            if stated is not None and stated != found:
                logger.warning(
                    "%s: %r states %s attributes but the attribute parser finds %d; results are grouped by %d",
                    source,
                    row["prompt"],
                    stated,
                    found,
                    found,
                )
    else:
        for number, line in kept:
            prompts.append(EvalPrompt(index=len(prompts), template=_check_template(line, f"{source} line {number}")))
    return prompts


def load_prompts(path: str | os.PathLike | None = None) -> list[EvalPrompt]:
    """The prompts of a file, or the paper's 20 prompts of Table 3 when ``path`` is None."""
    if path is None:
        text = (resources.files("freecure") / "data" / TABLE3).read_text(encoding="utf-8")
        return read_prompts(text, f"freecure/data/{TABLE3}")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file not found: {path}")
    return read_prompts(read_text_file(path, "prompt file"), str(path))
