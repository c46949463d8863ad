"""The evaluation loop: work items, their shards, and scoring FD, PD and FreeCure of each.

One *work item* is ⟨identity, prompt, seed, backend, settings⟩. One FreeCure run per item
produces all three methods from the same seed (paper §5.1's protocol, no extra generation
for the baselines): FD (the foundation model alone), PD (the personalization backend
alone) and PD + FreeCure. Each method's image is scored with PC and IF, its face crop is
kept for the diversity metric, and the item becomes one row of the process's result shard
(:mod:`freecure.evaluation.store`).

Resuming: an item whose key is in any shard of the output folder is skipped, so running
the same command again finishes what a killed run left and never writes a row twice.

Batches of seeds (``batch_size`` > 1): consecutive items of one ⟨identity, prompt⟩ run as
one FreeCure call whose images share every model call. Their rows are written with one
``os.write`` and each names the whole batch (``batch_keys``); an item counts as done only
when every row of its batch is stored, so a batch lands whole or is re-run.

Sharding: items are listed in a stable order (identity, prompt, seed) and process ``r`` of
``n`` takes items ``r, r + n, r + 2n, …``. The assignment depends only on the item list, so
every process agrees on it without talking to the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import __version__
from ..core.atomic import remove_stale, write_file
from ..core.errors import InputError
from ..core.images import load_reference
from ..stages.masks import render_mask_overlay
from .identities import Identity
from .prompts import EvalPrompt
from .store import ResultStore, merge_rows, read_results, shard_path

logger = logging.getLogger(__name__)

#: The three methods of every item, in table order.
METHODS = ("fd", "pd", "freecure")
METHOD_LABELS = {"fd": "FD", "pd": "PD", "freecure": "PD + FreeCure"}


def settings_hash(settings: dict) -> str:
    """A short stable hash of the settings that change an image or a metric."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


@dataclass(frozen=True)
class WorkItem:
    """One ⟨identity, prompt, seed⟩ of one backend under one set of settings."""

    identity: Identity
    prompt: EvalPrompt
    seed: int
    backend: str
    settings_hash: str

    @property
    def key(self) -> str:
        """The item's identity in result files: backend, settings, identity, prompt, seed."""
        digest = hashlib.sha256(self.prompt.template.encode("utf-8")).hexdigest()[:8]
        return f"{self.backend}|{self.settings_hash}|{self.identity.id}|p{self.prompt.index:03d}-{digest}|s{self.seed}"

    @property
    def folder(self) -> str:
        """Where its images go, relative to the output folder."""
        return f"images/{self.backend}-{self.settings_hash}/{self.identity.id}/p{self.prompt.index:03d}/s{self.seed}"


def plan_items(
    identities: Sequence[Identity],
    prompts: Sequence[EvalPrompt],
    seeds: Sequence[int],
    backend: str,
    settings_digest: str,
) -> list[WorkItem]:
    """Every work item, in the stable order identity → prompt → seed."""
    return [
        WorkItem(identity, prompt, seed, backend, settings_digest)
        for identity in identities
        for prompt in prompts
        for seed in seeds
    ]


def shard(items: Sequence[WorkItem], rank: int, world_size: int) -> list[WorkItem]:
    """Process ``rank``'s items: round-robin over the stable order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(items[rank::world_size])


def done_keys(directory: str | os.PathLike) -> set[str]:
    """Keys of every item already in any shard of ``directory`` whose whole batch is stored."""
    rows = merge_rows(read_results([directory]))
    return {key for key, row in rows.items() if all(other in rows for other in row.get("batch_keys", ()))}


def batches(items: Sequence[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """Consecutive items of one ⟨identity, prompt⟩ (seeds), at most ``batch_size`` per batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: list[list[WorkItem]] = []
    for item in items:
        last = groups[-1] if groups else None
        if (
            last is not None
            and len(last) < batch_size
            and (last[0].identity.id, last[0].prompt.index) == (item.identity.id, item.prompt.index)
        ):
            last.append(item)
        else:
            groups.append([item])
    return groups


def _save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (temporary file, then rename): a reader never sees half a file."""
    write_file(path, lambda temporary: image.save(temporary, format="PNG"))


class Evaluator:
    """Runs FreeCure on work items and scores their FD, PD and FreeCure images.

    Args:
        freecure: the :class:`freecure.pipeline.FreeCurePipeline` (backend + face parser).
        prompt_consistency: PC scorer (:class:`~freecure.evaluation.metrics.PromptConsistency`).
        identity_fidelity: IF scorer (:class:`~freecure.evaluation.metrics.IdentityFidelity`).
        out_dir: the output folder; images go under ``images/``.
        call_kwargs: diffusion settings passed to every FreeCure call
            (``num_inference_steps``, ``guidance_scale``, ``negative_prompt``, ``height``,
            ``width``, ``inject_step``).
        trigger: the backend's trigger word after the class word (PhotoMaker: "img"), if any.
    """

    def __init__(
        self, freecure, prompt_consistency, identity_fidelity, out_dir, call_kwargs: dict, trigger: str | None = None
    ):
        self.freecure = freecure
        self.prompt_consistency = prompt_consistency
        self.identity_fidelity = identity_fidelity
        self.out_dir = Path(out_dir)
        self.call_kwargs = dict(call_kwargs)
        self.trigger = trigger
        self._references: dict[str, tuple[list[Image.Image], list[torch.Tensor]]] = {}

    def references(self, identity: Identity) -> tuple[list[Image.Image], list[torch.Tensor]]:
        """The identity's reference photos and their face embeddings (computed once).

        Raises:
            InputError: a reference photo shows no face.
        """
        if identity.id not in self._references:
            images = [load_reference(path) for path in identity.references]
            try:
                embeddings = self.identity_fidelity.reference(images)
            except InputError as error:
                raise InputError(f"identity {identity.id!r}: {error}") from None
            self._references[identity.id] = (images, embeddings)
        return self._references[identity.id]

    def run(self, item: WorkItem) -> dict:
        """Generate, save and score one item; returns its result row."""
        return self.run_batch([item])[0]

    def run_batch(self, items: Sequence[WorkItem]) -> list[dict]:
        """Generate the seeds of one ⟨identity, prompt⟩ in one FreeCure call (every model call
        shared), then save and score each; returns their rows, in order."""
        start = time.perf_counter()
        first = items[0]
        if any((i.identity.id, i.prompt.index) != (first.identity.id, first.prompt.index) for i in items):
            raise ValueError("a batch holds the seeds of one identity and one prompt")
        images, _ = self.references(first.identity)
        class_word = first.identity.class_word
        prompt = first.prompt.render(class_word, self.trigger)
        generators = [torch.Generator().manual_seed(item.seed) for item in items]
        outputs = self.freecure(
            prompt,
            reference_images=images,
            class_word=class_word,
            trigger_word=self.trigger,
            generator=generators if len(items) > 1 else generators[0],
            num_images_per_prompt=len(items),
            **self.call_kwargs,
        )
        outputs = outputs if isinstance(outputs, list) else [outputs]
        seconds = (time.perf_counter() - start) / len(items)
        rows = [self._score(item, output, prompt, class_word, seconds) for item, output in zip(items, outputs)]
        if len(items) > 1:
            for row in rows:
                row["batch_keys"] = [item.key for item in items]
        return rows

    def _score(self, item: WorkItem, output, prompt: str, class_word: str, generation_seconds: float) -> dict:
        """Save and score one image's FD, PD and FreeCure; its result row."""
        start = time.perf_counter() - generation_seconds
        _, reference = self.references(item.identity)
        generated = {method: output.images[method] for method in METHODS}
        foundation_prompt = output.parsed.foundation_prompt
        pc = self.prompt_consistency([generated[m] for m in METHODS], foundation_prompt)

        folder = self.out_dir / item.folder
        # this process owns the item (shard lock): temporaries left there by a killed run are stale
        remove_stale(folder, any_process=True)
        paths: dict[str, str | None] = {}
        faces: dict[str, str | None] = {}
        metrics: dict[str, dict] = {}
        for index, method in enumerate(METHODS):
            _save_png(generated[method], folder / f"{method}.png")
            paths[method] = f"{item.folder}/{method}.png"
            face = self.identity_fidelity.face(generated[method])
            if face is not None:
                _save_png(face.crop, folder / f"face_{method}.png")
                faces[method] = f"{item.folder}/face_{method}.png"
            else:
                faces[method] = None
            metrics[method] = {
                "pc": float(pc[index]),
                "if": None if face is None else self.identity_fidelity.similarity(face.embedding, reference),
                "face_found": face is not None,
            }
        paths["mask_overlay"] = None
        if output.mask is not None:
            _save_png(render_mask_overlay(generated["pd"], output.mask), folder / "mask_overlay.png")
            paths["mask_overlay"] = f"{item.folder}/mask_overlay.png"

        return {
            "key": item.key,
            "backend": item.backend,
            "settings_hash": item.settings_hash,
            "identity": item.identity.id,
            "class_word": class_word,
            "prompt_index": item.prompt.index,
            "prompt_template": item.prompt.template,
            "prompt": foundation_prompt,
            "generation_prompt": prompt,
            "n_attributes": len(output.parsed.attributes),
            "attributes": [attribute.text for attribute in output.parsed.attributes],
            "seed": item.seed,
            "method": getattr(getattr(self.freecure, "config", None), "method", "rofa"),  # stand-ins: ROFA
            "metrics": metrics,
            "images": paths,
            "faces": faces,
            "mask_coverage": None if output.mask is None else float(output.mask.float().mean()),
            "notes": list(output.notes),
            "stages": [{"name": s.name, "ran": s.ran, "seconds": round(s.seconds, 4)} for s in output.stages],
            "seconds": round(time.perf_counter() - start, 4),
            "freecure_version": __version__,
        }


@dataclass
class RunSummary:
    """What one process did."""

    rank: int
    world_size: int
    assigned: int
    skipped: int
    completed: int = 0
    seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=lambda: {m: 0 for m in METHODS})

    @property
    def items_per_second(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


def run_shard(
    evaluator: Evaluator,
    items: Sequence[WorkItem],
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    on_item_done: Callable[[dict], None] | None = None,
    extra: dict | None = None,
    batch_size: int = 1,
) -> RunSummary:
    """Run this process's shard of ``items``, skipping items already in any shard.

    Args:
        evaluator: generates and scores one item.
        items: every item of the run (all processes'), in the stable order of :func:`plan_items`.
        rank, world_size: this process and the number of processes.
        progress: show a progress bar (items done, rate, ETA).
        on_item_done: called with each new row after it is stored.
        extra: fields added to every row (for example the run's world size).
        batch_size: seeds of one ⟨identity, prompt⟩ generated together (:func:`batches`).
    """
    mine = shard(items, rank, world_size)
    done = done_keys(evaluator.out_dir)
    todo = [item for item in mine if item.key not in done]
    summary = RunSummary(rank, world_size, assigned=len(mine), skipped=len(mine) - len(todo))
    store = ResultStore(shard_path(evaluator.out_dir, rank))
    bar = tqdm(
        total=len(mine),
        initial=summary.skipped,
        desc=f"eval [rank {rank}/{world_size}]",
        unit="item",
        disable=not progress,
        position=rank,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    try:
        for batch in batches(todo, batch_size):
            rows = evaluator.run_batch(batch) if len(batch) > 1 else [evaluator.run(batch[0])]
            for row in rows:
                row.update(rank=rank, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}))
            store.append_many(rows)  # one write: the batch lands whole (see done_keys)
            for row in rows:
                summary.completed += 1
                for method in METHODS:
                    summary.failures[method] += not row["metrics"][method]["face_found"]
                bar.update(1)
                if on_item_done is not None:
                    on_item_done(row)
    finally:
        summary.seconds = time.perf_counter() - start
        bar.close()
    return summary


def load_rows(directories: Iterable[str | os.PathLike]) -> list[dict]:
    """The merged rows (one per key) of every shard of ``directories``."""
    return list(merge_rows(read_results(directories)).values())
