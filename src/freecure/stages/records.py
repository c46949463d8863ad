"""TODO docstring."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class StageRecord:
    """One stage of a run: whether it ran, why not, its wall time and its UNet work.

    ``freecure_bytes`` is FreeCure's own memory beyond the model's that the stage holds,
    computed from tensor sizes: the SAME pass's ε_f cache, injection snapshot and attention
    sums; the masks; ROFA's mask; the expression stage's latents."""

    name: str
    ran: bool
    reason: str = ""
    seconds: float = 0.0
    unet_calls: int = 0
    batch_items: int = 0
    freecure_bytes: int = 0


class UNetCounter:
    """Counts the denoiser forward calls and batch items actually run (a forward pre-hook)."""

    def __init__(self):
        self.calls = 0
        self.items = 0

    def __call__(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.calls += 1
        self.items += int(sample.shape[0])

    @contextlib.contextmanager
    def attached(self, unets: Sequence[torch.nn.Module]) -> Iterator[UNetCounter]:
        handles = [unet.register_forward_pre_hook(self, with_kwargs=True) for unet in unets]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


class _Stages:
    """Times each stage and attributes UNet work to it."""

    def __init__(self, counter: UNetCounter):
        self.counter = counter
        self.records: list[StageRecord] = []

    @contextlib.contextmanager
    def run(self, name: str) -> Iterator[StageRecord]:
        record = StageRecord(name, ran=True)
        calls, items, start = self.counter.calls, self.counter.items, time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        try:
            yield record
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record.seconds = time.perf_counter() - start
            record.unet_calls = self.counter.calls - calls
            record.batch_items = self.counter.items - items
            self.records.append(record)

    def skip(self, name: str, reason: str) -> None:
        self.records.append(StageRecord(name, ran=False, reason=reason))


class _ReportingBar:
    """A tqdm bar that also reports ``(stage, done, total)`` to a callback after each step."""

    def __init__(self, bar, stage: str, total: int, callback: Callable[[str, int, int], None]):
        self.bar, self.stage, self.total, self.callback, self.done = bar, stage, total, callback, 0

    def __enter__(self):
        self.bar.__enter__()
        self.callback(self.stage, 0, self.total)
        return self

    def __exit__(self, *exc_info):
        return self.bar.__exit__(*exc_info)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        self.callback(self.stage, self.done, self.total)
