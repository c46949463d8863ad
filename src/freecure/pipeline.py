"""FreeCurePipeline: the paper's stages in order (Figure 5).

1. SAME pass — FD and PD denoise together from one z_T; FD's attention on the attribute tokens
   is recorded, FD's guided prediction and the injection-step state are cached
   (:class:`~freecure.stages.sampling.SamePass`).
2. Masks — decode FD and PD, parse both with Ψ, build ℳ_i (eq. 4) and merge them (eq. 5)
   (:class:`~freecure.stages.masks.SameMasks`).
3. Correction — ROFA noise blending from the injection step (eq. 6,
   :class:`~freecure.stages.rofa.Rofa`) or FASA, PD again with foundation-aware attention
   (:class:`~freecure.stages.fasa.Fasa`).
4. Expression — DDIM-invert the corrected latent with the template prompt to γ·T and denoise it
   with the expression prompt, without identity (§4.2; the NeurIPS paper's asymmetric prompt
   guidance), after either correction (:class:`~freecure.stages.expression.ExpressionRestore`).

Every stage reads one :class:`~freecure.stages.base.RunContext`; stages with nothing to do are
skipped and :class:`FreeCureOutput` says why. The same stages run on Stable Diffusion UNets and
on FLUX: what differs lives in ``backend.family`` (:mod:`freecure.families`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from .backends.base import Backend
from .core.attributes import detect_class_word, parse_prompt
from .core.deprecation import moved_names
from .core.errors import InputError, check_number
from .core.images import ImageInput, load_image
from .parsing import FaceParser
from .stages.base import Progress, RunContext
from .stages.config import METHODS, PRESETS, FreeCureConfig
from .stages.decode import decode_latents
from .stages.expression import ExpressionRestore
from .stages.masks import SameMasks
from .stages.records import FreeCureOutput, StageRecord, StageRecorder, UNetCounter
from .stages.sampling import SamePass, check_scheduler

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "PRESETS",
    "FreeCureConfig",
    "FreeCureOutput",
    "FreeCurePipeline",
    "StageRecord",
    "decode_latents",
]


class FreeCurePipeline:
    """FreeCure on top of a personalization backend.

    Args:
        backend: the personalization method (:class:`freecure.backends.Backend`).
        face_parser: Ψ, mapping an image to a face-parsing label map.
        config: FreeCure's own settings (``FreeCureConfig.from_preset("neurips")`` for a preset).

    Example:
        >>> pipe = FreeCurePipeline(backend, BiSeNetFaceParser.from_pretrained())
        >>> out = pipe("a man with black curly hair, laughing", reference_images=[photo],
        ...            class_word="man", generator=torch.Generator().manual_seed(0))
        >>> out.images["freecure"].save("freecure.png")
    """

    def __init__(self, backend: Backend, face_parser: FaceParser, config: FreeCureConfig | None = None):
        self.backend = backend
        self.face_parser = face_parser
        self.config = config if config is not None else FreeCureConfig()
        self.same_pass, self.masks = SamePass(), SameMasks()
        self.correction = self.config.correction
        self.correction.check_backend(backend)  # fail now, not after the SAME pass
        self.expression = ExpressionRestore() if self.config.runs_expression else None
        self.progress = True
        self.progress_callback: Callable[[str, int, int], None] | None = None

    @property
    def pipeline(self):
        return self.backend.pipeline

    def set_progress_bar_config(
        self, disable: bool = False, callback: Callable[[str, int, int], None] | None = None
    ) -> None:
        """``disable`` hides the tqdm bars; ``callback(stage, done, total)`` is called after
        every denoising step of every stage (e.g. to feed a web page's progress bar)."""
        self.progress = not disable
        self.progress_callback = callback

    def expression_guidance(self, guidance_scale: float) -> float:
        """Guidance of the expression re-denoising (:meth:`FreeCureConfig.expression_scale`)."""
        return self.config.expression_scale(guidance_scale)

    def default_size(self) -> tuple[int, int]:
        return self.backend.family.default_size(self.pipeline)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        reference_images: Sequence[ImageInput] = (),
        class_word: str | None = None,
        trigger_word: str | None = None,
        negative_prompt: str | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        inject_step: int | None = None,
        true_cfg_scale: float = 1.0,
        num_images_per_prompt: int = 1,
    ) -> FreeCureOutput | list[FreeCureOutput]:
        """Run FreeCure. Arguments follow diffusers' text-to-image pipelines.

        Args:
            prompt: the user prompt, e.g. "a man with black curly hair, laughing happily".
            reference_images: the identity's reference photo(s) (paths, PIL images or arrays).
            class_word: the subject's class word in the prompt ("man", "woman", …); None: the
                first common one found in the prompt (:func:`freecure.attributes.detect_class_word`).
            trigger_word: the personalization trigger after the class word (PhotoMaker: "img").
            negative_prompt: the unconditional branch's prompt.
            num_inference_steps: T, at least 2.
            guidance_scale: classifier-free guidance scale of FD and PD; for guidance-distilled
                FLUX the embedded guidance (3.5 for FLUX.1-dev).
            guidance_rescale: diffusers' guidance rescale φ (0 = off).
            height, width: image size in pixels; default from the denoiser's sample size.
            generator: seeds z_T (drawn on the generator's device, then moved); for several
                images a list of one generator per image (as diffusers), image k then equals
                a one-image run with generator k. One generator for several images draws
                their z_T one after the other.
            latents: z_T itself, overriding ``generator`` ((n, …) for n images).
            inject_step: override the backend's identity-injection step (for ablations).
            true_cfg_scale: FLUX's true classifier-free guidance with ``negative_prompt``
                (1 = off: one row per lane); must stay 1 for Stable Diffusion.
            num_images_per_prompt: n images (seeds) that share every denoiser call of every
                stage (:meth:`freecure.sampling.BatchLayout.for_images`), each with its own
                masks and its own stage skipping.

        Returns:
            One :class:`FreeCureOutput`; for ``num_images_per_prompt`` > 1 a list of them, one
            per image, whose stage records are the shared batch's.
        """
        arguments = dict(locals())
        arguments.pop("self")
        self._check_arguments(**arguments)
        counter = UNetCounter()
        ctx = self._context(counter, **arguments)
        with counter.attached(self.backend.unets()):
            self._prepare(ctx, guidance_scale, inject_step, negative_prompt, reference_images)
            z_T = self._initial_latents(ctx, generator, latents)
            same = self.same_pass.run(ctx, z_T)  # 1. SAME pass: FD and PD from one z_T
            self.masks.run(ctx)  # 2. ℳ of eq. 4–5 per image
            corrected = self.correction.run(ctx, same)  # 3. ROFA or FASA
            z_out = corrected.latents
            if self.expression is not None:  # 4. expression restore / APG
                z_out = self.expression.run(ctx, z_out)
            else:
                ctx.records.skip("expression", self._expression_off_reason())
        for k, output in enumerate(ctx.outputs):
            output.latents["freecure"] = z_out[k : k + 1]
        return self._finish(ctx, corrected, arguments)

    # -- the call, around the stages -------------------------------------------------------
    def _check_arguments(self, **arguments) -> None:
        """Every call argument checked before any model call (one clear message each)."""
        n, generator, latents = arguments["num_images_per_prompt"], arguments["generator"], arguments["latents"]
        if isinstance(n, bool) or not isinstance(n, int):
            raise InputError(f"num_images_per_prompt must be an integer, got {n!r}")
        if n < 1:
            raise InputError(f"num_images_per_prompt must be at least 1, got {n}")
        if isinstance(generator, Sequence) and len(generator) != n:
            raise InputError(f"{len(generator)} generators were given for {n} images; give one per image")
        if latents is not None and latents.shape[0] != n:
            raise InputError(f"latents hold {latents.shape[0]} images, num_images_per_prompt is {n}")
        steps = arguments["num_inference_steps"]
        check_number("num_inference_steps", steps, 2, self.pipeline.scheduler.config.num_train_timesteps, integer=True)
        if arguments["inject_step"] is not None:
            check_number("inject_step", arguments["inject_step"], 0, steps - 1, integer=True)
        check_number("guidance_scale", arguments["guidance_scale"], 0.0)
        check_number("guidance_rescale", arguments["guidance_rescale"], 0.0, 1.0)
        check_number("true_cfg_scale", arguments["true_cfg_scale"], 0.0)
        for name in ("height", "width"):
            if arguments[name] is not None:
                check_number(name, arguments[name], 1, integer=True)
        if latents is not None and not torch.isfinite(latents).all():
            raise InputError("latents hold NaN or infinite values")
        check_scheduler(self.pipeline.scheduler)

    def _context(self, counter: UNetCounter, **a) -> RunContext:
        """The run's context: sizes, guidance, parsed prompt and empty outputs (no model call)."""
        family, pipeline = self.backend.family, self.pipeline
        height, width = (a["height"] or self.default_size()[0]), (a["width"] or self.default_size()[1])
        multiple = family.size_multiple(pipeline)
        if height % multiple or width % multiple:
            raise InputError(f"height and width must be multiples of {multiple}, got {height}×{width}")
        guidance = family.loop_guidance(a["guidance_scale"], a["true_cfg_scale"], a["guidance_rescale"])
        self.correction.check_guidance(guidance)
        class_word = a["class_word"] or detect_class_word(a["prompt"])
        parsed = parse_prompt(a["prompt"], class_word, trigger=a["trigger_word"], tokenizer=self.backend.tokenizer)
        for word in parsed.unknown_words:
            logger.warning("word %r of the prompt is not in the attribute vocabulary; it is left to the model", word)
        n = a["num_images_per_prompt"]
        return RunContext(
            backend=self.backend,
            face_parser=self.face_parser,
            config=self.config,
            parsed=parsed,
            conditions=None,
            guidance=guidance,
            scheduler=pipeline.scheduler,
            image_size=(height, width),
            latent_size=family.latent_size(pipeline, height, width),
            outputs=[FreeCureOutput(images={}, parsed=parsed, notes=[]) for _ in range(n)],
            records=StageRecorder(counter),
            progress=Progress(self.progress, self.progress_callback),
            num_inference_steps=a["num_inference_steps"],
        )

    def _prepare(self, ctx: RunContext, guidance_scale, inject_step, negative_prompt, reference_images) -> None:
        """Encode every conditioning once and set the scheduler's timesteps."""
        # for predictions that depend on w: Face-diffuser's saliency, FLUX's guidance embedding
        self.backend.guidance_scale = guidance_scale
        references = [load_image(image) for image in reference_images]
        conditions = self.backend.conditions(ctx.parsed, references, ctx.num_inference_steps, negative_prompt)
        conditions = conditions.to(self.backend.device, self.backend.dtype)
        ctx.conditions = conditions if inject_step is None else replace(conditions, inject_step=inject_step)
        ctx.family.set_timesteps(ctx.scheduler, ctx.num_inference_steps, self.backend.device, ctx.latent_size)

    def _initial_latents(self, ctx: RunContext, generator, latents) -> torch.Tensor:
        """z_T of n images, (n, …): one draw per image (image k from ``generator[k]`` when a list
        is given, so that it equals a one-image run with that generator)."""
        family, pipeline, device, dtype = ctx.family, ctx.pipeline, self.backend.device, self.backend.dtype
        if latents is not None:
            return family.initial_latents(pipeline, ctx.scheduler, ctx.latent_size, None, device, dtype, latents)
        generators = list(generator) if isinstance(generator, Sequence) else [generator] * ctx.images
        draws = [family.initial_latents(pipeline, ctx.scheduler, ctx.latent_size, g, device, dtype) for g in generators]
        return torch.cat(draws)

    def _expression_off_reason(self) -> str:
        if self.config.expression is False:
            return "the expression stage is off (expression=False, --expression off)"
        return (
            f"method {self.config.method}: off by default after {self.config.method.upper()} (the released code's "
            "schedule has none); expression=True / --expression on adds it"
        )

    def _finish(self, ctx: RunContext, corrected, a) -> FreeCureOutput | list[FreeCureOutput]:
        """Each output's settings, notes and stage records (an image the correction left alone
        says so in its own record)."""
        n, config = ctx.images, self.config
        settings = dict(
            backend=self.backend.name,
            prompt=a["prompt"],
            class_word=ctx.parsed.class_word,
            trigger_word=a["trigger_word"],
            negative_prompt=a["negative_prompt"],
            num_inference_steps=ctx.num_inference_steps,
            guidance_scale=a["guidance_scale"],
            guidance_rescale=a["guidance_rescale"],
            true_cfg_scale=a["true_cfg_scale"],
            family=ctx.family.name,
            height=ctx.image_size[0],
            width=ctx.image_size[1],
            inject_step=ctx.conditions.inject_step,
            scheduler=type(ctx.scheduler).__name__,
            gamma=config.gamma,
            expression_guidance_scale=config.expression_scale(ctx.guidance.scale),
            inversion_guidance_scale=config.inversion_guidance_scale,
            approximate_shared_uncond=config.approximate_shared_uncond,
            pd_region=config.pd_region,
            attention_aggregation=config.attention_aggregation,
            method=config.method,
            **self.correction.settings(),
            expression=self.expression is not None,
        )
        if n > 1:
            settings.update(num_images_per_prompt=n)
        for k, output in enumerate(ctx.outputs):
            if not ctx.parsed.attributes:
                output.notes.append("the prompt names no attribute FreeCure can cure: the result is PD unchanged")
            output.stages = [
                StageRecord(record.name, ran=False, reason=f"{corrected.reason} (this image's PD is kept)")
                if record.name == self.correction.name and record.ran and k not in corrected.corrected
                else record
                for record in ctx.records.records
            ]
            if n > 1:
                output.notes.append(
                    f"image {k + 1} of {n} sharing every model call; stage times and calls are the whole batch's"
                )
            output.settings = dict(settings, image_index=k) if n > 1 else dict(settings)
        return ctx.outputs[0] if n == 1 else ctx.outputs


#: names of this module before the stages moved out (one release)
__getattr__ = moved_names(__name__, ["freecure.stages.records", "freecure.stages.decode", "freecure.core.errors"])
