"""FLUX.2: a flow-matching MMDiT on patchified latents (:class:`Flux2Family`), as diffusers'
``Flux2KleinPipeline`` (FLUX.2 [klein]: a Qwen3 text encoder, real classifier-free guidance unless
step-distilled) and ``Flux2Pipeline`` (FLUX.2 [dev]: a Mistral-3 text encoder, guidance-distilled
with an embedded guidance scale) compute it.

Where FLUX.2 differs from FLUX.1 (:mod:`freecure.families.flux`):

- latents: the VAE's (C, h, w) latent is *patchified* channel-major to (4C, h/2, w/2)
  (``_patchify_latents``: channel c·4 + 2·dy + dx), batch-normalised with the VAE's running
  statistics, then flattened to h/2·w/2 tokens of 4C values (``_pack_latents``); z_T is drawn in
  the patchified shape, so a generator gives the pipeline's own noise;
- position ids: four coordinates (t, h, w, l) for image and text tokens; references take
  t = 10, 20, … (``_prepare_image_ids``);
- text: one text encoder, its hidden states at several layers stacked
  (``text_encoder_out_layers``), the prompt wrapped in a chat template first
  (:class:`ChatTemplateTokenizer` gives the token columns the encoder sees); no pooled embedding;
- schedule: σ = linspace(1, 1/T, T) shifted by ``compute_empirical_mu(image tokens, T)``;
- guidance: [dev] embeds the guidance scale (one row per lane, like FLUX.1-dev); [klein] base
  runs real CFG with ``guidance_scale`` against the empty prompt (two rows per lane); a
  step-distilled [klein] takes one row and ignores the scale. ``loop_guidance`` has no pipeline
  argument, so the family object of a pipeline carries that fact (:meth:`Flux2Family.for_pipeline`,
  which :func:`freecure.families.family_of` calls).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from diffusers.utils.torch_utils import get_module_execution_device

from ..core.errors import InputError
from .base import ModelFamily, _vae_decode
from .flux import FlowEulerInverseScheduler, FluxFamily

#: What ``Flux2KleinPipeline`` / ``Flux2Pipeline`` use when ``__call__`` gets no value.
DEFAULT_GUIDANCE_SCALE = 4.0
MAX_SEQUENCE_LENGTH = 512
#: Reference photos larger than this many pixels are resized to it (both pipelines' step 4).
MAX_REFERENCE_AREA = 1024 * 1024


def _pipeline_statics():
    """The class whose static methods define FLUX.2's latent layout (``Flux2Pipeline``'s are the
    originals; ``Flux2KleinPipeline``'s are "Copied from" them)."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline


def patchify_pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2·w/2, 4C): ``_patchify_latents`` then ``_pack_latents``."""
    statics = _pipeline_statics()
    return statics._pack_latents(statics._patchify_latents(latents))


def flux2_timesteps(scheduler, num_inference_steps: int, device, image_seq_len: int) -> None:
    """The FLUX.2 pipelines' schedule (their step 6): σ = linspace(1, 1/T, T) (the scheduler's own
    when it uses flow sigmas), shifted by μ = ``compute_empirical_mu(image tokens, T)``."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_inference_steps)
    if scheduler.config.get("use_flow_sigmas", False):
        scheduler.set_timesteps(num_inference_steps, device=device, mu=mu)
    else:
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)


def _latent_bn(vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's batch norm over the patchified channels, (1, 4C, 1, 1), as the
    pipelines' ``_encode_vae_image`` and decoding compute them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(device, dtype), std.to(device, dtype)


def _is_dev(pipeline) -> bool:
    """Whether the pipeline encodes text like ``Flux2Pipeline`` (Mistral-3, ``format_input``
    with a system message) rather than like ``Flux2KleinPipeline`` (Qwen3)."""
    return hasattr(pipeline, "_get_mistral_3_small_prompt_embeds")


class ChatTemplateTokenizer:
    """A FLUX.2 pipeline's tokenizer as its text encoder sees a prompt: ``text`` wrapped in the
    pipeline's chat template, then tokenized, with offsets mapped back into ``text``.

    Token column i is the i-th token of the sequence the text encoder reads (template tokens
    included), which is what FreeCure's attribute columns index
    (:func:`freecure.core.attributes.token_indices_for_spans`); template tokens get the empty
    offset (0, 0), like special tokens. Attributes it does not define (``bos_token_id``,
    ``convert_ids_to_tokens``, ``decode``, …) are the wrapped tokenizer's.

    Args:
        tokenizer: the text tokenizer (``Flux2Pipeline``'s ``PixtralProcessor``'s ``.tokenizer``).
        render: prompt → the templated string the pipeline tokenizes (the prompt inside it
            verbatim, less ``remove``).
        model_max_length: tokens the pipeline feeds its encoder (``max_sequence_length``).
        add_special_tokens: templated string → whether the pipeline's tokenization adds the
            tokenizer's special tokens (a processor's ``apply_chat_template`` does not when the
            template starts with BOS).
        remove: a substring the pipeline deletes from the prompt before templating it
            (``format_input`` deletes "[IMG]"); None: the prompt is templated as it is.
    """

    _SENTINEL = "\ue000"  # a private-use character: no template or prompt holds it

    def __init__(
        self,
        tokenizer,
        render: Callable[[str], str],
        model_max_length: int,
        add_special_tokens: Callable[[str], bool] = lambda rendered: True,
        remove: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.render = render
        self.model_max_length = model_max_length
        self._add_special_tokens = add_special_tokens
        self._remove = remove

    def __getattr__(self, name):
        if name == "tokenizer":  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def template(self, text: str) -> tuple[str, int, list[int]]:
        """(templated string, where the prompt starts in it, for each character of the prompt as
        templated its index in ``text``)."""
        positions, i = [], 0
        while i < len(text):  # str.replace(remove, ""): non-overlapping, left to right
            if self._remove and text.startswith(self._remove, i):
                i += len(self._remove)
                continue
            positions.append(i)
            i += 1
        prefix, suffix = self.render(self._SENTINEL).split(self._SENTINEL)
        rendered = self.render(text)
        if rendered != prefix + "".join(text[i] for i in positions) + suffix:
            raise ValueError("the chat template changes the prompt it wraps; its token columns are unknown")
        return rendered, len(prefix), positions

    def __call__(self, text: str, return_offsets_mapping: bool = False, add_special_tokens: bool = True, **kwargs):
        """Tokenize ``text`` as the pipeline does (template always applied: it is what the encoder
        reads, so ``add_special_tokens`` is accepted and ignored); ``offset_mapping`` in ``text``."""
        if not isinstance(text, str):
            raise TypeError("ChatTemplateTokenizer takes one prompt (a str)")
        kwargs.pop("verbose", None)
        rendered, start, positions = self.template(text)
        encoding = self.tokenizer(
            rendered,
            add_special_tokens=self._add_special_tokens(rendered),
            return_offsets_mapping=True,
            **kwargs,
        )
        end = start + len(positions)
        offsets = []
        for token_start, token_end in encoding["offset_mapping"]:
            a, b = max(token_start, start), min(token_end, end)
            offsets.append((positions[a - start], positions[b - 1 - start] + 1) if a < b else (0, 0))
        if return_offsets_mapping:
            encoding["offset_mapping"] = offsets
        else:
            del encoding["offset_mapping"]
        return encoding


class Flux2Family(ModelFamily):
    """FLUX.2 ([klein] and [dev]): a rectified-flow MMDiT on patchified, packed latents.

    The prediction is the flow velocity v = ε − x₀, as for FLUX.1, so CFG and ROFA's blend apply
    to it unchanged. Rows per lane (:meth:`loop_guidance`): [klein] base (``cfg``) runs real CFG
    with ``guidance_scale`` (two rows: the empty prompt, then the prompt); [dev] embeds
    ``Backend.guidance_scale`` and takes one row (``true_cfg_scale`` > 1 adds true CFG, as for
    FLUX.1); a step-distilled [klein] takes one row and ignores the scale.

    The family of a pipeline is :meth:`for_pipeline`'s (what :func:`~freecure.families.family_of`
    returns); the module's :data:`FLUX2` is [dev]'s reading with the pipelines' default layers.

    Args:
        max_sequence_length: text tokens per prompt (the pipelines' default, 512: every prompt
            is padded to it).
        cfg: whether ``guidance_scale`` is a real CFG scale ([klein] base).
        text_encoder_out_layers: hidden-state indices stacked into the prompt embedding; None:
            the pipeline's attribute ``text_encoder_out_layers`` if it has one (the tiny
            pipelines), else its ``__call__`` default ((9, 18, 27) klein, (10, 20, 30) dev).
    """

    name = "flux2"
    prediction_type = "flow"
    default_steps = 50
    schedulers = ("flow-euler",)
    default_scheduler = "flow-euler"
    default_embedded_guidance = DEFAULT_GUIDANCE_SCALE

    def __init__(
        self,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        cfg: bool = False,
        text_encoder_out_layers: tuple[int, ...] | None = None,
    ):
        self.max_sequence_length = max_sequence_length
        self.cfg = cfg
        self.text_encoder_out_layers = None if text_encoder_out_layers is None else tuple(text_encoder_out_layers)

    def __repr__(self) -> str:
        return (
            f"Flux2Family(max_sequence_length={self.max_sequence_length}, cfg={self.cfg}, "
            f"text_encoder_out_layers={self.text_encoder_out_layers})"
        )

    def for_pipeline(self, pipeline) -> Flux2Family:
        """This family configured for ``pipeline``: ``cfg`` when it runs real CFG (no guidance
        embedding and not ``is_distilled``, as ``Flux2KleinPipeline.do_classifier_free_guidance``),
        the pipeline's ``text_encoder_out_layers`` attribute when it has one. One shared object
        per configuration."""
        config = pipeline.transformer.config
        cfg = not config.guidance_embeds and not pipeline.config.get("is_distilled", False)
        layers = self.text_encoder_out_layers or getattr(pipeline, "text_encoder_out_layers", None)
        return _configured(self.max_sequence_length, cfg, None if layers is None else tuple(layers))

    # -- components ---------------------------------------------------------------------
    def denoiser(self, pipeline):
        return pipeline.transformer

    def tokenizer(self, pipeline) -> ChatTemplateTokenizer:
        """The pipeline's tokenizer behind its chat template (:class:`ChatTemplateTokenizer`):
        [klein] ``apply_chat_template`` of one user turn with the generation prompt and thinking
        off; [dev] ``format_input`` with the pipeline's system message, through the processor."""
        if _is_dev(pipeline):
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            processor = pipeline.tokenizer
            text_tokenizer = processor.tokenizer
            bos = text_tokenizer.bos_token

            def render(text: str) -> str:
                conversation = format_input([text], system_message=pipeline.system_message)[0]
                return processor.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)

            return ChatTemplateTokenizer(
                text_tokenizer,
                render,
                self.sequence_length(pipeline),
                # ProcessorMixin.apply_chat_template: no special tokens when the template starts with BOS
                add_special_tokens=lambda rendered: not (bos is not None and rendered.startswith(bos)),
                remove="[IMG]",  # format_input deletes it
            )
        tokenizer = pipeline.tokenizer

        def render(text: str) -> str:
            messages = [{"role": "user", "content": text}]
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
            )

        return ChatTemplateTokenizer(tokenizer, render, self.sequence_length(pipeline))

    def sequence_length(self, pipeline) -> int:
        """Text tokens per prompt: ``max_sequence_length``, capped by the tokenizer's own limit
        (the real ones allow far more than 512; the tiny ones 128, to keep tiny runs small)."""
        tokenizer = pipeline.tokenizer
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # [dev]: the processor's text tokenizer
        return min(self.max_sequence_length, int(getattr(tokenizer, "model_max_length", self.max_sequence_length)))

    def out_layers(self, pipeline) -> tuple[int, ...]:
        """The text encoder's hidden-state indices stacked into the prompt embedding (see the
        class's ``text_encoder_out_layers``)."""
        if self.text_encoder_out_layers is not None:
            return self.text_encoder_out_layers
        layers = getattr(pipeline, "text_encoder_out_layers", None)
        if layers is None:
            layers = inspect.signature(type(pipeline).__call__).parameters["text_encoder_out_layers"].default
        return tuple(layers)

    # -- conditioning ---------------------------------------------------------------------
    def encode_text(self, backend, prompt: str):
        """The prompt's stacked hidden states (1, L, layers·width), by the pipeline's own
        ``encode_prompt`` (its text ids are recomputed in :meth:`model_inputs`)."""
        from ..core.conditioning import TextConditioning

        pipeline = backend.pipeline
        embeds, _ = pipeline.encode_prompt(
            prompt,
            device=backend.device,
            num_images_per_prompt=1,
            max_sequence_length=self.sequence_length(pipeline),
            text_encoder_out_layers=self.out_layers(pipeline),
        )
        return TextConditioning(embeds)

    def default_guidance_scale(self, pipeline) -> float:
        """The pipelines' ``__call__`` default, 4.0 (CFG scale for [klein] base, embedded for
        [dev]); 1.0 for a step-distilled [klein], which ignores it."""
        config = pipeline.transformer.config
        if not config.guidance_embeds and pipeline.config.get("is_distilled", False):
            return 1.0
        return DEFAULT_GUIDANCE_SCALE

    def loop_guidance(self, guidance_scale: float, true_cfg_scale: float = 1.0, rescale: float = 0.0):
        """[klein] base (``cfg``): CFG with ``guidance_scale`` when it exceeds 1, as
        ``Flux2KleinPipeline``; otherwise rows follow ``true_cfg_scale`` (1: one row per lane) and
        ``guidance_scale`` is embedded ([dev]) or ignored (distilled [klein])."""
        from ..core.guidance import Guidance

        if rescale:
            raise InputError("guidance_rescale is not used by FLUX.2; leave it at 0")
        if not true_cfg_scale >= 1.0 or true_cfg_scale == float("inf"):
            raise InputError(f"true_cfg_scale must be a finite number ≥ 1 (1 = off), got {true_cfg_scale}")
        if self.cfg:
            if true_cfg_scale != 1.0:
                raise InputError("FLUX.2 [klein] guides with guidance_scale itself; leave true_cfg_scale at 1")
            if not np.isfinite(guidance_scale):
                raise InputError(f"guidance_scale must be a finite number, got {guidance_scale}")
            return Guidance(scale=guidance_scale if guidance_scale > 1 else 1.0)
        return Guidance(scale=true_cfg_scale)

    # -- sizes and latents: FLUX.1's grid (VAE scale factor f, 2×2 patches) ------------------
    default_size = FluxFamily.default_size
    size_multiple = FluxFamily.size_multiple
    latent_size = FluxFamily.latent_size
    attention_grid = FluxFamily.attention_grid  # the h/2 × w/2 token grid

    def set_timesteps(self, scheduler, num_inference_steps, device, latent_size) -> None:
        flux2_timesteps(scheduler, num_inference_steps, device, (latent_size[0] // 2) * (latent_size[1] // 2))
        scheduler.set_begin_index(0)

    def initial_latents(self, pipeline, scheduler, latent_size, generator, device, dtype, latents=None):
        """z_T = ε as packed tokens (1, h/2·w/2, 4C), fp32: drawn in the patchified shape
        (1, 4C, h/2, w/2) exactly as ``prepare_latents`` draws it (so a generator gives the
        pipeline's noise), or ``latents`` given in that shape (the pipeline's ``latents``) or packed."""
        from diffusers.utils.torch_utils import randn_tensor

        channels = pipeline.transformer.config.in_channels  # 4C: the patchified channels
        h, w = latent_size
        if latents is None:
            latents = randn_tensor((1, channels, h // 2, w // 2), generator=generator, device=device, dtype=dtype)
        if latents.ndim == 4:
            latents = _pipeline_statics()._pack_latents(latents)
        return latents.to(device=device, dtype=torch.float32)

    def model_mask(self, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """ℳ (1, 1, h, w) repeated over the C latent channels, patchified and packed like the
        latents (:func:`patchify_pack`): (1, h/2·w/2, 4C), each value carrying ℳ at its own pixel."""
        channels = z.shape[-1] // 4
        return patchify_pack(mask.expand(mask.shape[0], channels, *mask.shape[-2:]).contiguous())

    # -- the network ------------------------------------------------------------------
    def model_inputs(self, backend, latents, timestep, rows, image_size, references=None) -> dict:
        """``Flux2Transformer2DModel.forward``'s arguments as the pipelines' loop passes them:
        4-D ids (t, h, w, l) per row (``_prepare_latent_ids``, ``_prepare_text_ids``), the
        guidance scale embedded where the transformer has ``guidance_embeds`` ([dev]);
        ``references`` appended after every row's image tokens and ids (their
        ``latent_model_input`` / ``latent_image_ids``)."""
        pipeline = backend.pipeline
        statics = _pipeline_statics()
        batch = latents.shape[0]
        embeds = torch.cat([row.prompt_embeds for row in rows])
        guidance = None
        if pipeline.transformer.config.guidance_embeds:
            scale = backend.guidance_scale if backend.guidance_scale is not None else self.default_embedded_guidance
            guidance = torch.full([batch], scale, device=latents.device, dtype=torch.float32)
        h, w = self.latent_size(pipeline, *image_size)
        grid = torch.empty(batch, 0, h // 2, w // 2)  # _prepare_latent_ids reads the shape only
        ids = statics._prepare_latent_ids(grid).to(latents.device)
        timestep = torch.as_tensor(timestep, device=latents.device).expand(batch).to(latents.dtype)
        hidden_states = latents
        if references is not None:
            tokens = references.latents.to(device=latents.device, dtype=latents.dtype).expand(batch, -1, -1)
            hidden_states = torch.cat([latents, tokens], dim=1)
            reference_ids = references.ids.to(device=ids.device, dtype=ids.dtype).expand(batch, -1, -1)
            ids = torch.cat([ids, reference_ids], dim=1)
        return dict(
            hidden_states=hidden_states,
            timestep=timestep / 1000,
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=statics._prepare_text_ids(embeds).to(latents.device),
            img_ids=ids,
            return_dict=False,
        )

    # -- reference images in context ---------------------------------------------------------
    reads_references = True

    def encode_references(self, pipeline, images, image_size):
        """The references as both FLUX.2 pipelines prepare ``image`` (their step 4 and
        ``prepare_image_latents``): checked (≥ 64 px a side, aspect ≤ 8), resized to at most
        1024² pixels, cropped to multiples of 2f, VAE-encoded to the posterior mode, patchified and
        batch-normalised (``_encode_vae_image``), packed; ids (t, h, w, 0) with t = 10 for the
        first reference, 20 for the second, … (``_prepare_image_ids``). ``image_size`` (the
        target's) plays no part: each reference keeps its own size."""
        from ..core.conditioning import ReferenceTokens

        processor, vae = pipeline.image_processor, pipeline.vae
        multiple = pipeline.vae_scale_factor * 2
        device = get_module_execution_device(vae)
        latents = []
        for image in images:
            try:
                processor.check_image_input(image)
            except ValueError as error:
                raise InputError(f"reference image {len(latents) + 1}: {error}") from None
            width, height = image.size
            if width * height > MAX_REFERENCE_AREA:
                image = processor._resize_to_target_area(image, MAX_REFERENCE_AREA)
                width, height = image.size
            width, height = width // multiple * multiple, height // multiple * multiple
            pixels = processor.preprocess(image, height=height, width=width, resize_mode="crop")
            with torch.no_grad():
                latents.append(pipeline._encode_vae_image(pixels.to(device=device, dtype=vae.dtype), generator=None))
        if not latents:
            raise InputError("no reference image given")
        ids = pipeline._prepare_image_ids(latents)[0]
        tokens = torch.cat([pipeline._pack_latents(latent) for latent in latents], dim=1)
        blocks = tuple(int(latent.shape[-2] * latent.shape[-1]) for latent in latents)
        return ReferenceTokens(tokens, ids, blocks)

    # the same block names and joint attention as FLUX.1 (double-stream, then single-stream
    # blocks); freecure.attention adapts to FLUX.2's fused single-stream projection
    def attention_capture(self, denoiser, store, layers):
        from ..attention.capture import capture_joint_attention

        return capture_joint_attention(denoiser, store, layers)

    def fasa_layers(self, denoiser, layers):
        from ..attention.fasa import joint_fasa_layers

        return joint_fasa_layers(denoiser, layers)

    def foundation_aware_attention(self, denoiser, state, layers):
        from ..attention.fasa import foundation_aware_joint_attention

        return foundation_aware_joint_attention(denoiser, state, layers)

    def decode(self, pipeline, latents, image_size):
        """Packed tokens → PIL images as the pipelines decode: unpacked by position ids
        (``_unpack_latents_with_ids``), batch-norm de-normalised, unpatchified, VAE-decoded,
        post-processed (:func:`~freecure.families.base._vae_decode`)."""
        h, w = self.latent_size(pipeline, *image_size)
        ids = pipeline._prepare_latent_ids(torch.empty(latents.shape[0], 0, h // 2, w // 2)).to(latents.device)
        grid = pipeline._unpack_latents_with_ids(latents, ids)
        mean, std = _latent_bn(pipeline.vae, grid.device, grid.dtype)
        return _vae_decode(pipeline, pipeline._unpatchify_latents(grid * std + mean))

    def inversion_schedulers(self, scheduler_config, num_inference_steps, device, z):
        from diffusers import FlowMatchEulerDiscreteScheduler

        forward = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        flux2_timesteps(forward, num_inference_steps, device, z.shape[1])
        return FlowEulerInverseScheduler(forward), forward


@cache
def _configured(max_sequence_length: int, cfg: bool, text_encoder_out_layers: tuple[int, ...] | None) -> Flux2Family:
    return Flux2Family(max_sequence_length, cfg, text_encoder_out_layers)


FLUX2 = Flux2Family()
