"""The paper's evaluation (§5.1, supplementary §8.2 and §9), run by ``freecure eval`` and ``freecure report``.

- :mod:`.prompts`     — Table 3's prompts (or your own), ``<S>`` → class word, attribute counts
- :mod:`.identities`  — the identity manifest: id, class word, reference photo(s)
- :mod:`.metrics`     — PC (CLIP-T), IF (MTCNN + FaceNet or dlib), face diversity (LPIPS)
- :mod:`.runner`      — work items, sharding over processes, one FreeCure run → FD, PD, FreeCure rows
- :mod:`.store`       — append-only, kill-safe JSONL result shards
- :mod:`.tables`      — Table 1 and Table 2 as Markdown, CSV and JSON
- :mod:`.report`      — merging shards, face diversity, the static HTML report

See docs/evaluation.md for the protocol, the metric definitions and how they differ from the paper.
"""

from .identities import Identity, load_identities
from .prompts import EvalPrompt, load_prompts
from .report import write_report
from .runner import METHODS, Evaluator, WorkItem, plan_items, run_shard, shard
from .store import ResultStore, merge_rows, read_results

__all__ = [
    "METHODS",
    "EvalPrompt",
    "Evaluator",
    "Identity",
    "ResultStore",
    "WorkItem",
    "load_identities",
    "load_prompts",
    "merge_rows",
    "plan_items",
    "read_results",
    "run_shard",
    "shard",
    "write_report",
]
