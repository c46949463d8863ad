"""The conditioning vocabulary: what one guidance branch feeds the denoiser, all the branches of a
run, and the keys that name them in batch layouts."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

# Conditioning keys used by batch layouts.
UNCOND, FD, PD, PD_UNCOND = "uncond", "fd", "pd", "pd_uncond"


@dataclass(frozen=True)
class TextConditioning:
    """What one guidance branch feeds the denoiser.

    Attributes:
        prompt_embeds: text-encoder hidden states, shape (1, sequence, dim) (FLUX: T5's).
        pooled_prompt_embeds: the pooled text embedding, shape (1, dim): SDXL's second CLIP,
            FLUX's CLIP; None for SD1.5.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> TextConditioning:
        pooled = self.pooled_prompt_embeds
        return replace(
            self,
            prompt_embeds=self.prompt_embeds.to(device=device, dtype=dtype),
            pooled_prompt_embeds=None if pooled is None else pooled.to(device=device, dtype=dtype),
        )


@dataclass(frozen=True)
class ReferenceTokens:
    """Reference images as the denoiser reads them in context (FLUX.1 Kontext, FLUX.2): latent
    tokens appended after the target image's tokens in the joint sequence, with their own
    position ids.

    Attributes:
        latents: the packed reference tokens, (1, R, C), in the denoiser's token layout.
        ids: their position ids, (R, k) (FLUX.1: 3 coordinates, FLUX.2: 4); the first
            coordinate is the image index (0 is the target; each reference has its own).
        blocks: how many of the R tokens each reference has, in order.
    """

    latents: torch.Tensor
    ids: torch.Tensor
    blocks: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return int(self.latents.shape[1])

    def to(self, device=None, dtype=None) -> ReferenceTokens:
        return replace(
            self, latents=self.latents.to(device=device, dtype=dtype), ids=self.ids.to(device=device)
        )


@dataclass(frozen=True)
class ReferenceConditioning(TextConditioning):
    """A branch that also sees reference images in context: its text and the references' tokens
    (PD's rows of a reference-image backend; FD's rows are plain :class:`TextConditioning`)."""

    references: ReferenceTokens | None = None

    def to(self, device=None, dtype=None) -> ReferenceConditioning:
        moved = super().to(device, dtype)
        refs = self.references
        return replace(moved, references=None if refs is None else refs.to(device, dtype))


@dataclass(frozen=True)
class Conditions:
    """All conditionings of one FreeCure run.

    Attributes:
        uncond: the negative branch of FD (and of PD when ``pd_uncond`` is None).
        fd: FD's positive branch, τ(c) in eq. (2).
        pd: PD's positive branch from ``inject_step`` on, τ(c̃) in eq. (1).
        inject_step: index of the first denoising step at which PD uses ``pd``.
        pd_uncond: PD's own negative branch, if it differs from FD's.
        template: the template prompt's conditioning ("a man") for the expression inversion.
        expression: the expression prompt's conditioning ("a man laughing") for re-denoising.
    """

    uncond: TextConditioning
    fd: TextConditioning
    pd: TextConditioning
    inject_step: int
    pd_uncond: TextConditioning | None = None
    template: TextConditioning | None = None
    expression: TextConditioning | None = None

    @property
    def shares_uncond(self) -> bool:
        return self.pd_uncond is None

    def to(self, device=None, dtype=None) -> Conditions:
        """Every conditioning moved to the denoiser's device and dtype."""
        changes = {
            f.name: getattr(self, f.name).to(device, dtype)
            for f in fields(self)
            if isinstance(getattr(self, f.name), TextConditioning)
        }
        return replace(self, **changes)

    def get(self, key: str) -> TextConditioning:
        if key == PD_UNCOND:
            return self.uncond if self.pd_uncond is None else self.pd_uncond
        value = getattr(self, key)
        if value is None:
            raise KeyError(f"conditioning {key!r} was not prepared")
        return value
