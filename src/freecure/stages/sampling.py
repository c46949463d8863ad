"""Joint FD/PD denoising: the SAME pass (paper §3.1, §4.1) and the :class:`SamePass` stage.

Two *lanes* of latents advance together from the same z_T: lane 0 is FD (foundation
denoising, eq. 2), lane 1 is PD (personalized denoising, eq. 1). Each step makes one
denoiser call whose rows are named by a :class:`BatchLayout`, and one ``scheduler.step`` on
the stacked lanes, so multistep schedulers keep one consistent state.

Model families. Nothing here knows whether the denoiser is a UNet predicting ε or FLUX's
transformer predicting a flow velocity: the backend's family (:mod:`freecure.families`)
lays out the latents, calls the network and picks the schedule. What the loop sees is a
prediction per row and a :class:`Guidance` saying whether a lane takes one row (unguided,
or guidance-distilled FLUX whose scale is an embedding) or two (classifier-free guidance,
FLUX's true CFG). Guidance and the blend are affine in the prediction, so they hold for ε, v
and velocity alike.

Precision: the lanes (latents, ε, guidance, ROFA's blend, the scheduler's state) are fp32
whatever the model's dtype; :func:`predict_guided` casts the model's input to its dtype and
its output back, so half-precision models do not make the stepping drift.

Where classifier-free guidance meets the blend: ROFA (eq. 6) mixes the *guided* noise
predictions, ε̂ = ε_u + w·(ε_c − ε_u), after guidance (and guidance rescale), i.e. exactly
the tensor the scheduler steps with. CFG is linear, so with plain CFG this equals blending the
conditional and unconditional predictions separately; blending after guidance keeps that
true under the non-linear guidance rescale too, and it makes ℳ = 1 reproduce FD's stepped
lane bit for bit, because the cached ε_f *is* what moved FD's lane.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..attention.capture import AttentionStore
from ..backends.base import Backend
from ..core.conditioning import FD, PD, PD_UNCOND, UNCOND, Conditions
from ..core.guidance import FD_LANE, PD_LANE, BatchLayout, Guidance, scale_model_input, single_lane_layout
from .decode import decode_latents


def same_layout(
    step: int, conditions: Conditions, approximate_shared_uncond: bool = False, guided: bool = True
) -> BatchLayout:
    """Rows of the SAME pass at ``step``.

    Unguided (guidance-distilled FLUX, or a CFG scale of 1): one row per distinct lane,
    [fd] before injection and [fd@FD, pd@PD] after. Guided:

    Before injection, PD's conditioning equals FD's: when they also share the negative branch
    both lanes hold the same latent and the batch is [uncond, cond] (2 rows). After injection
    the lanes differ and exact guidance needs each lane's own unconditional prediction:
    [uncond@FD, fd@FD, uncond@PD, pd@PD] (4 rows). With ``approximate_shared_uncond`` the
    unconditional prediction is made once, on PD's latent, and used by both lanes:
    [uncond@PD, fd@FD, pd@PD] (3 rows) — PD stays exact, FD's guidance is approximate.
    """
    injected = step >= conditions.inject_step
    pd_key = PD if injected else FD
    if not guided:
        if not injected:
            return BatchLayout(rows=((FD_LANE, FD),), lanes=((None, 0), (None, 0)), capture_row=0)
        return BatchLayout(rows=((FD_LANE, FD), (PD_LANE, PD)), lanes=((None, 0), (None, 1)), capture_row=0)
    if not injected and conditions.shares_uncond:
        return BatchLayout(rows=((FD_LANE, UNCOND), (FD_LANE, FD)), lanes=((0, 1), (0, 1)), capture_row=1)
    if approximate_shared_uncond and conditions.shares_uncond:
        return BatchLayout(
            rows=((PD_LANE, UNCOND), (FD_LANE, FD), (PD_LANE, pd_key)), lanes=((0, 1), (0, 2)), capture_row=1
        )
    return BatchLayout(
        rows=((FD_LANE, UNCOND), (FD_LANE, FD), (PD_LANE, PD_UNCOND), (PD_LANE, pd_key)),
        lanes=((0, 1), (2, 3)),
        capture_row=1,
    )


def predict_guided(
    backend: Backend,
    scheduler,
    layout: BatchLayout,
    z: torch.Tensor,
    t: torch.Tensor,
    step: int,
    conditionings: Callable[[str], object],
    guidance: Guidance,
    image_size: tuple[int, int],
) -> torch.Tensor:
    """One denoiser call on the layout's rows, then guidance: the guided prediction per lane.

    The model sees its own dtype (``backend.dtype``); its prediction comes back in the lanes'
    dtype, so guidance and the scheduler's arithmetic stay in fp32 under a half-precision model.
    """
    model_input = scale_model_input(scheduler, layout.gather(z), t)
    rows = [conditionings(key) for key in layout.keys]
    model_dtype = getattr(backend, "dtype", model_input.dtype)
    eps = backend.predict_noise(model_input.to(model_dtype), t, rows, layout.keys, step, image_size)
    return layout.guide(eps.to(z.dtype), guidance.scale, guidance.rescale)


@dataclass
class SamePassResult:
    """What the SAME pass leaves for the later stages.

    Attributes:
        z0: final latents, stacked (2n, …): [FD_0 … FD_{n−1}, PD_0 … PD_{n−1}] for n images
            (one image: [FD, PD]), in the family's layout.
        eps_f: FD's guided prediction at every step from injection on (ROFA's ε_f), (n, …).
        injection_latents: every lane at the injection step, before it is taken.
        injection_scheduler: a copy of the scheduler's state at the injection step.
        fd_latents: FD's latents at the start of every step, (n, …) each (FASA replays FD from them).
    """

    z0: torch.Tensor
    eps_f: dict[int, torch.Tensor]
    injection_latents: torch.Tensor
    injection_scheduler: object
    fd_latents: list[torch.Tensor] = field(default_factory=list)

    @property
    def images(self) -> int:
        return self.z0.shape[0] // 2

    @property
    def fd(self) -> torch.Tensor:
        """FD's final latents, (n, …)."""
        return self.z0[: self.images]

    @property
    def pd(self) -> torch.Tensor:
        """PD's final latents, (n, …)."""
        return self.z0[self.images :]

    def stored_bytes(self) -> int:
        """FreeCure's own memory held by this result: the ε_f cache and the injection snapshot."""
        tensors = [*self.eps_f.values(), self.injection_latents]
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def same_pass(
    backend: Backend,
    scheduler,
    z_T: torch.Tensor,
    conditions: Conditions,
    guidance: Guidance,
    image_size: tuple[int, int],
    store: AttentionStore | None = None,
    approximate_shared_uncond: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> SamePassResult:
    """Stage 1: FD and PD denoise together from one z_T (eqs. 1–2).

    FD's cross-attention is recorded into ``store`` at every step; FD's guided ε and the
    injection-step state are cached for ROFA, so FD never has to be run again.

    ``z_T`` holds one latent per image, (n, …): the n images share every denoiser call, each
    row of the one-image layout repeated per image (:meth:`BatchLayout.for_images`).
    """
    n = z_T.shape[0]
    z = z_T.repeat(2, *[1] * (z_T.ndim - 1))  # lanes [FD_0…FD_{n−1}, PD_0…PD_{n−1}]: FD_k, PD_k share z_T[k]
    eps_f: dict[int, torch.Tensor] = {}
    fd_latents: list[torch.Tensor] = []
    snapshot = None
    for i, t in enumerate(scheduler.timesteps):
        fd_latents.append(z[FD_LANE * n : FD_LANE * n + n].clone())
        if i == conditions.inject_step:
            snapshot = (z.clone(), copy.deepcopy(scheduler))
        layout = same_layout(i, conditions, approximate_shared_uncond, guided=guidance.cfg).for_images(n)
        if store is not None:
            store.set_context(i, layout.capture_rows)
        eps = predict_guided(backend, scheduler, layout, z, t, i, conditions.get, guidance, image_size)
        if i >= conditions.inject_step:
            eps_f[i] = eps[FD_LANE * n : FD_LANE * n + n].clone()
        z = scheduler.step(eps, t, z, return_dict=False)[0]  # one step on the stacked lanes
        if on_step is not None:
            on_step(i)
    if store is not None:
        store.set_context(-1, None)
    assert snapshot is not None
    return SamePassResult(
        z0=z, eps_f=eps_f, injection_latents=snapshot[0], injection_scheduler=snapshot[1], fd_latents=fd_latents
    )


@torch.no_grad()
def plain_pass(
    backend: Backend,
    scheduler,
    z_T: torch.Tensor,
    conditions: Conditions,
    guidance: Guidance,
    image_size: tuple[int, int],
    lane: str = PD,
) -> torch.Tensor:
    """Plain generation of one lane alone (PD with its injection step, or FD), full CFG.

    This is what the personalization model does without FreeCure; it serves as the
    baseline in cost counts and as the oracle of tests. ``z_T`` may hold several images (n, …).
    """
    z = z_T.clone()
    for i, t in enumerate(scheduler.timesteps):
        injected = lane == PD and i >= conditions.inject_step
        key = PD if injected else FD
        # before injection PD is FD's rows, with its own negative only where it has one (as in SAME)
        uncond_key = PD_UNCOND if lane == PD and (injected or not conditions.shares_uncond) else UNCOND
        layout = single_lane_layout(key, guided=guidance.cfg, uncond_key=uncond_key).for_images(z.shape[0])
        eps = predict_guided(backend, scheduler, layout, z, t, i, conditions.get, guidance, image_size)
        z = scheduler.step(eps, t, z, return_dict=False)[0]
    return z


def check_scheduler(scheduler) -> None:
    """Refuse schedulers whose steps draw fresh noise: FreeCure replays trajectories."""
    name = type(scheduler).__name__
    config = scheduler.config
    stochastic = (
        "Ancestral" in name
        or "SDE" in name
        or name in {"DDPMScheduler", "DDPMWuerstchenScheduler", "LCMScheduler", "TCDScheduler"}
        or "sde" in str(config.get("algorithm_type", ""))
        or float(getattr(scheduler, "eta", 0.0) or 0.0) != 0.0
        or bool(config.get("stochastic_sampling", False))
    )
    if stochastic:
        raise ValueError(
            f"scheduler {name} adds fresh noise at each step, so FD/PD trajectories cannot be "
            "replayed; use a deterministic one (DDIMScheduler, DPMSolverMultistepScheduler with "
            "algorithm_type='dpmsolver++', EulerDiscreteScheduler, UniPCMultistepScheduler; FLUX: "
            "FlowMatchEulerDiscreteScheduler without stochastic_sampling)"
        )
    if getattr(scheduler, "order", 1) > 1:
        raise ValueError(
            f"scheduler {name} evaluates the model several times per step (order {scheduler.order}); "
            "FreeCure steps FD and PD once per timestep: use DDIMScheduler, DPMSolverMultistepScheduler, "
            "EulerDiscreteScheduler or UniPCMultistepScheduler"
        )


@contextlib.contextmanager
def _handed(backend, store):
    """Let a backend that splits the engine's rows over calls tell ``store`` which engine row
    each row of its calls comes from (``capture_store``: the reference-image backends)."""
    if store is None or not hasattr(backend, "capture_store"):
        yield
        return
    backend.capture_store = store
    try:
        yield
    finally:
        backend.capture_store = None


class SamePass:
    """Stage 1: FD and PD from one z_T per image, FD's attention on the attribute tokens
    captured; decodes both and fills each output's ``fd``/``pd`` images, latents and maps."""

    name = "same_pass"

    def run(self, ctx, z_T: torch.Tensor) -> SamePassResult:
        parsed, n, config = ctx.parsed, ctx.images, ctx.config
        columns = tuple(sorted({i for a in parsed.attributes for i in a.token_indices}))
        store = AttentionStore(columns, ctx.latent_size, aggregation=config.attention_aggregation) if columns else None
        with ctx.records.run(self.name) as record, ctx.progress.bar(ctx.num_inference_steps, "SAME: FD+PD") as bar:
            capture = (
                ctx.family.attention_capture(ctx.backend.denoiser, store, config.attention_layers)
                if store is not None
                else contextlib.nullcontext()
            )
            with capture, _handed(ctx.backend, store):
                same = same_pass(
                    ctx.backend,
                    ctx.scheduler,
                    z_T,
                    ctx.conditions,
                    ctx.guidance,
                    ctx.image_size,
                    store,
                    config.approximate_shared_uncond,
                    on_step=lambda i: bar.update(),
                )
            record.freecure_bytes = same.stored_bytes() + (0 if store is None else store.stored_bytes())
        decoded = decode_latents(ctx.pipeline, same.z0, ctx.image_size)
        for k, output in enumerate(ctx.outputs):
            fd_image, pd_image = decoded[FD_LANE * n + k], decoded[PD_LANE * n + k]
            output.images.update(fd=fd_image, pd=pd_image, blended=pd_image, freecure=pd_image)
            output.latents.update(fd=same.fd[k : k + 1], pd=same.pd[k : k + 1])
            if store is not None:
                output.attention_maps = {a.text: store.token_map(a.token_indices, k) for a in parsed.attributes}
        return same
