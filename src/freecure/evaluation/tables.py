"""The paper's Table 1 and Table 2 from result rows, as Markdown, CSV and JSON.

Table 1 (per run = backend + settings, per method FD / PD / PD + FreeCure):

- PC: mean over every generated image of its PC;
- IF: mean over the images in which a face was found; the images without a face are the
  "no face" column (failures), never silently dropped;
- Face Div.: mean over ⟨identity, prompt⟩ pairs of the pair's face diversity;
- PC × IF = PC · IF / 100 of the two means (how the paper's numbers relate: 22.97 · 51.95 /
  100 = 11.93 for PhotoMaker).

Table 2: PC by the number of attributes of the prompt (1, 2, 3, … as the attribute parser
counts them). The PD + FreeCure rows carry the relative change over PD,
100 · (x − x_PD) / |x_PD| %, as in the paper.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from statistics import fmean

from ..core.atomic import json_text
from .runner import METHOD_LABELS, METHODS

TABLE1_METRICS = ("pc", "if", "face_div", "pc_x_if")
TABLE1_HEADERS = {"pc": "PC (%) ↑", "if": "IF (%) ↑", "face_div": "Face Div. (%) ↑", "pc_x_if": "PC × IF ↑"}


def _mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return fmean(values) if values else None


def relative_change(new: float | None, old: float | None) -> float | None:
    """100 · (new − old) / |old| in percent; None when either is missing or old is 0."""
    if new is None or old is None or old == 0:
        return None
    return 100.0 * (new - old) / abs(old)


def run_corrections(rows: Iterable[dict]) -> dict[tuple[str, str], str]:
    """(backend, settings hash) → the run's correction method ("rofa" for rows written before
    ``--method`` existed)."""
    return {(row["backend"], row["settings_hash"]): row.get("method", "rofa") for row in rows}


def run_labels(rows: Iterable[dict]) -> dict[tuple[str, str], str]:
    """(backend, settings hash) → a row label: the backend name; when a backend was run with
    several settings, plus the correction method ("[FASA]") if that tells the runs apart, else
    plus the hash."""
    corrections = run_corrections(rows)
    runs = sorted(corrections)
    per_backend, per_correction = defaultdict(int), defaultdict(int)
    for run in runs:
        per_backend[run[0]] += 1
        per_correction[run[0], corrections[run]] += 1

    def label(run):
        if per_backend[run[0]] == 1:
            return run[0]
        if per_correction[run[0], corrections[run]] == 1:
            return f"{run[0]} [{corrections[run].upper()}]"
        return f"{run[0]} [{run[1]}]"

    return {run: label(run) for run in runs}


def method_label(run_label: str, method: str, correction: str = "rofa") -> str:
    """ "token-fusion (FD)", "token-fusion (PD)", "token-fusion + FreeCure" (the paper's style);
    a FASA run's corrected row reads "… + FreeCure (FASA)"."""
    if method != "freecure":
        return f"{run_label} ({METHOD_LABELS[method]})"
    suffix = " (FASA)" if correction == "fasa" and "[FASA]" not in run_label else ""
    return f"{run_label} + FreeCure{suffix}"


def table1(rows: Sequence[dict], diversity: Sequence[dict] = ()) -> list[dict]:
    """Table 1 rows: one per run and method, with counts and the change over PD."""
    labels, corrections = run_labels(rows), run_corrections(rows)
    out = []
    for run, label in labels.items():
        items = [row for row in rows if (row["backend"], row["settings_hash"]) == run]
        groups = [d for d in diversity if (d["backend"], d["settings_hash"]) == run]
        summary = {}
        for method in METHODS:
            metrics = [row["metrics"][method] for row in items]
            div = [d for d in groups if d["method"] == method]
            pc = _mean(m["pc"] for m in metrics)
            fidelity = _mean(m["if"] for m in metrics)
            entry = {
                "run": label,
                "backend": run[0],
                "settings_hash": run[1],
                "method": method,
                "correction": corrections[run],
                "label": method_label(label, method, corrections[run]),
                "pc": pc,
                "if": fidelity,
                "face_div": _mean(d["face_div"] for d in div),
                "pc_x_if": None if pc is None or fidelity is None else pc * fidelity / 100.0,
                "n_images": len(metrics),
                "if_no_face": sum(not m["face_found"] for m in metrics),
                "face_div_groups": len([d for d in div if d["face_div"] is not None]),
                "face_div_groups_total": len(div),
                "face_div_missing_faces": sum(d["missing_faces"] for d in div),
                "change": {},
            }
            summary[method] = entry
            out.append(entry)
        summary["freecure"]["change"] = {
            metric: relative_change(summary["freecure"][metric], summary["pd"][metric]) for metric in TABLE1_METRICS
        }
    return out


def attribute_counts(rows: Iterable[dict]) -> list[int]:
    return sorted({row["n_attributes"] for row in rows})


def table2(rows: Sequence[dict]) -> list[dict]:
    """Table 2 rows: PC by number of attributes, one per run and method."""
    labels, corrections = run_labels(rows), run_corrections(rows)
    counts = attribute_counts(rows)
    out = []
    for run, label in labels.items():
        items = [row for row in rows if (row["backend"], row["settings_hash"]) == run]
        summary = {}
        for method in METHODS:
            by_count = {n: [row["metrics"][method]["pc"] for row in items if row["n_attributes"] == n] for n in counts}
            entry = {
                "run": label,
                "backend": run[0],
                "settings_hash": run[1],
                "method": method,
                "correction": corrections[run],
                "label": method_label(label, method, corrections[run]),
                "pc": {str(n): _mean(values) for n, values in by_count.items()},
                "n_images": {str(n): len(values) for n, values in by_count.items()},
                "change": {},
            }
            summary[method] = entry
            out.append(entry)
        summary["freecure"]["change"] = {
            n: relative_change(summary["freecure"]["pc"][n], summary["pd"]["pc"][n]) for n in summary["pd"]["pc"]
        }
    return out


# --------------------------------------------------------------------------- formats


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _with_change(value: float | None, change: float | None) -> str:
    text = _number(value)
    return text if change is None else f"{text} ({change:+.2f}%)"


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def table1_cells(table: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["Method", *(TABLE1_HEADERS[m] for m in TABLE1_METRICS), "No face (IF failures)"]
    body = []
    for entry in table:
        cells = [entry["label"]]
        cells += [_with_change(entry[m], entry["change"].get(m)) for m in TABLE1_METRICS]
        cells.append(f"{entry['if_no_face']}/{entry['n_images']}")
        body.append(cells)
    return header, body


def table2_cells(table: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    counts = list(table[0]["pc"]) if table else []
    header = ["Method", *(f"PC ({n} Attr.) ↑" for n in counts)]
    body = [[e["label"], *(_with_change(e["pc"][n], e["change"].get(n)) for n in counts)] for e in table]
    return header, body


def table1_markdown(table: Sequence[dict]) -> str:
    return _markdown(*table1_cells(table))


def table2_markdown(table: Sequence[dict]) -> str:
    return _markdown(*table2_cells(table))


def _csv(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if value is None else value for value in row] for row in rows)
    return buffer.getvalue()


def table1_csv(table: Sequence[dict]) -> str:
    header = ["run", "backend", "settings_hash", "method", "label"]
    for metric in TABLE1_METRICS:
        header += [metric, f"{metric}_change_pct"]
    header += ["n_images", "if_no_face", "face_div_groups", "face_div_groups_total", "face_div_missing_faces"]
    rows = []
    for e in table:
        row = [e["run"], e["backend"], e["settings_hash"], e["method"], e["label"]]
        for metric in TABLE1_METRICS:
            row += [e[metric], e["change"].get(metric)]
        row += [
            e["n_images"],
            e["if_no_face"],
            e["face_div_groups"],
            e["face_div_groups_total"],
            e["face_div_missing_faces"],
        ]
        rows.append(row)
    return _csv(header, rows)


def table2_csv(table: Sequence[dict]) -> str:
    counts = list(table[0]["pc"]) if table else []
    header = ["run", "backend", "settings_hash", "method", "label"]
    for n in counts:
        header += [f"pc_{n}_attr", f"pc_{n}_attr_change_pct", f"n_images_{n}_attr"]
    rows = []
    for e in table:
        row = [e["run"], e["backend"], e["settings_hash"], e["method"], e["label"]]
        for n in counts:
            row += [e["pc"][n], e["change"].get(n), e["n_images"][n]]
        rows.append(row)
    return _csv(header, rows)


def tables_json(t1: Sequence[dict], t2: Sequence[dict], extra: dict | None = None) -> str:
    return json_text({"table1": list(t1), "table2": list(t2), **(extra or {})}, indent=2, sort_keys=False)
