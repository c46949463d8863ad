"""FASA: foundation-aware self-attention, the correction of the released code and the NeurIPS paper.

In chosen attention layers PD's queries attend to PD's own keys *and* to FD's keys inside the
attribute mask, in one softmax (the processors and both forms of ω and ℳ:
:mod:`freecure.attention.fasa`). FD's own rows keep plain attention, so FD's trajectory is
unchanged and is replayed from the SAME pass instead of being run again; only FD's conditional
row runs again, to lend its keys and values (docs/engine.md, "FASA").

Here: :class:`FasaConfig` (layers, mask source, ω, form), the rows of a FASA step
(:func:`fasa_layout`), the mask (:func:`fasa_mask`), the pass (:func:`fasa_pass`) and the
:class:`Fasa` correction stage. The NeurIPS paper follows FASA with asymmetric prompt guidance,
which is the expression stage (``FreeCureConfig(expression=True)``, the ``neurips`` preset).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from ..attention.fasa import FASA_FORMS, LAYER_PRESETS, FasaState
from ..backends.base import Backend, check_one_batch
from ..core.conditioning import FD, PD, PD_UNCOND, UNCOND, Conditions
from ..core.errors import InputError
from ..core.guidance import FD_LANE, PD_LANE, BatchLayout, Guidance
from .base import Corrected, Correction, RunContext
from .decode import decode_latents
from .masks import to_latent_resolution
from .sampling import SamePassResult, predict_guided

#: Mask sources: the FD image's face-parse region of the attributes (the authors'), or SAME's ℳ.
MASK_SOURCES = ("fd-parse", "same")


@dataclass(frozen=True)
class FasaConfig:
    """Settings of the FASA method (``FreeCureConfig.method == "fasa"``).

    Attributes:
        layers: a preset name of :data:`LAYER_PRESETS` (each defined per model family; the
            default ``"up"`` for both) or fnmatch patterns over the denoiser's
            attention-processor names: on a UNet only self-attention (``attn1``) layers are
            used, on FLUX the joint attention of double- and single-stream blocks.
        mask_source: ``"fd-parse"`` (the authors': the attributes' region in the FD image,
            binary) or ``"same"`` (SAME's ℳ of eq. 5, soft).
        mask_weight: ω: in the ``"code"`` form added to FD's logits inside the mask (the
            authors' released 1.5); in the ``"paper"`` form the factor of FD's logits inside it
            (the NeurIPS paper's 2.0).
        form: how ω and ℳ enter FD's logits. ``"code"`` (default, the released code): a bias
            ω·ℳ_j on FD's key j inside ℳ, FD's keys outside it blocked (−∞). ``"paper"`` (the
            NeurIPS paper): Softmax(([1, ωℳ] ⊙ Q_p K̂ᵀ)/√d)·V̂, FD's logits multiplied by ω·ℳ_j,
            so that a key outside ℳ enters with logit 0 (see :func:`freecure.attention.fasa.key_bias`).
        uncond: also let PD's unconditional row attend to FD's unconditional row (the
            authors' ``style_fidelity = 1`` leaves the unconditional rows plain; so does the
            default). Costs one more batch row.
    """

    layers: str | tuple[str, ...] = "up"
    mask_source: str = "fd-parse"
    mask_weight: float = 1.5
    uncond: bool = False
    form: str = "code"

    def __post_init__(self):
        if self.mask_source not in MASK_SOURCES:
            raise InputError(f"FASA mask source must be one of {', '.join(MASK_SOURCES)}, got {self.mask_source!r}")
        if not math.isfinite(self.mask_weight) or not 0.0 <= self.mask_weight <= 100.0:
            raise InputError(f"FASA mask weight must be a finite number in [0, 100], got {self.mask_weight}")
        if self.form not in FASA_FORMS:
            raise InputError(f"FASA form must be one of {', '.join(FASA_FORMS)}, got {self.form!r}")
        if isinstance(self.layers, str) and self.layers not in LAYER_PRESETS:
            raise InputError(
                f"unknown FASA layer preset {self.layers!r}: use one of {', '.join(LAYER_PRESETS)} "
                "or give processor-name patterns"
            )


@dataclass(frozen=True)
class FasaLayout:
    """The rows of one FASA step and which rows attend to which: ``(query, key)`` pairs for one
    image, ``(query, key, image)`` for a batch of seeds."""

    layout: BatchLayout
    pairs: tuple[tuple[int, ...], ...]


def fasa_layout(step: int, conditions: Conditions, guided: bool, uncond: bool = False, images: int = 1) -> FasaLayout:
    """Rows of the FASA pass at ``step``: PD's lane (guided), and FD's rows that lend keys.

    Guided: [pd_uncond@PD, pd@PD, fd@FD] (+ [uncond@FD] when ``uncond``); PD's conditional row
    attends to FD's conditional row (and PD's unconditional row to FD's). Before injection
    PD's conditional row carries FD's conditioning, as in the SAME pass.

    ``images`` > 1: the rows of :meth:`BatchLayout.for_images` (row r of image k is r·n + k),
    and each pair repeated per image, ``(q·n + k, key·n + k, k)``: PD's row of image k attends
    to FD's row of the same image only, with that image's mask.
    """
    key = PD if step >= conditions.inject_step else FD
    if not guided:
        one = FasaLayout(BatchLayout(rows=((PD_LANE, key), (FD_LANE, FD)), lanes=((None, 0),)), ((0, 1),))
    else:
        rows = [(PD_LANE, PD_UNCOND), (PD_LANE, key), (FD_LANE, FD)]
        pairs = [(1, 2)]
        if uncond:
            rows.append((FD_LANE, UNCOND))
            pairs.append((0, 3))
        one = FasaLayout(BatchLayout(rows=tuple(rows), lanes=((0, 1),)), tuple(pairs))
    if images == 1:
        return one
    pairs = tuple((q * images + k, r * images + k, k) for q, r in one.pairs for k in range(images))
    return FasaLayout(one.layout.for_images(images), pairs)


def fasa_mask(
    source: str,
    fd_regions: Sequence[torch.Tensor],
    same_mask: torch.Tensor | None,
    latent_size: tuple[int, int],
) -> torch.Tensor | None:
    """M on the grid ``latent_size`` (the family's attention grid), (h, w), or None when there
    is nothing to attend to.

    ``"fd-parse"``: the union of the attributes' regions in the FD image, area-averaged to the
    latent grid and kept where the latent cell lies wholly inside (the authors resize their
    binary mask bilinearly and keep the pixels still at full value). ``"same"``: SAME's ℳ
    (eq. 5) area-averaged to the latent grid, soft.
    """
    if source == "same":
        return None if same_mask is None else to_latent_resolution(same_mask, latent_size)[0, 0]
    if not fd_regions:
        return None
    union = torch.stack([region.float() for region in fd_regions]).amax(dim=0)
    cells = to_latent_resolution(union, latent_size)[0, 0]
    binary = (cells >= 1.0 - 1e-6).float()
    return binary if binary.any() else None


@torch.no_grad()
def fasa_pass(
    backend: Backend,
    scheduler,
    same: SamePassResult,
    conditions: Conditions,
    state: FasaState,
    guidance: Guidance,
    image_size: tuple[int, int],
    uncond: bool = False,
    on_step: Callable[[int], None] | None = None,
    images: Sequence[int] | None = None,
) -> torch.Tensor:
    """The authors' second generation, with FD replayed: PD denoises again from z_T with FASA
    on; FD's latents come from the SAME pass (FASA leaves FD's rows plain, so its trajectory is
    unchanged) and only FD's conditional row is run again, to lend its keys and values.

    Args:
        scheduler: a scheduler set to the SAME pass's timesteps, at step 0 (PD's lanes alone).
        state: the installed processors' state (its masks, one per image run, and weight).
        images: which images of the SAME pass to run (indices into its n images; default all).
            They share every UNet call; ``state``'s j-th mask belongs to ``images[j]``.

    Returns:
        PD's latents z_0 after FASA, shape (len(images), C, H, W).
    """
    if len(same.fd_latents) != len(scheduler.timesteps):
        raise RuntimeError("the SAME pass did not keep FD's latents of every step; FASA needs them")
    index = list(range(same.images)) if images is None else list(images)
    m = len(index)
    z_p = same.fd_latents[0][index].clone()  # PD starts from the same z_T as FD
    guided = guidance.scale != 1.0
    for i, t in enumerate(scheduler.timesteps):
        step = fasa_layout(i, conditions, guided, uncond, images=m)
        z = torch.cat([same.fd_latents[i][index], z_p])  # lanes [FD_0…FD_{m−1} (replayed), PD_0…PD_{m−1}]
        state.set_pairs(step.pairs, batch=len(step.layout.rows))
        eps_p = predict_guided(backend, scheduler, step.layout, z, t, i, conditions.get, guidance, image_size)
        z_p = scheduler.step(eps_p, t, z_p, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    state.set_pairs(())
    return z_p


def fresh_scheduler(scheduler, device=None, family=None, latent_size: tuple[int, int] | None = None):
    """A copy of ``scheduler`` reset to step 0 of the same timesteps (with ``family``: set as the
    family sets them, e.g. FLUX's shifted σ for ``latent_size``)."""
    fresh = copy.deepcopy(scheduler)
    if family is None:
        fresh.set_timesteps(len(scheduler.timesteps), device=device)
    else:
        family.set_timesteps(fresh, len(scheduler.timesteps), device, latent_size)
    return fresh


@contextlib.contextmanager
def _handed_to(backend, state: FasaState) -> Iterator[None]:
    """Let a backend that maps FASA onto its own calls read ``state`` for the block."""
    if not backend.fasa_across_calls:
        yield
        return
    backend.fasa_state = state
    try:
        yield
    finally:
        backend.fasa_state = None


class Fasa(Correction):
    """Stage 3 of ``method="fasa"``: each image's mask (FD-parse or SAME), then one
    :func:`fasa_pass` for every image that has one, sharing its denoiser calls, with the
    processors installed on the chosen layers. An image with nothing to correct keeps its PD
    latent as is (not re-run)."""

    name = "fasa"
    expression_by_default = False  # the authors' released schedule ends with FASA

    def check_backend(self, backend: Backend) -> None:
        if not backend.fasa_across_calls:
            check_one_batch(backend)
        for denoiser in backend.fasa_denoisers():
            backend.family.fasa_layers(denoiser, self.config.fasa.layers)

    def check_guidance(self, guidance: Guidance) -> None:
        if self.config.fasa.uncond and not guidance.cfg:
            raise InputError(
                "FASA's uncond option changes PD's unconditional row, but this run has none (guidance-distilled "
                "FLUX without true CFG, or a guidance scale of 1); drop it or set true_cfg_scale > 1"
            )

    def settings(self) -> dict:
        return {"fasa": asdict(self.config.fasa)}

    def run(self, ctx: RunContext, same: SamePassResult) -> Corrected:
        config: FasaConfig = self.config.fasa
        outputs, family, backend = ctx.outputs, ctx.family, ctx.backend
        grid = family.attention_grid(ctx.latent_size)  # UNet: the latent grid; FLUX: its 2×2 token grid
        masks: dict[int, torch.Tensor] = {}
        for k, output in enumerate(outputs):
            fd_regions = []
            if output.parse_fd is not None:
                for attribute in output.parsed.localized:
                    region = torch.from_numpy(output.parse_fd.mask(attribute.parse_classes))
                    if region.any():
                        fd_regions.append(region)
            mask = fasa_mask(config.mask_source, fd_regions, output.mask, grid)
            if mask is not None:
                masks[k] = output.fasa_mask = mask
        reason = (
            "the prompt names no localized attribute"
            if not ctx.parsed.localized
            else f"the {config.mask_source} mask is empty: no attribute region to attend to"
        )
        if not masks:
            ctx.records.skip(self.name, reason)
            return Corrected(same.pd, [], reason)
        corrected = sorted(masks)
        stacked = torch.stack([masks[k] for k in corrected]).to(ctx.device)
        state = FasaState(stacked, config.mask_weight, grid, form=config.form)
        scheduler = fresh_scheduler(ctx.pipeline.scheduler, ctx.device, family, ctx.latent_size)
        steps = len(scheduler.timesteps)
        with ctx.records.run(self.name) as record, ctx.progress.bar(steps, "FASA: PD again") as bar:
            with contextlib.ExitStack() as installed:
                for denoiser in backend.fasa_denoisers():
                    layers = family.fasa_layers(denoiser, config.layers)
                    installed.enter_context(family.foundation_aware_attention(denoiser, state, layers))
                installed.enter_context(_handed_to(backend, state))
                z_fasa = fasa_pass(
                    backend,
                    scheduler,
                    same,
                    ctx.conditions,
                    state,
                    ctx.guidance,
                    ctx.image_size,
                    uncond=config.uncond,
                    on_step=lambda i: bar.update(),
                    images=corrected,
                )
            record.freecure_bytes = state.cached_bytes()  # keys handed across calls (Face-diffuser), else 0
        rows = {k: j for j, k in enumerate(corrected)}
        z_out = torch.cat([z_fasa[rows[k]][None] if k in rows else same.pd[k : k + 1] for k in range(len(outputs))])
        for k, image in zip(corrected, decode_latents(ctx.pipeline, z_fasa, ctx.image_size)):
            outputs[k].images["blended"] = outputs[k].images["freecure"] = image
            outputs[k].latents["blended"] = z_out[k : k + 1]
        return Corrected(z_out, corrected, reason)
