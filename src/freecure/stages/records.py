"""What a run records: its outputs, one record per stage (wall time, denoiser calls and batch items,
FreeCure's own memory), and the counter that attributes denoiser work to stages."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..core.attributes import ParsedPrompt
from ..parsing import ParseResult


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


class StageRecorder:
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


@dataclass
class FreeCureOutput:
    """Everything a FreeCure run produced.

    Attributes:
        images: ``"fd"``, ``"pd"``, ``"blended"`` (after ROFA) and ``"freecure"`` (final).
        parsed: the parsed prompt (attributes, token columns, template/expression prompts).
        attention_maps: FD's aggregated cross-attention H_i per attribute text, latent grid.
        attribute_masks: ℳ_i per localized attribute at image resolution (eq. 4).
        mask: the merged ℳ at image resolution (eq. 5), None when no mask was built.
        latent_mask: ℳ on the latent grid, as used by ROFA.
        parse_fd, parse_pd: face-parser results of the FD and PD images.
        stages: one :class:`StageRecord` per stage, in order.
        notes: what was skipped or adjusted, in words.
        latents: final latents per image name.
        fasa_mask: the mask FASA used (method ``"fasa"``), else None: on the latent grid (UNet)
            or the packed 2×2 token grid (FLUX).
    """

    images: dict[str, Image.Image]
    parsed: ParsedPrompt
    attention_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    attribute_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    latent_mask: torch.Tensor | None = None
    parse_fd: ParseResult | None = None
    parse_pd: ParseResult | None = None
    stages: list[StageRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latents: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    fasa_mask: torch.Tensor | None = None

    @property
    def unet_calls(self) -> int:
        return sum(stage.unet_calls for stage in self.stages)

    @property
    def batch_items(self) -> int:
        return sum(stage.batch_items for stage in self.stages)

    def stage(self, name: str) -> StageRecord:
        return next(stage for stage in self.stages if stage.name == name)
