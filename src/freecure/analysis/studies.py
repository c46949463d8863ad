"""The two motivation studies of §3 as functions: ``attention_study`` (Figure 3) and
``interpolation_study`` (eq. 3, Figures 4 and 10). Both run FD and PD from one z_T with the
engine's SAME pass, so PD and FD are exactly the images ``freecure generate`` makes. The model
family (UNet or FLUX) is the backend's: its sizes, schedule, z_T, guidance rows and decoding."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from ..core.attributes import ParsedPrompt, detect_class_word, parse_prompt
from ..core.conditioning import Conditions
from ..core.errors import InputError
from ..core.guidance import Guidance
from ..core.images import load_image
from ..stages.sampling import check_scheduler, same_layout, same_pass
from .interpolate import InterpolationState, interpolate_across_calls, interpolate_identity
from .maps import LANES, TokenMapStore, cross_attention_groups, is_joint, record_token_maps
from .tokens import TokenAlignment, align_tokens


@dataclass
class StudySetup:
    """One prompt, identity and seed, encoded and ready to denoise."""

    parsed: ParsedPrompt
    conditions: Conditions
    z_T: torch.Tensor
    guidance: Guidance
    image_size: tuple[int, int]
    latent_size: tuple[int, int]
    steps: int
    alignment: TokenAlignment
    settings: dict = field(default_factory=dict)


def prepare(
    freecure,
    prompt: str,
    references: Sequence = (),
    class_word: str | None = None,
    trigger_word: str | None = None,
    negative_prompt: str | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    inject_step: int | None = None,
    true_cfg_scale: float = 1.0,
) -> StudySetup:
    """Parse, encode and draw z_T as :class:`freecure.pipeline.FreeCurePipeline` does."""
    backend, pipeline = freecure.backend, freecure.pipeline
    check_rows_in_one_call(backend)
    family = backend.family
    if num_inference_steps < 2:
        raise InputError(f"num_inference_steps must be at least 2, got {num_inference_steps}")
    check_scheduler(pipeline.scheduler)
    height, width = height or freecure.default_size()[0], width or freecure.default_size()[1]
    multiple = family.size_multiple(pipeline)
    if height % multiple or width % multiple:
        raise InputError(f"height and width must be multiples of {multiple}, got {height}×{width}")
    guidance = family.loop_guidance(guidance_scale, true_cfg_scale)
    references = [load_image(image) for image in references]
    class_word = class_word or detect_class_word(prompt)
    parsed = parse_prompt(prompt, class_word, trigger=trigger_word, tokenizer=backend.tokenizer)
    backend.guidance_scale = guidance_scale
    conditions = backend.conditions(parsed, references, num_inference_steps, negative_prompt)
    conditions = conditions.to(backend.device, backend.dtype)
    if inject_step is not None:
        if not 0 <= inject_step < num_inference_steps:
            raise InputError(f"inject_step must lie in 0..{num_inference_steps - 1}, got {inject_step}")
        conditions = replace(conditions, inject_step=inject_step)
    latent_size = family.latent_size(pipeline, height, width)
    scheduler = copy.deepcopy(pipeline.scheduler)
    family.set_timesteps(scheduler, num_inference_steps, backend.device, latent_size)
    generator = torch.Generator().manual_seed(seed)
    z_T = family.initial_latents(pipeline, scheduler, latent_size, generator, backend.device, backend.dtype)
    settings = dict(
        backend=backend.name,
        prompt=prompt,
        foundation_prompt=parsed.foundation_prompt,
        class_word=parsed.class_word,
        trigger_word=trigger_word,
        negative_prompt=negative_prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        true_cfg_scale=true_cfg_scale,
        family=family.name,
        height=height,
        width=width,
        seed=seed,
        inject_step=conditions.inject_step,
        scheduler=type(pipeline.scheduler).__name__,
    )
    return StudySetup(
        parsed,
        conditions,
        z_T,
        guidance,
        (height, width),
        latent_size,
        num_inference_steps,
        align_tokens(backend, parsed, len(references)),
        settings,
    )


def across_calls(backend) -> bool:
    """Whether ``backend`` splits the engine's rows over calls of its own models *and* maps them
    onto those calls for the analyses (``analysis_across_calls``: Face-diffuser, whose calls
    tell ``backend.analysis_state`` the engine row of each of their rows)."""
    return bool(getattr(backend, "analysis_across_calls", False))


def analysed_models(backend) -> list:
    """The networks whose attention the analyses record or change: every UNet of a backend that
    maps its rows across calls (Face-diffuser: FD's model, the SDM, a separate TDM), else the denoiser."""
    return list(backend.unets()) if across_calls(backend) else [backend.denoiser]


@contextlib.contextmanager
def handed_to(backend, state):
    """Let a backend that maps the analyses onto its own calls read ``state`` for the block."""
    if not across_calls(backend):
        yield
        return
    backend.analysis_state = state
    try:
        yield
    finally:
        backend.analysis_state = None


def check_rows_in_one_call(backend) -> None:
    """Refuse backends whose PD rows are not rows of the engine's one denoiser call
    (:func:`freecure.fasa.rows_in_one_call`) unless they map the rows onto their own calls
    (:func:`across_calls`: Face-diffuser); :class:`RowGuard` checks it again at run time."""
    from ..backends.base import rows_in_one_call

    if not rows_in_one_call(backend) and not across_calls(backend):
        raise InputError(
            f"the attention studies need FD's and PD's rows in one denoiser call, but the {backend.name} backend "
            "evaluates PD with its own models in separate calls; analyse another backend"
        )


def _joint_run(freecure, setup: StudySetup, store, on_step) -> torch.Tensor:
    """The SAME pass (FD and PD from one z_T) with ``store`` told each step's rows; z_0 of both.

    The analyses address FD's and PD's rows by their index in the engine's one denoiser call;
    a guard checks every call holds all of the step's rows, so a backend that splits them
    (IP-Adapter-FaceID with ``fd_lora=False``) is refused instead of being misread.
    """
    backend = freecure.backend
    scheduler = copy.deepcopy(freecure.pipeline.scheduler)
    backend.family.set_timesteps(scheduler, setup.steps, backend.device, setup.latent_size)
    approximate = freecure.config.approximate_shared_uncond
    guard = RowGuard(store, setup.conditions, approximate, setup.guidance.cfg, backend.name)
    # a backend that maps the rows onto its own calls is handed the store instead of guarded
    watching = handed_to(backend, store) if across_calls(backend) else guard.watching(backend.denoiser)
    with watching:
        same = same_pass(
            backend,
            scheduler,
            setup.z_T,
            setup.conditions,
            setup.guidance,
            setup.image_size,
            guard,
            approximate,
            on_step=on_step,
        )
    return same.z0


class RowGuard:
    """Passes the SAME loop's context on to ``inner`` and checks, before each denoiser call,
    that the call holds every row of the step's layout."""

    def __init__(self, inner, conditions, approximate_shared_uncond: bool, guided: bool, backend: str):
        self.inner, self.conditions, self.backend = inner, conditions, backend
        self.approximate_shared_uncond, self.guided = approximate_shared_uncond, guided
        self.expected: int | None = None

    def set_context(self, step: int, row) -> None:
        self.expected = None
        if step >= 0:
            layout = same_layout(step, self.conditions, self.approximate_shared_uncond, guided=self.guided)
            self.expected = len(layout.rows)
        if self.inner is not None:
            self.inner.set_context(step, row)

    @contextlib.contextmanager
    def watching(self, denoiser):
        def check(module, args, kwargs):
            states = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            if self.expected is not None and states is not None and states.shape[0] != self.expected:
                raise InputError(
                    f"the attention studies need FD's and PD's rows in one denoiser call, but the {self.backend} "
                    f"backend ran a call with {states.shape[0]} of the step's {self.expected} rows (it evaluates "
                    "PD in separate calls); analyse another backend"
                )

        handle = denoiser.register_forward_pre_hook(check, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


def _groups(freecure, groups: Sequence[str] | None) -> dict[str, list[str]]:
    available = cross_attention_groups(freecure.backend.denoiser)
    if not available:
        raise InputError("this model has no cross-attention layers to analyse")
    if groups is None:
        return available
    chosen: dict[str, list[str]] = {}
    for group in groups:
        if group == "all":
            chosen["all"] = [name for names in available.values() for name in names]
        elif group in available:
            chosen[group] = available[group]
        else:
            raise InputError(
                f"block group {group!r} has no attention to the text here; choose from {', '.join(available)} or all"
            )
    return chosen


@dataclass
class AttentionStudy:
    """Figure 3: FD and PD images and their per-token maps by block group.

    Attributes:
        images: ``"fd"`` and ``"pd"``.
        maps: ``(lane, group)`` → (tokens, h, w): each word token's map (PD: summed over the
            token's columns, e.g. several identity tokens), latent grid.
        full: ``(lane, group)`` → (keys, h, w) over every key column (rows sum to 1).
        summary: JSON-ready attention-mass summary.
    """

    images: dict[str, Image.Image]
    maps: dict[tuple[str, str], torch.Tensor]
    full: dict[tuple[str, str], torch.Tensor]
    summary: dict


def attention_study(
    freecure,
    setup: StudySetup,
    steps: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    groups: Sequence[str] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> AttentionStudy:
    """Record FD's and PD's cross-attention over every token (Figure 3)."""
    from ..stages.decode import decode_latents

    if steps is not None and any(not 0 <= s < setup.steps for s in steps):
        raise InputError(f"analysed steps must lie in 0..{setup.steps - 1}, got {list(steps)}")
    chosen = _groups(freecure, groups)
    store = TokenMapStore(
        setup.conditions,
        setup.latent_size,
        None if steps is None else frozenset(steps),
        None if heads is None else tuple(heads),
        freecure.config.approximate_shared_uncond,
        setup.guidance.cfg,
    )
    layers = sorted({name for names in chosen.values() for name in names})
    if heads is not None:
        counts = {_heads(freecure.backend.denoiser, name) for name in layers}
        if not heads or any(not 0 <= h < min(counts) for h in heads):
            raise InputError(f"head indices must lie in 0..{min(counts) - 1}, got {list(heads)}")
    with contextlib.ExitStack() as recording:
        for model in analysed_models(freecure.backend):
            recording.enter_context(record_token_maps(model, store, layers))
        z0 = _joint_run(freecure, setup, store, on_step)
    fd_image, pd_image = decode_latents(freecure.pipeline, z0, setup.image_size)
    alignment = setup.alignment
    full, maps = {}, {}
    for group, names in chosen.items():
        for lane in LANES:
            grid = store.group_map(lane, names)
            full[lane, group] = grid
            columns = [(c,) for c in alignment.fd_columns] if lane == "fd" else alignment.pd_columns
            maps[lane, group] = torch.stack([grid[list(cols)].sum(dim=0) for cols in columns])
    summary = mass_summary(setup.parsed, alignment, full, joint=is_joint(freecure.backend.denoiser))
    return AttentionStudy({"fd": fd_image, "pd": pd_image}, maps, full, summary)


def _heads(model, name: str) -> int:
    module = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
    return module.heads


def mass_summary(parsed: ParsedPrompt, alignment: TokenAlignment, full: dict, joint: bool = False) -> dict:
    """How much attention mass (mean over pixels of a token's map) each token gets in FD and
    PD, per block group: the identity token(s) and every attribute, and PD − FD. ``joint``
    (FLUX): the maps' last column is the image keys' mass, reported as ``image_keys``."""
    index = {column: k for k, column in enumerate(alignment.fd_columns)}
    groups: dict[str, dict] = {group: {} for _, group in full}
    for group in groups:
        fd_map, pd_map = full["fd", group], full["pd", group]

        def mass(grid, columns):
            return float(grid[list(columns)].sum(dim=0).mean()) if columns else None

        def pd_columns(fd_columns):
            return sorted({c for column in fd_columns for c in alignment.pd_columns[index[column]]})

        entry: dict = {"identity": None, "attributes": {}}
        if joint:
            # PD's maps of a reference-image model end with one more column: its reference keys
            references = pd_map.shape[0] == fd_map.shape[0] + 1
            fd_image, pd_image = float(fd_map[-1].mean()), float(pd_map[-2 if references else -1].mean())
            entry["image_keys"] = {"fd": fd_image, "pd": pd_image, "change": pd_image - fd_image}
            if references:  # the identity enters as the reference photo's tokens: their share is its mass
                entry["identity_mass"] = {"reference_keys": float(pd_map[-1].mean())}
        if alignment.identity_in_prompt:
            fd_mass, pd_mass = mass(fd_map, alignment.identity_fd), mass(pd_map, alignment.identity_pd)
            entry["identity"] = {
                "fd_columns": list(alignment.identity_fd),
                "pd_columns": list(alignment.identity_pd),
                "fd": fd_mass,
                "pd": pd_mass,
                "gain": pd_mass - fd_mass,
            }
        for attribute in parsed.attributes:
            fd_mass = mass(fd_map, attribute.token_indices)
            pd_mass = mass(pd_map, pd_columns(attribute.token_indices))
            entry["attributes"][attribute.text] = {
                "kind": attribute.kind,
                "fd": fd_mass,
                "pd": pd_mass,
                "change": None if fd_mass is None else pd_mass - fd_mass,
                "relative_change": None if not fd_mass else (pd_mass - fd_mass) / fd_mass,
            }
        groups[group] = entry
    return {
        "tokens": [
            {"label": label, "fd_column": fd, "pd_columns": list(pd)}
            for label, fd, pd in zip(alignment.labels, alignment.fd_columns, alignment.pd_columns)
        ],
        "identity_in_prompt": alignment.identity_in_prompt,
        "groups": groups,
        "reading": "mass = mean over the latent grid of the token's attention probability (PD: summed over "
        "its columns); change = PD − FD; identity gain = PD's identity columns − FD's class-word columns"
        + (
            "; FLUX: probabilities of the image queries' joint softmax over [text; image] keys, not renormalised "
            "over the text keys; image_keys = the mass on all image keys together; identity_mass (reference-image "
            "models) = PD's mass on the reference photos' keys"
            if joint
            else ""
        ),
    }


@dataclass
class InterpolationStudy:
    """Figures 4 and 10: PD's image for every (block group, α), and FD's image."""

    images: dict[tuple[str, float], Image.Image]
    fd_image: Image.Image
    pairs: tuple[tuple[int, int], ...]


def interpolation_study(
    freecure,
    setup: StudySetup,
    alphas: Sequence[float],
    groups: Sequence[str] | None = None,
    on_run: Callable[[str, float], None] | None = None,
) -> InterpolationStudy:
    """PD with eq. 3 applied to the identity column(s) in each block group, for each α.

    α = 0 changes nothing, so it is run once and shared by every group. ``groups`` None: every
    block group of the model family (UNet: down, mid, up; FLUX: double, single).
    """
    from ..stages.decode import decode_latents

    if not setup.alignment.identity_in_prompt:
        raise InputError(
            f"eq. 3 interpolates the cross-attention column of the identity token, but the "
            f"{freecure.backend.name} backend injects identity through its own adapter, not a prompt token; "
            "use `freecure analyze attention` to compare its text tokens' maps instead"
        )
    if any(not (0.0 <= a <= 1.0) for a in alphas):
        raise InputError(f"every α must lie in [0, 1], got {list(alphas)}")
    chosen = _groups(freecure, groups)
    pairs = setup.alignment.identity_pairs
    images: dict[tuple[str, float], Image.Image] = {}
    fd_image = None
    shared_zero = None
    for group, layers in chosen.items():
        for alpha in alphas:
            if alpha == 0.0 and shared_zero is not None:
                images[group, alpha] = shared_zero
                continue
            state = InterpolationState(
                setup.conditions, float(alpha), pairs, freecure.config.approximate_shared_uncond, setup.guidance.cfg
            )
            if not alpha:
                context = contextlib.nullcontext()
            elif across_calls(freecure.backend):
                context = interpolate_across_calls(analysed_models(freecure.backend), state, layers)
            else:
                context = interpolate_identity(freecure.backend.denoiser, state, layers)
            with context:
                z0 = _joint_run(freecure, setup, state, None)
            fd, pd = decode_latents(freecure.pipeline, z0, setup.image_size)
            fd_image = fd_image or fd
            images[group, alpha] = pd
            if alpha == 0.0:
                shared_zero = pd
            if on_run is not None:
                on_run(group, alpha)
    return InterpolationStudy(images, fd_image, pairs)
