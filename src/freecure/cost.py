"""Denoiser work of plain PD generation, of the paper read literally, and of this engine.

Everything here is *counted by running* the schedules (a forward pre-hook on the UNet or
FLUX transformer counts calls and batch items), never computed by formula.

The literal reading (§4.1–4.2): SAME runs FD and PD as two separate generations with full
classifier-free guidance; ROFA runs FD and PD again from the same z_T, blending from the
injection step; the expression stage DDIM-inverts with the template prompt (no guidance)
and denoises with the expression prompt (full guidance, as a normal generation). On FLUX
"full guidance" is the distilled embedding, one row per lane (two with true CFG).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, replace

import torch

from .backends.base import Backend, rows_in_one_call
from .core.conditioning import FD, PD, PD_UNCOND, UNCOND, Conditions
from .core.guidance import FD_LANE, PD_LANE, Guidance, single_lane_layout
from .stages.expression import ddim_denoise_from, ddim_invert
from .stages.records import UNetCounter
from .stages.rofa import rofa_blend
from .stages.sampling import plain_pass, predict_guided


@dataclass
class Cost:
    """Denoiser calls and batch items of one schedule."""

    unet_calls: int
    batch_items: int


@torch.no_grad()
def literal_rofa(
    backend: Backend,
    scheduler,
    z_T: torch.Tensor,
    conditions: Conditions,
    mask: torch.Tensor,
    guidance: Guidance,
    image_size: tuple[int, int],
) -> torch.Tensor:
    """ROFA read literally: FD and PD rerun from z_T, each its own CFG call per step, with
    ε_p ← ℳ·ε_f + (1−ℳ)·ε_p (eq. 6) from the injection step. Returns PD's z_0."""
    fd_scheduler, pd_scheduler = scheduler, copy.deepcopy(scheduler)
    z_f, z_p = z_T.clone(), z_T.clone()
    fd_layout = single_lane_layout(FD, guided=guidance.cfg, uncond_key=UNCOND)
    for i, t in enumerate(scheduler.timesteps):
        injected = i >= conditions.inject_step
        # before injection PD is FD's rows (its own negative only where it has one), as in the SAME pass
        pd_uncond = PD_UNCOND if injected or not conditions.shares_uncond else UNCOND
        pd_layout = single_lane_layout(PD if injected else FD, guided=guidance.cfg, uncond_key=pd_uncond)
        eps_f = predict_guided(backend, fd_scheduler, fd_layout, z_f, t, i, conditions.get, guidance, image_size)
        eps_p = predict_guided(backend, pd_scheduler, pd_layout, z_p, t, i, conditions.get, guidance, image_size)
        if injected:
            eps_p = rofa_blend(eps_p, eps_f, mask)
        z_f = fd_scheduler.step(eps_f, t, z_f, return_dict=False)[0]
        z_p = pd_scheduler.step(eps_p, t, z_p, return_dict=False)[0]
    return z_p


@dataclass
class _Setup:
    """What both counters build the same way: the backend's conditions for a grey reference,
    sizes, guidance and z_T (the backend's injection step overridden)."""

    backend: Backend
    conditions: Conditions
    references: list
    guidance: Guidance
    guidance_scale: float
    image_size: tuple[int, int]
    latent_size: tuple[int, int]
    z_T: torch.Tensor
    prompt: str = ""
    trigger: str | None = None

    def scheduler(self, num_inference_steps: int):
        scheduler = copy.deepcopy(self.backend.pipeline.scheduler)
        self.backend.family.set_timesteps(scheduler, num_inference_steps, self.backend.device, self.latent_size)
        return scheduler


def _setup(
    freecure_pipeline, prompt, class_word, num_inference_steps, inject_step, seed, guidance_scale, true_cfg_scale
) -> _Setup:
    """The backend's trigger word (``Backend.default_trigger``, PhotoMaker's "img") is written
    after the class word of a prompt that has none."""
    from .core.attributes import parse_prompt
    backend = freecure_pipeline.backend
    family = backend.family
    if guidance_scale is None:
        guidance_scale = backend.default_guidance_scale
    trigger = backend.default_trigger
    if trigger is not None and trigger not in prompt.split():
        prompt = prompt.replace(f" {class_word} ", f" {class_word} {trigger} ", 1)
    parsed = parse_prompt(prompt, class_word, trigger=trigger, tokenizer=backend.tokenizer)
    references = [_gray_reference()]
    with _no_face_check(backend):
        conditions = backend.conditions(parsed, references, num_inference_steps)
    conditions = replace(conditions.to(backend.device, backend.dtype), inject_step=inject_step)
    height, width = freecure_pipeline.default_size()
    latent_size = family.latent_size(backend.pipeline, height, width)
    backend.guidance_scale = guidance_scale
    setup = _Setup(
        backend,
        conditions,
        references,
        family.loop_guidance(guidance_scale, true_cfg_scale),
        guidance_scale,
        (height, width),
        latent_size,
        None,
        prompt,
        trigger,
    )
    setup.z_T = family.initial_latents(
        backend.pipeline,
        setup.scheduler(num_inference_steps),
        latent_size,
        torch.Generator().manual_seed(seed),
        backend.device,
        backend.dtype,
    )
    return setup


def _engine_cost(engine, setup: _Setup, prompt, class_word, num_inference_steps, inject_step, seed, true_cfg_scale):
    """Run ``engine`` (a FreeCurePipeline) once and count its work, per stage too."""
    with _no_face_check(setup.backend):
        output = engine(
            setup.prompt,
            setup.references,
            class_word=class_word,
            trigger_word=setup.trigger,
            num_inference_steps=num_inference_steps,
            inject_step=inject_step,
            guidance_scale=setup.guidance_scale,
            true_cfg_scale=true_cfg_scale,
            generator=torch.Generator().manual_seed(seed),
        )
    cost = asdict(Cost(output.unet_calls, output.batch_items))
    cost["stages"] = {
        stage.name: {"ran": stage.ran, "unet_calls": stage.unet_calls, "batch_items": stage.batch_items}
        for stage in output.stages
    }
    return cost, output


def count_costs(
    freecure_pipeline,
    prompt: str = "a man with black curly hair, laughing happily",
    class_word: str = "man",
    num_inference_steps: int = 50,
    inject_step: int = 10,
    seed: int = 0,
    guidance_scale: float | None = None,
    true_cfg_scale: float = 1.0,
) -> dict[str, dict]:
    """Run plain PD, the literal schedule and this engine (method ROFA, with the expression stage
    when the configuration runs it) on ``freecure_pipeline`` and count.

    The backend's injection step is overridden to ``inject_step``; ``guidance_scale`` defaults
    to the backend's (7.5 SD1.5, 5.0 SDXL, 3.5 embedded for FLUX). Returns a dict with
    ``plain_pd``, ``literal`` and ``engine`` entries (calls, items) and the settings.
    """
    setup = _setup(
        freecure_pipeline, prompt, class_word, num_inference_steps, inject_step, seed, guidance_scale, true_cfg_scale
    )
    backend, family = setup.backend, setup.backend.family
    config = replace(freecure_pipeline.config, method="rofa")  # ROFA's schedules; FASA's: count_fasa_costs
    engine = type(freecure_pipeline)(backend, freecure_pipeline.face_parser, config)
    engine.set_progress_bar_config(disable=True)
    conditions, guidance, image_size, z_T = setup.conditions, setup.guidance, setup.image_size, setup.z_T
    latent_size = setup.latent_size
    results: dict[str, dict] = {}

    def fresh():
        return setup.scheduler(num_inference_steps)

    counter = UNetCounter()
    with counter.attached(backend.unets()), torch.no_grad():
        plain_pass(backend, fresh(), z_T, conditions, guidance, image_size, lane=PD)
        results["plain_pd"] = asdict(Cost(counter.calls, counter.items))

        counter.calls = counter.items = 0
        scheduler = fresh()
        plain_pass(backend, scheduler, z_T, conditions, guidance, image_size, lane=FD)
        plain_pass(backend, fresh(), z_T, conditions, guidance, image_size, lane=PD)
        mask = family.model_mask(torch.full((1, 1, *latent_size), 0.5, device=z_T.device), z_T)
        z = literal_rofa(backend, fresh(), z_T, conditions, mask, guidance, image_size)
        if config.runs_expression:
            literal_expression(setup, z, config.gamma, num_inference_steps)
        results["literal"] = asdict(Cost(counter.calls, counter.items))

    results["engine"], output = _engine_cost(
        engine, setup, prompt, class_word, num_inference_steps, inject_step, seed, true_cfg_scale
    )
    results["settings"] = dict(
        num_inference_steps=num_inference_steps,
        inject_step=inject_step,
        gamma=config.gamma,
        expression_guidance_scale=output.settings["expression_guidance_scale"],
        inversion_guidance_scale=config.inversion_guidance_scale,
        approximate_shared_uncond=config.approximate_shared_uncond,
        prompt=setup.prompt,
        backend=backend.name,
        family=family.name,
        guidance_scale=setup.guidance_scale,
        true_cfg_scale=true_cfg_scale,
    )
    return results


@torch.no_grad()
def literal_expression(setup: _Setup, z: torch.Tensor, gamma: float, num_inference_steps: int) -> torch.Tensor:
    """The expression stage read literally (§4.2; the NeurIPS paper's asymmetric prompt
    guidance): DDIM inversion with the template prompt, unguided, then denoising with the
    expression prompt at full guidance, as a normal generation."""
    backend, conditions, guidance = setup.backend, setup.conditions, setup.guidance
    scheduler_config = setup.scheduler(num_inference_steps).config
    z = ddim_invert(
        backend,
        z,
        conditions.template,
        conditions.uncond,
        scheduler_config,
        num_inference_steps,
        gamma,
        1.0,
        setup.image_size,
    )
    return ddim_denoise_from(
        backend,
        z,
        conditions.expression,
        conditions.uncond,
        scheduler_config,
        num_inference_steps,
        gamma,
        guidance.scale,
        setup.image_size,
    )


def _no_face_check(backend):
    """A grey photo has no face: the reference-image backends' face check is off for the count."""
    return getattr(backend, "unchecked_faces", contextlib.nullcontext)()


def _gray_reference():
    from PIL import Image

    return Image.new("RGB", (64, 64), (128, 128, 128))


# --------------------------------------------------------------------------- FASA (method "fasa")
@torch.no_grad()
def literal_fasa(
    backend: Backend,
    scheduler,
    z_T: torch.Tensor,
    conditions: Conditions,
    mask: torch.Tensor,
    guidance: Guidance,
    image_size: tuple[int, int],
    layers,
    weight: float = 1.5,
    form: str = "code",
) -> torch.Tensor:
    """The authors' released schedule: two full generations of one batch of PD's and FD's rows
    per step, the second with FASA on (PD's conditional row attends to FD's). Guided: their
    4-row batch [uncond@PD, uncond@FD, PD, FD]; unguided (guidance-distilled FLUX, which
    their code does not cover) the 2-row [PD, FD]. ``mask`` lies on the family's attention
    grid. Returns PD's z_0 of the second generation."""
    from .attention.fasa import FasaState
    from .core.guidance import BatchLayout

    def layout(i):
        key = PD if i >= conditions.inject_step else FD
        if not guidance.cfg:
            return BatchLayout(rows=((PD_LANE, key), (FD_LANE, FD)), lanes=((None, 1), (None, 0))), ((0, 1),)
        pd_uncond = PD_UNCOND if key == PD or not conditions.shares_uncond else UNCOND
        rows = ((PD_LANE, pd_uncond), (FD_LANE, UNCOND), (PD_LANE, key), (FD_LANE, FD))
        return BatchLayout(rows=rows, lanes=((1, 3), (0, 2))), ((2, 3),)

    family = backend.family
    state = FasaState(mask, weight, tuple(mask.shape[-2:]), form=form)
    for generation in range(2):
        run = copy.deepcopy(scheduler)
        z = z_T.expand(2, *z_T.shape[1:]).clone()
        with family.foundation_aware_attention(backend.denoiser, state, layers if generation else []):
            for i, t in enumerate(run.timesteps):
                rows, pairs = layout(i)
                state.set_pairs(pairs if generation else (), batch=len(rows.rows))
                eps = predict_guided(backend, run, rows, z, t, i, conditions.get, guidance, image_size)
                z = run.step(eps, t, z, return_dict=False)[0]
    state.set_pairs(())
    return z[PD_LANE : PD_LANE + 1]


def count_fasa_costs(
    freecure_pipeline,
    prompt: str = "a man with black curly hair, laughing happily",
    class_word: str = "man",
    num_inference_steps: int = 50,
    inject_step: int = 10,
    seed: int = 0,
    guidance_scale: float | None = None,
    true_cfg_scale: float = 1.0,
) -> dict[str, dict]:
    """Run the authors' FASA schedule and this engine's ``method="fasa"`` and count their work,
    each followed by the expression stage (APG) when the configuration runs it after FASA
    (``FreeCureConfig.expression``, the ``neurips`` preset).

    Any model family: on FLUX the literal schedule is the authors' two generations on FLUX's
    rows (one per lane when guidance-distilled). ``guidance_scale`` defaults to the backend's.
    Returns ``literal_fasa`` and ``engine_fasa`` entries (calls, items; the engine's per stage);
    ``literal_fasa`` is None for a backend that splits FD's and PD's rows over calls of its own
    models (Face-diffuser), where the authors' one-batch schedule does not exist.
    """
    setup = _setup(
        freecure_pipeline, prompt, class_word, num_inference_steps, inject_step, seed, guidance_scale, true_cfg_scale
    )
    backend, family, latent_size, z_T = setup.backend, setup.backend.family, setup.latent_size, setup.z_T
    config = replace(freecure_pipeline.config, method="fasa")
    mask = torch.zeros(family.attention_grid(latent_size), device=z_T.device)
    mask[: mask.shape[0] // 2] = 1.0
    layers = family.fasa_layers(backend.denoiser, config.fasa.layers)
    counter = UNetCounter()
    literal = rows_in_one_call(backend)  # the authors' batch needs FD's and PD's rows in one call
    with counter.attached(backend.unets()):
        if literal:
            literal_fasa(
                backend,
                setup.scheduler(num_inference_steps),
                z_T,
                setup.conditions,
                mask,
                setup.guidance,
                setup.image_size,
                layers,
                config.fasa.mask_weight,
                config.fasa.form,
            )
            if config.runs_expression:  # FASA then asymmetric prompt guidance (the NeurIPS paper)
                literal_expression(setup, z_T, config.gamma, num_inference_steps)
    results = {"literal_fasa": asdict(Cost(counter.calls, counter.items)) if literal else None}
    engine = type(freecure_pipeline)(backend, freecure_pipeline.face_parser, config)
    engine.set_progress_bar_config(disable=True)
    results["engine_fasa"], _ = _engine_cost(
        engine, setup, prompt, class_word, num_inference_steps, inject_step, seed, true_cfg_scale
    )
    return results
