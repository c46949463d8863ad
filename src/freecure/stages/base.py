"""What the stages share: the run's context, the stage protocol and the correction protocol.

A FreeCure run (paper, Figure 5) is SAME pass → masks → correction → expression → outputs. Each
stage is an object with ``run(ctx, …)``; it reads what it needs from one :class:`RunContext`
(backend, family, scheduler, conditions, guidance, sizes, outputs, records, progress) instead of
a list of arguments repeated across stages, records its work in ``ctx.records`` and writes its
images into ``ctx.outputs``. A *correction* (ROFA, FASA) is the stage that changes PD with FD's
help; both implement :class:`Correction`, so the pipeline never asks which one it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..backends.base import Backend
from ..core.attributes import ParsedPrompt
from ..core.conditioning import Conditions
from ..core.guidance import Guidance
from ..parsing import FaceParser
from .records import FreeCureOutput, StageRecorder, _ReportingBar


@dataclass
class Progress:
    """tqdm bars per stage, optionally reporting ``(stage, done, total)`` to a callback."""

    enabled: bool = True
    callback: Callable[[str, int, int], None] | None = None

    def bar(self, total: int, desc: str):
        bar = tqdm(total=total, desc=desc, disable=not self.enabled, leave=False)
        return bar if self.callback is None else _ReportingBar(bar, desc, total, self.callback)


@dataclass
class RunContext:
    """Everything the stages of one run read.

    Attributes:
        backend: the personalization backend (its family, denoiser and conditionings).
        face_parser: Ψ.
        config: the run's :class:`~freecure.stages.config.FreeCureConfig`.
        parsed: the parsed prompt.
        conditions: every conditioning of the run, on the denoiser's device and dtype.
        guidance: the loop's guidance (CFG scale, or FLUX's true CFG).
        scheduler: the pipeline's scheduler, set to the run's timesteps.
        image_size, latent_size: (height, width) in pixels and on the latent grid.
        outputs: one :class:`FreeCureOutput` per image, filled in by the stages.
        records: the stage records (wall time, denoiser calls and items per stage).
        progress: the progress bars.
        num_inference_steps: T.
    """

    backend: Backend
    face_parser: FaceParser
    config: object
    parsed: ParsedPrompt
    conditions: Conditions
    guidance: Guidance
    scheduler: object
    image_size: tuple[int, int]
    latent_size: tuple[int, int]
    outputs: list[FreeCureOutput]
    records: StageRecorder
    progress: Progress = field(default_factory=Progress)
    num_inference_steps: int = 0

    @property
    def family(self):
        return self.backend.family

    @property
    def pipeline(self):
        return self.backend.pipeline

    @property
    def images(self) -> int:
        """How many images (seeds) share the run's denoiser calls."""
        return len(self.outputs)

    @property
    def device(self) -> torch.device:
        return self.backend.device


@dataclass
class Corrected:
    """What a correction leaves: PD's latents after it, (n, …) (an image it did not correct
    keeps its PD latent), which images it corrected, and why the others were not."""

    latents: torch.Tensor
    corrected: list[int]
    reason: str = ""


class Correction:
    """The stage that corrects PD with FD's help after the SAME pass and the masks (ROFA, FASA).

    Subclasses set :attr:`name` (the stage's record name and ``FreeCureConfig.method``) and
    :attr:`expression_by_default`, and implement :meth:`run`.
    """

    #: The stage's name in records and ``FreeCureConfig.method``.
    name: str = ""
    #: Whether the expression stage follows this correction when ``FreeCureConfig.expression``
    #: is None (ROFA: yes, the paper's §4.2; FASA: no, the authors' released schedule).
    expression_by_default: bool = True

    def __init__(self, config):
        self.config = config

    def check_backend(self, backend: Backend) -> None:
        """Refuse, before any run, a backend this correction cannot run on (default: any runs)."""

    def check_guidance(self, guidance: Guidance) -> None:
        """Refuse, before the SAME pass, a guidance this correction's settings do not fit."""

    def settings(self) -> dict:
        """This correction's own settings, for ``FreeCureOutput.settings``."""
        return {}

    def run(self, ctx: RunContext, same) -> Corrected:
        raise NotImplementedError
