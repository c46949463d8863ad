"""Face diversity (paper §5.1, following PhotoMaker): LPIPS between face crops.

For one ⟨identity, prompt⟩ pair and one method, 5 of its results are chosen at random (the
same seeds for every method, reproducibly from the pair's key), and

    Face Div. = 100 · mean over the C(5, 2) = 10 unordered pairs (i, j) of LPIPS(face_i, face_j)

with ``face`` the 160×160 MTCNN face crop of :func:`freecure.evaluation.metrics.identity.face_crop`
and LPIPS the AlexNet v0.1 metric of :mod:`freecure.evaluation.metrics.lpips`. A chosen result
without a detected face cannot take part: it is left out of the pairs and counted.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Sequence

from PIL import Image

from ...core.images import load_image
from .identity import FACE_SIZE

#: Results compared per ⟨identity, prompt⟩ pair (paper: 5).
DIVERSITY_SAMPLES = 5


def choose_results(candidates: Sequence, k: int, key: str) -> list:
    """``k`` of ``candidates`` (all of them when there are ≤ k), chosen reproducibly from ``key``."""
    ordered = sorted(candidates)
    if len(ordered) <= k:
        return ordered
    rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))
    return sorted(rng.sample(ordered, k))


def face_diversity(crops: Sequence[Image.Image], lpips) -> tuple[float | None, int]:
    """100 · mean LPIPS over all unordered pairs of face crops, and the number of pairs.

    Returns ``(None, 0)`` for fewer than two crops.
    """
    pairs = list(itertools.combinations(range(len(crops)), 2))
    if not pairs:
        return None, 0
    first = [crops[i] for i, _ in pairs]
    second = [crops[j] for _, j in pairs]
    distances = lpips.distance(first, second, size=FACE_SIZE)
    return float(100.0 * distances.mean()), len(pairs)


def diversity_groups(rows: Sequence[dict], k: int = DIVERSITY_SAMPLES) -> list[dict]:
    """One task per ⟨run, identity, prompt⟩ and method: the chosen seeds and their face crops.

    Each task: ``key``, ``backend``, ``settings_hash``, ``identity``, ``prompt_index``,
    ``method``, ``seeds`` (chosen), ``crops`` (paths of the chosen results' face crops that
    exist) and ``missing_faces`` (chosen results without a face).
    """
    from pathlib import Path

    from ..runner import METHODS

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        group = (row["backend"], row["settings_hash"], row["identity"], row["prompt_index"], row["prompt_template"])
        groups.setdefault(group, []).append(row)
    tasks = []
    for (backend, digest, identity, prompt_index, template), members in sorted(groups.items()):
        by_seed = {row["seed"]: row for row in members}
        prompt = f"p{prompt_index:03d}-{hashlib.sha256(template.encode('utf-8')).hexdigest()[:8]}"
        chosen = choose_results(list(by_seed), k, f"{backend}|{digest}|{identity}|{prompt}")
        for method in METHODS:
            crops = [
                str(Path(by_seed[seed]["_root"]) / by_seed[seed]["faces"][method])
                for seed in chosen
                if by_seed[seed]["faces"].get(method)
            ]
            tasks.append(
                {
                    "key": f"{backend}|{digest}|{identity}|{prompt}|{method}|seeds="
                    + ",".join(str(seed) for seed in chosen),
                    "backend": backend,
                    "settings_hash": digest,
                    "identity": identity,
                    "prompt_index": prompt_index,
                    "method": method,
                    "seeds": chosen,
                    "crops": crops,
                    "missing_faces": len(chosen) - len(crops),
                }
            )
    return tasks


def compute_diversity(
    tasks: Sequence[dict], lpips, cached: dict[str, dict] | None = None, on_result=None
) -> list[dict]:
    """Face Div. of every task (reusing ``cached`` results by key).

    Returns one result per task: the task's fields without ``crops``, plus ``face_div``
    (None with fewer than two faces) and ``pairs``.
    """
    cached = cached or {}
    results = []
    for task in tasks:
        if task["key"] in cached:
            results.append(cached[task["key"]])
            continue
        crops = [load_image(path) for path in task["crops"]]  # upright RGB, clear errors
        value, pairs = face_diversity(crops, lpips) if lpips is not None else (None, 0)
        result = {k: v for k, v in task.items() if k != "crops"} | {"face_div": value, "pairs": pairs}
        if on_result is not None and lpips is not None:
            on_result(result)
        results.append(result)
    return results
