"""Append-only JSONL result files, one per process, safe against being killed.

Every row is one complete JSON line written with a single ``os.write`` on a descriptor opened
with ``O_APPEND`` and then ``fsync``-ed: a process killed at any moment leaves either the
whole row or, at worst, a torn last line without its newline. Readers skip a torn or
malformed line with a warning; the owner of a shard cuts a torn tail off before appending
again, so a new row never glues onto a broken one.

Shards are named ``results.rank{i}.jsonl``; :func:`read_results` reads all shards of a folder
and :func:`merge_rows` keeps one row per key.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import shorten

logger = logging.getLogger(__name__)

SHARD_GLOB = "results.rank*.jsonl"


def shard_path(directory: str | os.PathLike, rank: int) -> Path:
    return Path(directory) / f"results.rank{rank}.jsonl"


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    """Every result shard of a folder, in rank order."""

    def rank(path: Path) -> int:
        digits = path.name[len("results.rank") : -len(".jsonl")]
        return int(digits) if digits.isdigit() else 1 << 30

    return sorted(Path(directory).glob(SHARD_GLOB), key=lambda path: (rank(path), path.name))


def repair_torn_tail(path: Path) -> bool:
    """Cut a last line that lacks its newline (a write killed half-way). Returns whether it did."""
    if not path.is_file():
        return False
    with path.open("rb+") as file:
        file.seek(0, os.SEEK_END)
        size = file.tell()
        if size == 0:
            return False
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return False
        file.seek(0)
        data = file.read()
        keep = data.rfind(b"\n") + 1
        file.truncate(keep)
        file.flush()
        os.fsync(file.fileno())
    logger.warning("%s: removed a torn last line (%d bytes) left by an interrupted write", path, size - keep)
    return True


class ResultStore:
    """The append-only result shard of one process.

    Args:
        path: the shard file (created on the first append).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)

    def append(self, row: dict) -> None:
        """Write ``row`` as one JSON line: one ``os.write`` with O_APPEND, then fsync."""
        self.append_many([row])

    def append_many(self, rows: list[dict]) -> None:
        """Write ``rows`` as JSON lines with one ``os.write`` with O_APPEND, then fsync."""
        data = "".join(
            json.dumps(row, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n" for row in rows
        ).encode("utf-8")
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(descriptor, data)
            if written != len(data):  # pragma: no cover - regular files write whole buffers
                raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@dataclass
class ReadReport:
    """What reading result files found besides good rows."""

    files: list[Path] = field(default_factory=list)
    skipped_lines: list[str] = field(default_factory=list)
    duplicates: int = 0


def read_jsonl(path: Path, report: ReadReport | None = None) -> list[dict]:
    """The rows of one JSONL file; torn or malformed lines are skipped with a warning."""
    rows = []
    data = path.read_bytes()
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        torn = number == len(lines)  # the last piece has no newline after it
        try:
            row = json.loads(line)
            if torn or not isinstance(row, dict) or "key" not in row:
                raise ValueError("incomplete row")
        except ValueError:
            what = "torn last line" if torn else "malformed line"
            logger.warning("%s:%d: skipping a %s", path, number, what)
            if report is not None:
                report.skipped_lines.append(f"{path}:{number} ({what})")
            continue
        rows.append(row)
    return rows


#: The methods every result row scores (``freecure.evaluation.runner.METHODS``).
ROW_METHODS = ("fd", "pd", "freecure")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_relative_path(value) -> bool:
    return value is None or (
        isinstance(value, str) and bool(value) and not value.startswith(("/", "\\")) and ".." not in value.split("/")
    )


def row_problem(row: dict) -> str | None:
    """What is wrong with a result row's types or shape, or None for a good row.

    Checked: the fields the tables, the diversity metric and the HTML report read — strings
    where strings belong, whole numbers for indices and seeds, finite numbers for metrics,
    one ``metrics``/``images``/``faces`` entry per method, and image paths that stay inside
    the results folder.
    """
    for name in ("key", "backend", "settings_hash", "identity", "prompt_template"):
        if not isinstance(row.get(name), str):
            return f"{name} is not a string"
    for name in ("prompt_index", "seed", "n_attributes"):
        if not _is_int(row.get(name)) or row[name] < 0:
            return f"{name} is not a non-negative whole number"
    attributes = row.get("attributes", [])
    if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
        return "attributes is not a list of strings"
    coverage = row.get("mask_coverage")
    if coverage is not None and not _is_number(coverage):
        return "mask_coverage is not a number"
    for block in ("metrics", "images", "faces"):
        if not isinstance(row.get(block), dict):
            return f"{block} is not an object"
    for method in ROW_METHODS:
        metrics = row["metrics"].get(method)
        if not isinstance(metrics, dict):
            return f"metrics.{method} is missing"
        if not _is_number(metrics.get("pc")):
            return f"metrics.{method}.pc is not a finite number"
        if metrics.get("if") is not None and not _is_number(metrics["if"]):
            return f"metrics.{method}.if is not a finite number or null"
        if not isinstance(metrics.get("face_found"), bool):
            return f"metrics.{method}.face_found is not true/false"
        if not _is_relative_path(row["images"].get(method)) or not _is_relative_path(row["faces"].get(method)):
            return f"images.{method} or faces.{method} is not a relative path inside the results folder"
    if not _is_relative_path(row["images"].get("mask_overlay")):
        return "images.mask_overlay is not a relative path inside the results folder"
    return None


def read_results(directories: Iterable[str | os.PathLike], report: ReadReport | None = None) -> list[dict]:
    """Every row of every shard in ``directories``; each row gets ``_root`` = its folder."""
    rows = []
    for directory in directories:
        for path in shard_paths(directory):
            if report is not None:
                report.files.append(path)
            for row in read_jsonl(path, report):
                row["_root"] = str(Path(directory))
                rows.append(row)
    return rows


def well_formed(rows: Iterable[dict], report: ReadReport | None = None) -> list[dict]:
    """The rows without a :func:`row_problem`; the others are skipped with a warning and
    listed in ``report.skipped_lines`` (what `freecure report` reads)."""
    good = []
    for row in rows:
        problem = row_problem(row)
        if problem is None:
            good.append(row)
            continue
        where = f"{row.get('_root', '?')}: row {shorten(str(row.get('key')), 60)}"
        logger.warning("%s: skipping a malformed row: %s", where, problem)
        if report is not None:
            report.skipped_lines.append(f"{where} ({problem})")
    return good


def merge_rows(rows: Iterable[dict], report: ReadReport | None = None) -> dict[str, dict]:
    """One row per key (the last one read wins); duplicates are counted in ``report``."""
    merged: dict[str, dict] = {}
    for row in rows:
        if row["key"] in merged and report is not None:
            report.duplicates += 1
        merged[row["key"]] = row
    return merged
