"""ROFA: restart PD at the injection step and blend FD's cached prediction into PD's inside ℳ
(paper §4.1, eq. 6), and the :class:`Rofa` correction stage that runs it."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from ..backends.base import Backend
from ..core.conditioning import PD, PD_UNCOND, Conditions
from ..core.guidance import PD_LANE, BatchLayout, Guidance
from .base import Corrected, Correction, RunContext
from .decode import decode_latents
from .sampling import SamePassResult, predict_guided

#: Rows of a ROFA step: PD's lane alone (FD is replayed from the SAME pass's cache).
ROFA_LAYOUT = BatchLayout(rows=((PD_LANE, PD_UNCOND), (PD_LANE, PD)), lanes=((0, 1),))
ROFA_LAYOUT_UNGUIDED = BatchLayout(rows=((PD_LANE, PD),), lanes=((None, 0),))


def rofa_blend(eps_p: torch.Tensor, eps_f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ε_p ← ℳ·ε_f + (1 − ℳ)·ε_p (eq. 6), for ε or flow velocities alike; ``mask`` broadcasts
    over the prediction (UNet: (1, 1, h, w); FLUX: packed like the latents)."""
    mask = mask.to(device=eps_p.device, dtype=eps_p.dtype)
    return mask * eps_f + (1 - mask) * eps_p


@torch.no_grad()
def rofa_pass(
    backend: Backend,
    same: SamePassResult,
    conditions: Conditions,
    mask: torch.Tensor,
    guidance: Guidance,
    image_size: tuple[int, int],
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Stage 3: restart PD at the injection step and blend in the cached ε_f (eq. 6).

    The FD lane is replayed from the cache (no denoiser call) so that the scheduler state
    stays that of the SAME pass; only PD's rows go through the denoiser. ``mask`` is ℳ laid
    out like the predictions (:meth:`freecure.families.ModelFamily.model_mask`), one per
    image ((n, …) for n images; an image whose ℳ is zero keeps its PD prediction).

    Returns:
        The noise-blended latents z_0 of PD, shape (n, …).
    """
    scheduler = copy.deepcopy(same.injection_scheduler)
    z = same.injection_latents.clone()
    n = same.images
    timesteps = scheduler.timesteps
    layout = (ROFA_LAYOUT if guidance.cfg else ROFA_LAYOUT_UNGUIDED).for_images(n)
    for i in range(conditions.inject_step, len(timesteps)):
        t = timesteps[i]
        eps_p = predict_guided(backend, scheduler, layout, z, t, i, conditions.get, guidance, image_size)
        eps_f = same.eps_f[i]
        eps_p = rofa_blend(eps_p, eps_f, mask)
        z = scheduler.step(torch.cat([eps_f, eps_p]), t, z, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    return z[PD_LANE * n : PD_LANE * n + n]


def unblended_reason(parsed) -> str:
    """Why an image was not blended: no localized attribute in the prompt, or none found."""
    if parsed.localized:
        return "no localized attribute was found in both the FD and the PD image"
    return "the prompt names no localized attribute"


class Rofa(Correction):
    """Stage 3 of the paper: ROFA noise blending from the injection step with the cached ε_f
    (eq. 6). Images share the pass; an image whose mask is empty (nothing found) keeps its PD
    latent as is."""

    name = "rofa"
    expression_by_default = True  # §4.2: the expression stage follows

    def settings(self) -> dict:
        return {"fasa": None}

    def run(self, ctx: RunContext, same: SamePassResult) -> Corrected:
        outputs, n = ctx.outputs, ctx.images
        blended = [k for k, output in enumerate(outputs) if output.latent_mask is not None]
        reason = unblended_reason(ctx.parsed)
        if not blended:
            ctx.records.skip(self.name, reason)
            return Corrected(same.pd, [], reason)
        steps = ctx.num_inference_steps - ctx.conditions.inject_step
        empty = torch.zeros(1, 1, *ctx.latent_size)
        mask = torch.cat([empty if o.latent_mask is None else o.latent_mask.cpu() for o in outputs]).to(ctx.device)
        with ctx.records.run(self.name) as record, ctx.progress.bar(steps, "ROFA: blend") as bar:
            model_mask = ctx.family.model_mask(mask, same.z0)
            z_rofa = rofa_pass(
                ctx.backend,
                same,
                ctx.conditions,
                model_mask,
                ctx.guidance,
                ctx.image_size,
                on_step=lambda i: bar.update(),
            )
            record.freecure_bytes = mask.numel() * mask.element_size()
        z_out = torch.cat([z_rofa[k : k + 1] if k in blended else same.pd[k : k + 1] for k in range(n)])
        for k, image in zip(blended, decode_latents(ctx.pipeline, z_rofa[blended], ctx.image_size)):
            outputs[k].images["blended"] = outputs[k].images["freecure"] = image
            outputs[k].latents["blended"] = z_out[k : k + 1]
        return Corrected(z_out, blended, reason)
