"""`freecure report`: merge result shards, compute face diversity, write tables and an HTML page.

Outputs (in the report folder):

- ``table1.md|csv|json`` and ``table2.md|csv|json`` (see :mod:`freecure.evaluation.tables`);
- ``results.jsonl``: the merged result set, one row per work item;
- ``diversity.jsonl``: the face-diversity result of each ⟨run, identity, prompt, method⟩,
  also a cache: a second report reuses it and runs LPIPS only for new groups;
- ``index.html``: a static page (inline CSS, inline SVG charts, no script, no network) with
  both tables, bar charts of the metrics and, for every prompt, a grid of
  FD | PD | mask overlay | FreeCure images, linked by relative paths to the result folders.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .. import __version__
from ..core.atomic import json_text, write_files
from ..core.errors import InputError
from .metrics.diversity import compute_diversity, diversity_groups
from .runner import METHOD_LABELS, METHODS
from .store import ReadReport, ResultStore, merge_rows, read_jsonl, read_results, well_formed
from .tables import (
    TABLE1_HEADERS,
    TABLE1_METRICS,
    table1,
    table1_cells,
    table1_csv,
    table1_markdown,
    table2,
    table2_cells,
    table2_csv,
    table2_markdown,
)

logger = logging.getLogger(__name__)

COLORS = {"fd": "#8c8c8c", "pd": "#4c78a8", "freecure": "#e45756"}
DIVERSITY_FILE = "diversity.jsonl"


@dataclass
class Report:
    """What :func:`write_report` produced."""

    out_dir: Path
    rows: list[dict]
    table1: list[dict]
    table2: list[dict]
    diversity: list[dict]
    read: ReadReport
    files: list[Path] = field(default_factory=list)


def read_settings(directories: Sequence[Path]) -> dict[str, dict]:
    """``settings/{hash}.json`` of every result folder, by hash."""
    settings = {}
    for directory in directories:
        for path in sorted((Path(directory) / "settings").glob("*.json")):
            try:
                values = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                values = None
            if isinstance(values, dict):
                settings[path.stem] = values
            else:
                logger.warning("%s is not a JSON object; its settings are not shown", path)
    return settings


def _cached_result_ok(row: dict) -> bool:
    """A diversity cache row that the tables can use (others are recomputed)."""
    value = row.get("face_div")
    number = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    return number and all(isinstance(row.get(name), str) for name in ("key", "backend", "settings_hash", "method"))


def write_report(
    result_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    lpips=None,
    grid_rows: int = 4,
    progress: bool = False,
) -> Report:
    """Merge the shards of ``result_dirs`` and write every report file to ``out_dir``.

    Args:
        result_dirs: output folders of ``freecure eval`` (one per node when nodes do not share
            a file system).
        out_dir: the report folder.
        lpips: an :class:`~freecure.evaluation.metrics.LPIPS` model for face diversity; None
            leaves Face Div. uncomputed (n/a) except for groups already in ``diversity.jsonl``.
        grid_rows: results shown per prompt in the HTML grid (0 = all).
    """
    result_dirs = [Path(d) for d in result_dirs]
    for directory in result_dirs:
        if not directory.is_dir():
            raise InputError(f"results folder not found: {directory}")
    read = ReadReport()
    rows = well_formed(read_results(result_dirs, read), read)
    rows = sorted(merge_rows(rows, read).values(), key=lambda row: row["key"])
    if not rows:
        raise InputError(
            f"no results in {', '.join(map(str, result_dirs))} (looked for results.rank*.jsonl); "
            "run `freecure eval` first"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    cache_path = out_dir / DIVERSITY_FILE
    cached = {}
    if cache_path.is_file():
        cached = {row["key"]: row for row in read_jsonl(cache_path) if _cached_result_ok(row)}
    store = ResultStore(cache_path)
    tasks = diversity_groups(rows)
    if progress and lpips is not None:
        from tqdm.auto import tqdm

        tasks_iter = tqdm(tasks, desc="face diversity", unit="group")
    else:
        tasks_iter = tasks
    diversity = compute_diversity(list(tasks_iter), lpips, cached, on_result=store.append)

    t1, t2 = table1(rows, diversity), table2(rows)
    settings = read_settings(result_dirs)
    report = Report(out_dir, rows, t1, t2, diversity, read)
    files = {
        "table1.md": table1_markdown(t1),
        "table1.csv": table1_csv(t1),
        "table1.json": json_text(t1),
        "table2.md": table2_markdown(t2),
        "table2.csv": table2_csv(t2),
        "table2.json": json_text(t2),
        "results.jsonl": "".join(
            json_text(
                {k: v for k, v in row.items() if k != "_root"} | {"results_dir": row["_root"]},
                indent=None,
                sort_keys=True,
            )
            for row in rows
        ),
        "index.html": render_html(report, settings, grid_rows),
    }
    # all tables new or all old: every file is written before any replaces its old version
    report.files.extend(write_files(out_dir, files))
    report.files.append(cache_path)
    return report


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1280px;color:#222;
padding:0 16px}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}h3{margin-bottom:.3em}
table.metrics{border-collapse:collapse;margin:8px 0}table.metrics td,table.metrics th{border:1px solid #ccc;
padding:4px 8px;text-align:right}table.metrics td:first-child,table.metrics th:first-child{text-align:left}
table.metrics tr.freecure{background:#fff3f0}.warn{background:#fff4d6;border:1px solid #e0c060;padding:8px 12px}
.charts{display:flex;flex-wrap:wrap;gap:16px}.grid{border-collapse:collapse}.grid td,.grid th{padding:4px;
text-align:center;vertical-align:top;font-size:12px}.grid img{width:160px;height:160px;object-fit:contain;
background:#eee;image-rendering:auto}.muted{color:#777}.small{font-size:12px}code{background:#f4f4f4;padding:0 3px}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def bar_chart(title: str, groups: Sequence[str], values: dict[tuple[str, str], float | None], width: int = 400) -> str:
    """An inline SVG grouped bar chart: one group per label, one bar per method (FD, PD, FreeCure)."""
    height, top, bottom, left = 220, 28, 46, 44
    numbers = [v for v in values.values() if v is not None]
    high = max([0.0, *numbers]) or 1.0
    low = min([0.0, *numbers])
    span = (high - low) or 1.0
    plot_h = height - top - bottom
    group_w = (width - left - 10) / max(1, len(groups))
    bar_w = min(28.0, group_w / (len(METHODS) + 1))

    def y(value: float) -> float:
        return top + (high - value) / span * plot_h

    parts = [
        f'<svg width="{width}" height="{height}" role="img" aria-label="{_e(title)}">',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{_e(title)}</text>',
        f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - 6}" y2="{y(0):.1f}" stroke="#444"/>',
        f'<text x="{left - 4}" y="{y(high) + 4:.1f}" text-anchor="end" font-size="10">{high:.1f}</text>',
        f'<text x="{left - 4}" y="{y(0) + 4:.1f}" text-anchor="end" font-size="10">0</text>',
    ]
    if low < 0:
        parts.append(f'<text x="{left - 4}" y="{y(low) + 4:.1f}" text-anchor="end" font-size="10">{low:.1f}</text>')
    for g, group in enumerate(groups):
        x0 = left + g * group_w + (group_w - bar_w * len(METHODS)) / 2
        for m, method in enumerate(METHODS):
            value = values.get((group, method))
            x = x0 + m * bar_w
            if value is None:
                parts.append(
                    f'<text x="{x + bar_w / 2:.1f}" y="{y(0) - 3:.1f}" text-anchor="middle" font-size="9" '
                    f'fill="#999">n/a</text>'
                )
                continue
            y_top, y_bottom = sorted((y(value), y(0)))
            parts.append(
                f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{bar_w - 2:.1f}" height="{max(y_bottom - y_top, 0.5):.1f}" '
                f'fill="{COLORS[method]}"><title>{_e(group)} {METHOD_LABELS[method]}: {value:.2f}</title></rect>'
            )
            parts.append(
                f'<text x="{x + bar_w / 2 - 1:.1f}" y="{y_top - 3:.1f}" text-anchor="middle" '
                f'font-size="9">{value:.1f}</text>'
            )
        parts.append(
            f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{height - bottom + 16}" text-anchor="middle" '
            f'font-size="11">{_e(group)[:40]}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _html_table(header: list[str], body: list[list[str]], methods: list[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    rows = "".join(
        f'<tr class="{method}">' + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"
        for cells, method in zip(body, methods)
    )
    return f'<table class="metrics"><tr>{head}</tr>{rows}</table>'


def _src(report: Report, row: dict, relative: str | None) -> str | None:
    if not relative:
        return None
    target = Path(row["_root"]) / relative
    return quote(Path(os.path.relpath(target, report.out_dir)).as_posix())


def _cell(src: str | None, caption: str) -> str:
    image = f'<img src="{_e(src)}" alt="{_e(caption)}" loading="lazy">' if src else '<div class="muted">no mask</div>'
    return f"<td>{image}<br>{_e(caption)}</td>"


def _metric_caption(metrics: dict) -> str:
    fidelity = "no face" if metrics["if"] is None else f"IF {metrics['if']:.1f}"
    return f"PC {metrics['pc']:.1f} · {fidelity}"


def render_html(report: Report, settings: dict[str, dict], grid_rows: int = 4) -> str:
    rows, t1, t2 = report.rows, report.table1, report.table2
    runs = list(dict.fromkeys(e["run"] for e in t1))
    tiny = [digest for digest, s in settings.items() if s.get("tiny")]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>FreeCure evaluation report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>FreeCure evaluation report</h1>",
        f"<p class='small muted'>freecure {_e(__version__)} · written {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} · "
        f"{len(rows)} work items · {len({r['identity'] for r in rows})} identities · "
        f"{len({r['prompt_index'] for r in rows})} prompts · {len({r['seed'] for r in rows})} seeds</p>",
    ]
    if tiny:
        parts.append(
            "<p class='warn'>Some results come from <b>--tiny</b> runs: random-weight models whose images "
            "are noise and whose numbers mean nothing. They show the machinery only.</p>"
        )
    if report.read.skipped_lines or report.read.duplicates:
        parts.append(
            f"<p class='warn'>Reading the shards skipped {len(report.read.skipped_lines)} torn or malformed "
            f"line(s) and {report.read.duplicates} duplicate row(s); see the log.</p>"
        )

    parts.append("<h2>Table 1 — overall metrics</h2>")
    header, body = table1_cells(t1)
    parts.append(_html_table(header, body, [e["method"] for e in t1]))
    parts.append(
        "<p class='small'>PC: CLIP-T × 100 over all images. IF: face-embedding cosine × 100 over the "
        "images with a detected face; images without one are counted under “No face”. Face Div.: LPIPS × 100 "
        "between face crops of 5 results per ⟨identity, prompt⟩, averaged. PC × IF = PC · IF / 100. "
        "Changes are relative to PD.</p>"
    )
    parts.append(
        "<div class='legend small'>"
        + "".join(f"<span style='background:{COLORS[m]}'></span>{METHOD_LABELS[m]}" for m in METHODS)
        + "</div>"
    )
    parts.append("<div class='charts'>")
    for metric in TABLE1_METRICS:
        values = {(e["run"], e["method"]): e[metric] for e in t1}
        parts.append(bar_chart(TABLE1_HEADERS[metric].rstrip(" ↑"), runs, values))
    parts.append("</div>")

    parts.append("<h2>Table 2 — PC by number of attributes</h2>")
    header, body = table2_cells(t2)
    parts.append(_html_table(header, body, [e["method"] for e in t2]))
    parts.append("<div class='charts'>")
    for run in runs:
        entries = [e for e in t2 if e["run"] == run]
        counts = list(entries[0]["pc"]) if entries else []
        values = {(f"{n} attr.", e["method"]): e["pc"][n] for e in entries for n in counts}
        parts.append(bar_chart(f"PC by attributes — {run}", [f"{n} attr." for n in counts], values))
    parts.append("</div>")

    if settings:
        parts.append("<h2>Settings</h2>")
        for digest, values in sorted(settings.items()):
            parts.append(
                f"<h3><code>{_e(digest)}</code></h3><pre class='small'>{_e(json.dumps(values, indent=2))}</pre>"
            )

    parts.append("<h2>Images per prompt</h2>")
    limit = f"the first {grid_rows}" if grid_rows else "all"
    parts.append(
        f"<p class='small muted'>For each prompt, {limit} results in order of identity and seed. "
        "Captions: PC and IF of each image; “no face” marks an IF failure.</p>"
    )
    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_index"], []).append(row)
    for index in sorted(by_prompt):
        members = sorted(by_prompt[index], key=lambda r: (r["identity"], r["seed"], r["backend"], r["settings_hash"]))
        first = members[0]
        parts.append(
            f"<h3 id='prompt-{index}'>Prompt {index + 1}: {_e(first['prompt_template'])} "
            f"<span class='small muted'>({_e(first['n_attributes'])} attribute(s): "
            f"{_e(', '.join(first['attributes']))})</span></h3>"
        )
        parts.append(
            "<table class='grid'><tr><th></th><th>FD</th><th>PD</th><th>mask overlay</th><th>PD + FreeCure</th></tr>"
        )
        for row in members[: grid_rows or None]:
            metrics = row["metrics"]
            label = (
                f"{_e(row['identity'])}<br>seed {_e(row['seed'])}<br><span class='muted'>{_e(row['backend'])}</span>"
            )
            parts.append(f"<tr><th class='small'>{label}</th>")
            parts.append(_cell(_src(report, row, row["images"]["fd"]), _metric_caption(metrics["fd"])))
            parts.append(_cell(_src(report, row, row["images"]["pd"]), _metric_caption(metrics["pd"])))
            coverage = row.get("mask_coverage")
            parts.append(
                _cell(
                    _src(report, row, row["images"].get("mask_overlay")),
                    "" if coverage is None else f"mask {100 * coverage:.0f}%",
                )
            )
            parts.append(_cell(_src(report, row, row["images"]["freecure"]), _metric_caption(metrics["freecure"])))
            parts.append("</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
