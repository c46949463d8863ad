"""FreeCurePipeline: the paper's stages in order (Figure 5).

1. SAME pass — FD and PD denoise together from one z_T; FD's up-block cross-attention on the
   attribute tokens is recorded, FD's guided ε and the injection-step state are cached.
2. Masks — decode FD and PD, parse both with Ψ, build ℳ_i (eq. 4) and merge them (eq. 5).
3. ROFA noise blending — restart PD at the injection step with ε_p ← ℳ·ε_f + (1−ℳ)·ε_p (eq. 6).
4. Expression restore — DDIM-invert the blended latent with the template prompt to γ·T and
   denoise it with the expression prompt, without identity (§4.2).

Stages with nothing to do are skipped and :class:`FreeCureOutput` says why. The same stages
run on Stable Diffusion UNets and on FLUX: what differs lives in ``backend.family``
(:mod:`freecure.families`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from PIL import Image
from tqdm.auto import tqdm

from .attention.capture import AGGREGATIONS, AttentionStore
from .backends.base import Backend, check_one_batch
from .core.attributes import ParsedPrompt, detect_class_word, parse_prompt
from .core.conditioning import Conditions, TextConditioning
from .core.deprecation import moved_names
from .core.errors import InputError, check_number
from .core.guidance import FD_LANE, PD_LANE
from .core.images import ImageInput, load_image
from .parsing import FaceParser, ParseResult
from .stages.decode import decode_latents
from .stages.expression import expression_restore, inversion_steps
from .stages.fasa import FasaConfig, fasa_stage
from .stages.masks import PD_REGION_MODES, attribute_mask, merge_masks, placement_region, to_latent_resolution
from .stages.records import StageRecord, UNetCounter, _ReportingBar, _Stages
from .stages.sampling import check_scheduler, rofa_pass, same_pass

logger = logging.getLogger(__name__)

#: Correction methods after the SAME pass (``FreeCureConfig.method``).
METHODS = ("rofa", "fasa")


@dataclass(frozen=True)
class FreeCureConfig:
    """FreeCure's own settings (the diffusion settings are call arguments).

    Attributes:
        gamma: γ of §4.2: the expression stage inverts and re-denoises round(γ·T) of the T
            steps. Must lie in (0, 1].
        inversion_guidance_scale: guidance scale of the expression stage's DDIM inversion with
            the template prompt; 1.0 (no CFG, the default) keeps the inversion closest to exact
            (see :mod:`freecure.inversion`).
        expression_guidance_scale: guidance scale of the re-denoising with the expression
            prompt; None (default) = the run's ``guidance_scale`` (the backend's, from the CLI):
            the expression comes from the foundation model's guided controllability (§4.2).
            ``inversion_guidance_scale=1.0, expression_guidance_scale=1.0`` is the former
            single-setting behaviour.
        approximate_shared_uncond: after injection, evaluate the unconditional branch once, on
            PD's latent, for both lanes (3 batch rows instead of 4). PD stays exact; FD's
            guidance becomes approximate. Off by default.
        attention_layers: names of the attention processors to capture; None = every
            cross-attention layer of the UNet's up-sampling blocks (the paper's choice), or
            for FLUX every double-stream block's joint attention (docs/engine.md).
        pd_region: PD's factor of eq. 4. ``"placement"`` (default): where the attribute
            belongs on PD's face (:func:`freecure.masks.placement_region`), so an accessory
            PD failed to draw can be restored; ``"literal"``: the attribute's own class in PD's
            image, Ψ(I_p)_i as eq. 4 reads, which skips any attribute PD did not draw.
        attention_aggregation: how H_i averages the captured layers: ``"per_resolution"``
            (default; each resolution weighs the same) or ``"per_layer"`` (every layer the same,
            so SDXL's 30 layers at 32² outweigh its 6 at 64²). See :class:`AttentionStore`.
        method: the correction after the SAME pass: ``"rofa"`` (the paper: ROFA + expression
            restore) or ``"fasa"`` (the authors' released code: foundation-aware
            self-attention, :mod:`freecure.fasa`).
        fasa: settings of the FASA method.
    """

    gamma: float = 0.5
    expression_guidance_scale: float | None = None
    inversion_guidance_scale: float = 1.0
    approximate_shared_uncond: bool = False
    attention_layers: tuple[str, ...] | None = None
    pd_region: str = "placement"
    attention_aggregation: str = "per_resolution"
    method: str = "rofa"
    fasa: FasaConfig = FasaConfig()

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.attention_aggregation not in AGGREGATIONS:
            raise InputError(
                f"attention_aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.attention_aggregation!r}"
            )
        if self.pd_region not in PD_REGION_MODES:
            raise InputError(f"pd_region must be one of {', '.join(PD_REGION_MODES)}, got {self.pd_region!r}")
        check_number("gamma", self.gamma, 0.0, 1.0, open_minimum=True)
        if self.expression_guidance_scale is not None:
            check_number("expression_guidance_scale", self.expression_guidance_scale, 1.0)
        check_number("inversion_guidance_scale", self.inversion_guidance_scale, 1.0)


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


class FreeCurePipeline:
    """FreeCure on top of a personalization backend.

    Args:
        backend: the personalization method (:class:`freecure.backends.Backend`).
        face_parser: Ψ, mapping an image to a face-parsing label map.
        config: FreeCure's own settings.

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
        if self.config.method == "fasa":  # fail now, not after the SAME pass
            if not backend.fasa_across_calls:
                check_one_batch(backend)
            for denoiser in backend.fasa_denoisers():
                backend.family.fasa_layers(denoiser, self.config.fasa.layers)
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

    def _bar(self, total: int, desc: str):
        bar = tqdm(total=total, desc=desc, disable=not self.progress, leave=False)
        return bar if self.progress_callback is None else _ReportingBar(bar, desc, total, self.progress_callback)

    def expression_guidance(self, guidance_scale: float) -> float:
        """Guidance of the expression re-denoising: the config's, else the run's loop guidance
        (Stable Diffusion: the CFG scale w; FLUX: ``true_cfg_scale``, its distilled guidance
        being an embedding that every FLUX call already carries)."""
        configured = self.config.expression_guidance_scale
        return guidance_scale if configured is None else configured

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
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
            raise InputError(f"num_images_per_prompt must be an integer, got {num_images_per_prompt!r}")
        if num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        if isinstance(generator, Sequence) and len(generator) != num_images_per_prompt:
            raise InputError(
                f"{len(generator)} generators were given for {num_images_per_prompt} images; give one per image"
            )
        if latents is not None and latents.shape[0] != num_images_per_prompt:
            raise InputError(
                f"latents hold {latents.shape[0]} images, num_images_per_prompt is {num_images_per_prompt}"
            )
        pipeline = self.pipeline
        trained = pipeline.scheduler.config.num_train_timesteps
        check_number("num_inference_steps", num_inference_steps, 2, trained, integer=True)
        if inject_step is not None:
            check_number("inject_step", inject_step, 0, num_inference_steps - 1, integer=True)
        check_number("guidance_scale", guidance_scale, 0.0)
        check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)
        check_number("true_cfg_scale", true_cfg_scale, 0.0)
        for name, side in (("height", height), ("width", width)):
            if side is not None:
                check_number(name, side, 1, integer=True)
        if latents is not None and not torch.isfinite(latents).all():
            raise InputError("latents hold NaN or infinite values")
        family = self.backend.family
        check_scheduler(pipeline.scheduler)
        height, width = (height or self.default_size()[0]), (width or self.default_size()[1])
        multiple = family.size_multiple(pipeline)
        if height % multiple or width % multiple:
            raise InputError(f"height and width must be multiples of {multiple}, got {height}×{width}")
        guidance = family.loop_guidance(guidance_scale, true_cfg_scale, guidance_rescale)
        if self.config.method == "fasa" and self.config.fasa.uncond and not guidance.cfg:
            raise InputError(
                "FASA's uncond option changes PD's unconditional row, but this run has none (guidance-distilled "
                "FLUX without true CFG, or a guidance scale of 1); drop it or set true_cfg_scale > 1"
            )
        references = [load_image(image) for image in reference_images]
        class_word = class_word or detect_class_word(prompt)
        parsed = parse_prompt(prompt, class_word, trigger=trigger_word, tokenizer=self.backend.tokenizer)
        for word in parsed.unknown_words:
            logger.warning("word %r of the prompt is not in the attribute vocabulary; it is left to the model", word)

        counter = UNetCounter()
        stages = _Stages(counter)
        n = num_images_per_prompt
        outputs = [FreeCureOutput(images={}, parsed=parsed, notes=[]) for _ in range(n)]
        image_size = (height, width)
        latent_size = family.latent_size(pipeline, height, width)
        # for predictions that depend on w: Face-diffuser's saliency, FLUX's guidance embedding
        self.backend.guidance_scale = guidance_scale

        with counter.attached(self.backend.unets()):
            conditions = self.backend.conditions(parsed, references, num_inference_steps, negative_prompt)
            device, dtype = self.backend.device, self.backend.dtype
            conditions = _to(conditions, device, dtype)
            if inject_step is not None:
                conditions = replace(conditions, inject_step=inject_step)
            scheduler = pipeline.scheduler
            family.set_timesteps(scheduler, num_inference_steps, device, latent_size)
            z_T = _initial_latents(family, pipeline, scheduler, latent_size, generator, device, dtype, latents, n)

            # 1. SAME pass: FD and PD from one z_T per image, FD's attention captured.
            columns = tuple(sorted({i for a in parsed.attributes for i in a.token_indices}))
            aggregation = self.config.attention_aggregation
            store = AttentionStore(columns, latent_size, aggregation=aggregation) if columns else None
            with stages.run("same_pass") as record, self._bar(num_inference_steps, "SAME: FD+PD") as bar:
                capture = (
                    family.attention_capture(self.backend.denoiser, store, self.config.attention_layers)
                    if store is not None
                    else contextlib.nullcontext()
                )
                with capture:
                    same = same_pass(
                        self.backend,
                        scheduler,
                        z_T,
                        conditions,
                        guidance,
                        image_size,
                        store,
                        self.config.approximate_shared_uncond,
                        on_step=lambda i: bar.update(),
                    )
                record.freecure_bytes = same.stored_bytes() + (0 if store is None else store.stored_bytes())
            decoded = decode_latents(pipeline, same.z0, image_size)
            for k, output in enumerate(outputs):
                fd_image, pd_image = decoded[FD_LANE * n + k], decoded[PD_LANE * n + k]
                output.images.update(fd=fd_image, pd=pd_image, blended=pd_image, freecure=pd_image)
                output.latents.update(fd=same.fd[k : k + 1], pd=same.pd[k : k + 1])
                if store is not None:
                    output.attention_maps = {a.text: store.token_map(a.token_indices, k) for a in parsed.attributes}
            z_out = same.pd

            # 2. SAME masks: parse both images, eq. (4) per attribute, eq. (5) merge; per image.
            if parsed.localized:
                with stages.run("masks") as record:
                    for output in outputs:
                        self._build_masks(output, output.images["fd"], output.images["pd"], latent_size)
                    record.freecure_bytes = sum(_mask_bytes(output) for output in outputs)
            else:
                stages.skip("masks", "the prompt names no localized attribute")

            # 3. ROFA noise blending from the injection step, with the cached ε_f. Images share
            # the pass; an image whose mask is empty (nothing found) keeps its PD latent as is.
            blended = [k for k, output in enumerate(outputs) if output.latent_mask is not None]
            unblended_reason = (
                "no localized attribute was found in both the FD and the PD image"
                if parsed.localized
                else "the prompt names no localized attribute"
            )
            if self.config.method == "fasa":  # 3'. The authors' FASA regeneration instead of ROFA
                z_out, blended, unblended_reason = fasa_stage(
                    self, outputs, same, conditions, guidance, image_size, stages
                )
            elif not blended:
                stages.skip("rofa", unblended_reason)
            else:
                steps = num_inference_steps - conditions.inject_step
                mask = torch.cat(
                    [
                        torch.zeros(1, 1, *latent_size) if output.latent_mask is None else output.latent_mask.cpu()
                        for output in outputs
                    ]
                ).to(device)
                with stages.run("rofa") as record, self._bar(steps, "ROFA: blend") as bar:
                    z_rofa = rofa_pass(
                        self.backend,
                        same,
                        conditions,
                        family.model_mask(mask, same.z0),
                        guidance,
                        image_size,
                        on_step=lambda i: bar.update(),
                    )
                    record.freecure_bytes = mask.numel() * mask.element_size()
                z_out = torch.cat([z_rofa[k : k + 1] if k in blended else same.pd[k : k + 1] for k in range(n)])
                images = decode_latents(pipeline, z_rofa[blended], image_size)
                for k, image in zip(blended, images):
                    outputs[k].images["blended"] = outputs[k].images["freecure"] = image
                    outputs[k].latents["blended"] = z_out[k : k + 1]

            # 4. Expression restore: invert with the template prompt, denoise with the expression.
            if self.config.method == "fasa":
                stages.skip("expression", "method fasa: the authors' FASA schedule has no expression stage")
            elif parsed.abstract:
                steps = inversion_steps(num_inference_steps, self.config.gamma)
                with stages.run("expression") as record, self._bar(2 * steps, "Expression: invert+denoise") as bar:
                    z_out = expression_restore(
                        self.backend,
                        z_out,
                        conditions.template,
                        conditions.expression,
                        conditions.uncond,
                        scheduler.config,
                        num_inference_steps,
                        self.config.gamma,
                        self.expression_guidance(guidance.scale),
                        image_size,
                        on_step=lambda i: bar.update(),
                        inversion_guidance_scale=self.config.inversion_guidance_scale,
                    )
                    record.freecure_bytes = z_out.numel() * z_out.element_size()
                for output, image in zip(outputs, decode_latents(pipeline, z_out, image_size)):
                    output.images["freecure"] = image
            else:
                stages.skip("expression", "the prompt names no abstract attribute (expression)")
            for k, output in enumerate(outputs):
                output.latents["freecure"] = z_out[k : k + 1]

        settings = dict(
            backend=self.backend.name,
            prompt=prompt,
            class_word=parsed.class_word,
            trigger_word=trigger_word,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            true_cfg_scale=true_cfg_scale,
            family=family.name,
            height=height,
            width=width,
            inject_step=conditions.inject_step,
            scheduler=type(scheduler).__name__,
            gamma=self.config.gamma,
            expression_guidance_scale=self.expression_guidance(guidance.scale),
            inversion_guidance_scale=self.config.inversion_guidance_scale,
            approximate_shared_uncond=self.config.approximate_shared_uncond,
            pd_region=self.config.pd_region,
            attention_aggregation=self.config.attention_aggregation,
            method=self.config.method,
            fasa=asdict(self.config.fasa) if self.config.method == "fasa" else None,
        )
        if n > 1:
            settings.update(num_images_per_prompt=n)
        for k, output in enumerate(outputs):
            if not parsed.attributes:
                output.notes.append("the prompt names no attribute FreeCure can cure: the result is PD unchanged")
            output.stages = [
                StageRecord(record.name, ran=False, reason=f"{unblended_reason} (this image's PD is kept)")
                if record.name in ("rofa", "fasa") and record.ran and k not in blended
                else record
                for record in stages.records
            ]
            if n > 1:
                output.notes.append(
                    f"image {k + 1} of {n} sharing every model call; stage times and calls are the whole batch's"
                )
            output.settings = dict(settings, image_index=k) if n > 1 else dict(settings)
        return outputs[0] if n == 1 else outputs

    def _build_masks(self, output: FreeCureOutput, fd_image, pd_image, latent_size) -> None:
        """Eq. (4) for every localized attribute with a region in both images, eq. (5) to merge.

        FD's factor is the attribute's own class in FD's image; PD's factor is its own class
        (``pd_region="literal"``) or where it belongs on PD's face (``"placement"``).
        """
        parse_fd, parse_pd = _parse_images(self.face_parser, [fd_image, pd_image])
        output.parse_fd, output.parse_pd = parse_fd, parse_pd
        for parse, name in ((parse_fd, "FD"), (parse_pd, "PD")):
            if not parse.face_found:
                output.notes.append(f"{name} image: {parse.note}")
        for attribute in output.parsed.localized:
            region_fd = torch.from_numpy(parse_fd.mask(attribute.parse_classes))
            if self.config.pd_region == "placement":
                region_pd = placement_region(
                    lambda names: torch.from_numpy(parse_pd.mask(names)), attribute.category, attribute.parse_classes
                )
            else:
                region_pd = torch.from_numpy(parse_pd.mask(attribute.parse_classes))
            missing = [name for name, region in (("FD", region_fd), ("PD", region_pd)) if not region.any()]
            if missing:
                output.notes.append(
                    f"attribute {attribute.text!r}: no {'/'.join(attribute.parse_classes)} region in the "
                    f"{' and '.join(missing)} image; it is not blended"
                )
                continue
            heat = output.attention_maps[attribute.text]
            output.attribute_masks[attribute.text] = attribute_mask(heat, region_pd, region_fd)
        if output.attribute_masks:
            output.mask = merge_masks(list(output.attribute_masks.values()))
            output.latent_mask = to_latent_resolution(output.mask, latent_size)


def _initial_latents(family, pipeline, scheduler, latent_size, generator, device, dtype, latents, n: int):
    """z_T of n images, (n, …): one draw per image (image k from ``generator[k]`` when a list
    is given, so that it equals a one-image run with that generator)."""
    if latents is not None:
        return family.initial_latents(pipeline, scheduler, latent_size, None, device, dtype, latents)
    generators = list(generator) if isinstance(generator, Sequence) else [generator] * n
    draws = [family.initial_latents(pipeline, scheduler, latent_size, g, device, dtype) for g in generators]
    return torch.cat(draws)


def _mask_bytes(output: FreeCureOutput) -> int:
    """Bytes of one image's masks and attention maps (FreeCure's own memory)."""
    tensors = [*output.attribute_masks.values(), *output.attention_maps.values(), output.mask, output.latent_mask]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _to(conditions: Conditions, device, dtype) -> Conditions:
    """Move every conditioning to the UNet's device and dtype."""
    changes = {
        f.name: getattr(conditions, f.name).to(device, dtype)
        for f in fields(conditions)
        if isinstance(getattr(conditions, f.name), TextConditioning)
    }
    return replace(conditions, **changes)


def _parse_images(parser: FaceParser, images: Sequence[Image.Image]) -> list[ParseResult]:
    """Ψ of several images, batched when the parser can."""
    batch = getattr(parser, "parse_batch", None)
    return list(batch(images)) if batch is not None else [parser(image) for image in images]


#: names of this module before the stages moved out (one release)
__getattr__ = moved_names(__name__, ["freecure.stages.records", "freecure.stages.decode", "freecure.core.errors"])
