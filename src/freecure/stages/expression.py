"""Expression restore (paper §4.2): DDIM inversion with the template prompt, then denoising
with the expression prompt, both without identity.

The schedulers come from the backend's model family (:mod:`freecure.families`): DDIM inverse
and DDIM for ε-prediction UNets; for FLUX, Euler steps along the flow ODE on the same σ
schedule, reversed (:class:`freecure.families.FlowEulerInverseScheduler`), then FLUX's own
Euler scheduler. Everything below is written once for both.

The blended latent is inverted directly (no VAE decode/encode round trip) for the first
``round(γ·T)`` steps of the inverse DDIM schedule, reaching the timestep from which the last
``round(γ·T)`` steps of the forward DDIM schedule start.

Guidance. DDIM inversion is exact only if the noise prediction along the way does not
change between the step's two ends; classifier-free guidance amplifies the change by w, so
inversion with w > 1 drifts (the observation behind null-text inversion). The inversion
therefore defaults to w = 1 (conditional branch only). The re-denoising is a different
matter: it is *meant* to move the image towards the expression prompt, which is what
guidance does, so :func:`expression_restore` takes its own scale for each half (the pipeline
defaults the re-denoising to the run's guidance scale; see docs/engine.md).
``reconstruction_error`` uses one scale in both directions, where one prompt retraces the
same ε-function and the error is the DDIM linearisation error alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..backends.base import Backend
from ..core.conditioning import TextConditioning
from ..core.guidance import Guidance, single_lane_layout
from ..families.unet import UNET
from .decode import decode_latents
from .sampling import predict_guided


def inversion_steps(num_inference_steps: int, gamma: float) -> int:
    """Number of inversion (and re-denoising) steps: round(γ·T), at least 1."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
    return max(1, round(gamma * num_inference_steps))


def _run_steps(
    backend: Backend,
    scheduler,
    z: torch.Tensor,
    steps: range,
    cond: TextConditioning,
    uncond: TextConditioning,
    guidance_scale: float,
    image_size: tuple[int, int],
    on_step: Callable[[int], None] | None,
) -> torch.Tensor:
    """Step one lane per image of ``z`` (n, …) through ``scheduler.timesteps[steps]`` under
    ``cond`` (guided when w ≠ 1)."""
    layout = single_lane_layout("cond", guided=guidance_scale != 1.0).for_images(z.shape[0])
    guidance = Guidance(scale=guidance_scale)
    lookup = {"cond": cond, "uncond": uncond}.__getitem__
    for i in steps:
        t = scheduler.timesteps[i]
        eps = predict_guided(backend, scheduler, layout, z, t, i, lookup, guidance, image_size)
        z = scheduler.step(eps, t, z, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    return z


def _schedulers(backend: Backend, scheduler_config, num_inference_steps: int, z: torch.Tensor):
    """(inverse, forward) schedulers of the backend's family; a UNet's DDIM pair by default."""
    family = getattr(backend, "family", UNET)
    return family.inversion_schedulers(scheduler_config, num_inference_steps, z.device, z)


@torch.no_grad()
def ddim_invert(
    backend: Backend,
    z0: torch.Tensor,
    cond: TextConditioning,
    uncond: TextConditioning,
    scheduler_config,
    num_inference_steps: int,
    gamma: float,
    guidance_scale: float,
    image_size: tuple[int, int],
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """DDIM-invert ``z0`` up to step γ·T under ``cond`` (z_0 → z_{γT}): the first γ·T steps of
    the inverse schedule (for flow models: Euler steps up the flow ODE)."""
    scheduler, _ = _schedulers(backend, scheduler_config, num_inference_steps, z0)
    steps = range(inversion_steps(num_inference_steps, gamma))
    return _run_steps(backend, scheduler, z0, steps, cond, uncond, guidance_scale, image_size, on_step)


@torch.no_grad()
def ddim_denoise_from(
    backend: Backend,
    z: torch.Tensor,
    cond: TextConditioning,
    uncond: TextConditioning,
    scheduler_config,
    num_inference_steps: int,
    gamma: float,
    guidance_scale: float,
    image_size: tuple[int, int],
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoise z_{γT} to z_0 under ``cond`` with the last γ·T steps of the DDIM schedule (for
    flow models: of the Euler flow schedule)."""
    _, scheduler = _schedulers(backend, scheduler_config, num_inference_steps, z)
    steps = range(num_inference_steps - inversion_steps(num_inference_steps, gamma), num_inference_steps)
    return _run_steps(backend, scheduler, z, steps, cond, uncond, guidance_scale, image_size, on_step)


def expression_restore(
    backend: Backend,
    z0: torch.Tensor,
    template: TextConditioning,
    expression: TextConditioning,
    uncond: TextConditioning,
    scheduler_config,
    num_inference_steps: int,
    gamma: float,
    guidance_scale: float,
    image_size: tuple[int, int],
    on_step: Callable[[int], None] | None = None,
    inversion_guidance_scale: float | None = None,
) -> torch.Tensor:
    """Invert with the template prompt, re-denoise with the expression prompt (§4.2).

    ``guidance_scale`` guides the re-denoising; ``inversion_guidance_scale`` the inversion
    (None: the same scale for both).
    """
    inversion_scale = guidance_scale if inversion_guidance_scale is None else inversion_guidance_scale
    z = ddim_invert(
        backend,
        z0,
        template,
        uncond,
        scheduler_config,
        num_inference_steps,
        gamma,
        inversion_scale,
        image_size,
        on_step,
    )
    return ddim_denoise_from(
        backend,
        z,
        expression,
        uncond,
        scheduler_config,
        num_inference_steps,
        gamma,
        guidance_scale,
        image_size,
        on_step,
    )


def reconstruction_error(
    backend: Backend,
    z0: torch.Tensor,
    cond: TextConditioning,
    uncond: TextConditioning,
    scheduler_config,
    num_inference_steps: int,
    gamma: float,
    guidance_scale: float,
    image_size: tuple[int, int],
) -> float:
    """Relative L2 error ‖z0 − denoise(invert(z0))‖ / ‖z0‖ with one prompt in both directions."""
    restored = expression_restore(
        backend, z0, cond, cond, uncond, scheduler_config, num_inference_steps, gamma, guidance_scale, image_size
    )
    return float((restored - z0).norm() / z0.norm())


class ExpressionRestore:
    """Stage 4 (§4.2; the NeurIPS paper's asymmetric prompt guidance, APG): invert the corrected
    latents with the template prompt to γ·T and re-denoise them with the expression prompt,
    without identity; it follows either correction. Skipped when the prompt names no abstract
    attribute (expression)."""

    name = "expression"

    def run(self, ctx, z: torch.Tensor) -> torch.Tensor:
        if not ctx.parsed.abstract:
            ctx.records.skip(self.name, "the prompt names no abstract attribute (expression)")
            return z
        config, conditions = ctx.config, ctx.conditions
        steps = inversion_steps(ctx.num_inference_steps, config.gamma)
        with ctx.records.run(self.name) as record, ctx.progress.bar(2 * steps, "Expression: invert+denoise") as bar:
            z = expression_restore(
                ctx.backend,
                z,
                conditions.template,
                conditions.expression,
                conditions.uncond,
                ctx.scheduler.config,
                ctx.num_inference_steps,
                config.gamma,
                config.expression_scale(ctx.guidance.scale),
                ctx.image_size,
                on_step=lambda i: bar.update(),
                inversion_guidance_scale=config.inversion_guidance_scale,
            )
            record.freecure_bytes = z.numel() * z.element_size()
        for output, image in zip(ctx.outputs, decode_latents(ctx.pipeline, z, ctx.image_size)):
            output.images["freecure"] = image
        return z
