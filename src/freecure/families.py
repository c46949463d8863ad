"""Model families: what differs between an ε-prediction UNet and a flow-matching transformer.

The FreeCure stages (:mod:`freecure.sampling`, :mod:`freecure.inversion`,
:mod:`freecure.pipeline`) never ask which network they drive. Everything that differs between
Stable Diffusion (SD1.5, SDXL: a UNet predicting ε or v on a (C, h, w) latent, guided by
classifier-free guidance) and FLUX (an MMDiT predicting the flow velocity on packed 2×2
latent patches, guidance-distilled) sits behind one small object per family, in the manner of
k-diffusion's model wrappers and ComfyUI's ``model_sampling``:

============================  ==============================  ====================================
seam                          :class:`UNetFamily`             :class:`FluxFamily`
============================  ==============================  ====================================
denoiser                      ``pipeline.unet``               ``pipeline.transformer``
prediction type               ε (or v): the scheduler's       flow velocity v = dz/dσ
tokenizer of the attended     CLIP (``pipeline.tokenizer``)   T5 (``pipeline.tokenizer_2``)
text stream
text conditioning             CLIP states (+ SDXL pooled)     T5 states + CLIP pooled
latent layout                 (1, C, h, w)                    packed (1, h/2·w/2, 4C)
timesteps                     ``set_timesteps(T)``            σ = linspace(1, 1/T), shift μ(seq)
model input scaling           ``scale_model_input``           none
rows of a guided lane         CFG: [uncond, cond]             distilled: [cond] (+ embedding w);
                                                              true CFG: [negative, cond]
ROFA mask ℳ                   (1, 1, h, w)                    packed like the latents
VAE decode                    z / scaling_factor              unpack, z / scaling + shift
inversion schedulers          DDIM inverse / DDIM             reversed Euler on σ / Euler
attention capture             up-block cross-attention        joint attention, image queries
FASA (``--method fasa``)      self-attention ``attn1``,       joint attention, image queries;
                              mask on the latent grid         mask on the 2×2 token grid
============================  ==============================  ====================================

A backend reaches its family as ``backend.family`` (found from the pipeline by
:func:`family_of`); a new model family is a new subclass of :class:`ModelFamily`, never a
branch inside the stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import get_module_execution_device
from PIL import Image

from .errors import InputError


class ModelFamily:
    """What the FreeCure engine needs to know about a model family (see the module docstring).

    Every method takes the diffusers pipeline (or the backend) explicitly: a family object holds
    no model and is shared by every pipeline of its kind.
    """

    #: Short name shown in settings and cost tables.
    name: str = "base"
    #: What the denoiser predicts: ``"epsilon"``, ``"v_prediction"`` or ``"flow"``.
    prediction_type: str = "epsilon"
    #: Default number of denoising steps of the family's reference pipeline.
    default_steps: int = 50
    #: ``--scheduler`` names (:data:`freecure.runtime.SCHEDULERS`) that fit the family, and the default.
    schedulers: tuple[str, ...] = ("ddim", "dpmpp-2m", "dpmpp-2m-karras", "euler", "unipc")
    default_scheduler: str = "ddim"

    # -- components ---------------------------------------------------------------------
    def denoiser(self, pipeline) -> torch.nn.Module:
        raise NotImplementedError

    def tokenizer(self, pipeline):
        """The tokenizer of the text stream that image queries attend to (token columns)."""
        raise NotImplementedError

    # -- conditioning ---------------------------------------------------------------------
    def encode_text(self, backend, prompt: str):
        """One prompt's :class:`~freecure.backends.base.TextConditioning`, no guidance."""
        raise NotImplementedError

    def negative_conditioning(self, backend, negative_prompt: str | None):
        """The unconditional (negative) branch."""
        return self.encode_text(backend, negative_prompt or "")

    def default_guidance_scale(self, pipeline) -> float:
        return 7.5

    def loop_guidance(self, guidance_scale: float, true_cfg_scale: float = 1.0, rescale: float = 0.0):
        """The :class:`~freecure.sampling.Guidance` of the sampling loop (rows per lane)."""
        raise NotImplementedError

    # -- sizes and latents ------------------------------------------------------------------
    def default_size(self, pipeline) -> tuple[int, int]:
        raise NotImplementedError

    def size_multiple(self, pipeline) -> int:
        """Height and width must be multiples of this many pixels."""
        raise NotImplementedError

    def latent_size(self, pipeline, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the VAE latent grid: where ℳ and the aggregated attention maps live."""
        return height // pipeline.vae_scale_factor, width // pipeline.vae_scale_factor

    def set_timesteps(self, scheduler, num_inference_steps: int, device, latent_size: tuple[int, int]) -> None:
        scheduler.set_timesteps(num_inference_steps, device=device)

    def initial_latents(self, pipeline, scheduler, latent_size, generator, device, dtype, latents=None):
        """z_T in the denoiser's layout, scaled by the scheduler's initial σ."""
        raise NotImplementedError

    def model_mask(self, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """ℳ on the latent grid, (1, 1, h, w), laid out to broadcast against predictions like ``z``."""
        return mask

    # -- the network ------------------------------------------------------------------
    def model_inputs(self, backend, latents, timestep, rows, image_size) -> dict:
        """Keyword arguments of one denoiser call on the stacked rows."""
        raise NotImplementedError

    def predict(self, backend, latents, timestep, rows, image_size) -> torch.Tensor:
        """The denoiser's prediction for each row (ε, v or velocity)."""
        return self.denoiser(backend.pipeline)(**self.model_inputs(backend, latents, timestep, rows, image_size))[0]

    def attention_capture(self, denoiser, store, layers: Sequence[str] | None):
        """Context manager recording FD's attention on the attribute tokens into ``store``."""
        raise NotImplementedError

    # -- FASA (method "fasa", :mod:`freecure.fasa`) ---------------------------------------------
    def attention_grid(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the denoiser's image tokens at full resolution, where FASA's mask lives."""
        return latent_size

    def fasa_layers(self, denoiser, layers) -> list[str]:
        """The attention processors FASA changes, from a preset name or name patterns."""
        raise NotImplementedError

    def foundation_aware_attention(self, denoiser, state, layers: Sequence[str]):
        """Context manager installing FASA's processors on ``layers`` (restored in ``finally``)."""
        raise NotImplementedError

    # -- decoding and inversion ------------------------------------------------------------
    def decode(self, pipeline, latents: torch.Tensor, image_size: tuple[int, int]) -> list[Image.Image]:
        raise NotImplementedError

    def inversion_schedulers(self, scheduler_config, num_inference_steps: int, device, z: torch.Tensor):
        """(inverse, forward) schedulers of the expression stage, both with ``set_timesteps`` done:
        step i of the inverse undoes step T−1−i of the forward."""
        raise NotImplementedError


def _vae_decode(pipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Decode already unscaled latents one at a time, upcasting the VAE where its config asks."""
    vae = pipeline.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    device = get_module_execution_device(vae)  # the hook's device under offload, else the weights'
    images = []
    with torch.no_grad():
        if upcast:
            vae.to(torch.float32)
        try:
            # one latent at a time: decoding is memory-bound at high resolution, and peak
            # memory then matches plain generation's single decode
            for latent in latents.split(1):
                images.append(vae.decode(latent.to(device=device, dtype=dtype), return_dict=False)[0])
        finally:
            if upcast:
                vae.to(torch.float16)
    return pipeline.image_processor.postprocess(torch.cat(images), output_type="pil")


class UNetFamily(ModelFamily):
    """Stable Diffusion 1.5 and SDXL: a UNet on (C, h, w) latents with classifier-free guidance."""

    name = "unet"

    @staticmethod
    def is_sdxl(pipeline) -> bool:
        return getattr(pipeline, "text_encoder_2", None) is not None

    def denoiser(self, pipeline):
        return pipeline.unet

    def tokenizer(self, pipeline):
        return pipeline.tokenizer

    def encode_text(self, backend, prompt: str):
        from .backends.base import TextConditioning

        pipeline, device = backend.pipeline, backend.device
        if self.is_sdxl(pipeline):
            embeds, _, pooled, _ = pipeline.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return TextConditioning(embeds, pooled)
        embeds, _ = pipeline.encode_prompt(prompt, device, 1, do_classifier_free_guidance=False)
        return TextConditioning(embeds)

    def negative_conditioning(self, backend, negative_prompt: str | None):
        """The encoded negative prompt, or SDXL's zeros for none."""
        from .backends.base import TextConditioning

        pipeline = backend.pipeline
        if self.is_sdxl(pipeline) and not negative_prompt and pipeline.config.force_zeros_for_empty_prompt:
            positive = backend.encode_text("")
            return TextConditioning(
                torch.zeros_like(positive.prompt_embeds), torch.zeros_like(positive.pooled_prompt_embeds)
            )
        return backend.encode_text(negative_prompt or "")

    def default_guidance_scale(self, pipeline) -> float:
        """7.5 for the SD1.5 family, 5.0 for SDXL (the diffusers pipelines' defaults)."""
        return 5.0 if self.is_sdxl(pipeline) else 7.5

    def loop_guidance(self, guidance_scale: float, true_cfg_scale: float = 1.0, rescale: float = 0.0):
        from .sampling import Guidance

        if true_cfg_scale != 1.0:
            raise InputError(
                "true_cfg_scale is for guidance-distilled models (FLUX); Stable Diffusion's "
                "classifier-free guidance is guidance_scale"
            )
        return Guidance(scale=guidance_scale, rescale=rescale)

    def default_size(self, pipeline) -> tuple[int, int]:
        size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        return size, size

    def size_multiple(self, pipeline) -> int:
        return pipeline.vae_scale_factor * 8

    def initial_latents(self, pipeline, scheduler, latent_size, generator, device, dtype, latents=None):
        from diffusers.utils.torch_utils import randn_tensor

        if latents is None:
            shape = (1, pipeline.unet.config.in_channels, *latent_size)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma  # fp32 lanes

    def model_inputs(self, backend, latents, timestep, rows, image_size) -> dict:
        embeds = torch.cat([row.prompt_embeds for row in rows])
        return dict(
            sample=latents,
            timestep=timestep,
            encoder_hidden_states=embeds,
            added_cond_kwargs=backend.added_cond_kwargs(rows, *image_size),
            return_dict=False,
        )

    def attention_capture(self, denoiser, store, layers):
        from .attention import capture_cross_attention

        return capture_cross_attention(denoiser, store, layers)

    def fasa_layers(self, denoiser, layers):
        from .fasa import fasa_layers

        return fasa_layers(denoiser, layers)

    def foundation_aware_attention(self, denoiser, state, layers):
        from .fasa import foundation_aware_self_attention

        return foundation_aware_self_attention(denoiser, state, layers)

    def decode(self, pipeline, latents, image_size=None):
        return _vae_decode(pipeline, latents / pipeline.vae.config.scaling_factor)

    def inversion_schedulers(self, scheduler_config, num_inference_steps, device, z):
        from diffusers import DDIMInverseScheduler, DDIMScheduler

        inverse = DDIMInverseScheduler.from_config(scheduler_config)
        forward = DDIMScheduler.from_config(scheduler_config)
        inverse.set_timesteps(num_inference_steps, device=device)
        forward.set_timesteps(num_inference_steps, device=device)
        return inverse, forward


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, h/2·w/2, 4C): FLUX's 2×2 patches as tokens (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent grid of ``latent_size``."""
    b, _, channels = latents.shape
    h, w = latent_size
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def image_ids(latent_size: tuple[int, int], device, dtype) -> torch.Tensor:
    """FLUX's (row, column) position ids of the packed image tokens, (h/2·w/2, 3)."""
    h, w = latent_size[0] // 2, latent_size[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def flow_shift(image_seq_len: int, config) -> float | None:
    """μ of FLUX's resolution-dependent time shift (``FluxPipeline``'s ``calculate_shift``);
    None when the scheduler does not shift dynamically."""
    if not config.get("use_dynamic_shifting", False):
        return None
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def flow_timesteps(scheduler, num_inference_steps: int, device, image_seq_len: int) -> None:
    """FluxPipeline's schedule: σ = linspace(1, 1/T, T), shifted by μ(image tokens)."""
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if scheduler.config.get("use_flow_sigmas", False):
        sigmas = None
    mu = flow_shift(image_seq_len, scheduler.config)
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)


class FlowEulerInverseScheduler:
    """Euler steps along the flow ODE from σ = 0 upwards: the forward schedule reversed.

    Forward step i moves z from σ_i to σ_{i+1} with z ← z + (σ_{i+1} − σ_i)·v(z_i, t_i); inverse
    step k undoes forward step i = T−1−k with z ← z + (σ_i − σ_{i+1})·v(z_{i+1}, t_i). The
    velocity is evaluated at the point at hand with the timestep of the forward step it undoes
    (the DDIM-inversion convention), so a velocity field constant in z inverts exactly.

    Args:
        forward: a flow-matching scheduler after ``set_timesteps`` (σ_0 > … > σ_T = 0).
    """

    order = 1

    def __init__(self, forward):
        self.timesteps = forward.timesteps.flip(0)
        self.sigmas = forward.sigmas.flip(0)  # [0, σ_{T-1}, …, σ_0]
        self.config = forward.config
        self.init_noise_sigma = 1.0
        self._index = 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = False):
        dt = self.sigmas[self._index + 1] - self.sigmas[self._index]
        prev = (sample.to(torch.float32) + dt * model_output).to(model_output.dtype)
        self._index += 1
        return (prev,)


class FluxFamily(ModelFamily):
    """FLUX.1: a guidance-distilled rectified-flow MMDiT on packed 2×2 latent patches.

    The prediction is the flow velocity v = ε − x₀ (dz/dσ along z_σ = (1 − σ)·x₀ + σ·ε), an
    affine function of the model output like ε, so CFG and ROFA's blend (eq. 6) apply to it
    unchanged (docs/engine.md). With ``guidance_embeds`` the guidance scale enters as an
    embedding (:attr:`Backend.guidance_scale`), one row per lane; ``true_cfg_scale`` > 1 adds
    diffusers' true CFG, two rows per lane.

    Args:
        max_sequence_length: T5 tokens per prompt (FLUX.1-dev: 512), capped by the tokenizer.
    """

    name = "flux"
    prediction_type = "flow"
    default_steps = 28
    schedulers = ("flow-euler",)
    default_scheduler = "flow-euler"
    default_embedded_guidance = 3.5

    def __init__(self, max_sequence_length: int = 512):
        self.max_sequence_length = max_sequence_length

    def denoiser(self, pipeline):
        return pipeline.transformer

    def tokenizer(self, pipeline):
        return pipeline.tokenizer_2

    def sequence_length(self, pipeline) -> int:
        return min(self.max_sequence_length, int(pipeline.tokenizer_2.model_max_length))

    def encode_text(self, backend, prompt: str):
        from .backends.base import TextConditioning

        pipeline = backend.pipeline
        embeds, pooled, _ = pipeline.encode_prompt(
            prompt,
            prompt_2=None,
            device=backend.device,
            num_images_per_prompt=1,
            max_sequence_length=self.sequence_length(pipeline),
        )
        return TextConditioning(embeds, pooled)

    def default_guidance_scale(self, pipeline) -> float:
        return self.default_embedded_guidance

    def loop_guidance(self, guidance_scale: float, true_cfg_scale: float = 1.0, rescale: float = 0.0):
        """Rows follow ``true_cfg_scale`` (1: one row per lane); ``guidance_scale`` is embedded."""
        from .sampling import Guidance

        if rescale:
            raise InputError("guidance_rescale is not used by FLUX; leave it at 0")
        if not true_cfg_scale >= 1.0 or true_cfg_scale == float("inf"):
            raise InputError(f"true_cfg_scale must be a finite number ≥ 1 (1 = off), got {true_cfg_scale}")
        return Guidance(scale=true_cfg_scale)

    def default_size(self, pipeline) -> tuple[int, int]:
        size = pipeline.default_sample_size * pipeline.vae_scale_factor
        return size, size

    def size_multiple(self, pipeline) -> int:
        return pipeline.vae_scale_factor * 2

    def latent_size(self, pipeline, height: int, width: int) -> tuple[int, int]:
        factor = pipeline.vae_scale_factor
        return 2 * (height // (factor * 2)), 2 * (width // (factor * 2))

    def set_timesteps(self, scheduler, num_inference_steps, device, latent_size) -> None:
        flow_timesteps(scheduler, num_inference_steps, device, (latent_size[0] // 2) * (latent_size[1] // 2))
        scheduler.set_begin_index(0)

    def initial_latents(self, pipeline, scheduler, latent_size, generator, device, dtype, latents=None):
        from diffusers.utils.torch_utils import randn_tensor

        channels = pipeline.transformer.config.in_channels // 4
        if latents is None:
            latents = randn_tensor((1, channels, *latent_size), generator=generator, device=device, dtype=dtype)
        if latents.ndim == 4:
            latents = pack_latents(latents)
        return latents.to(device=device, dtype=torch.float32)  # flow matching starts at σ = 1: z_T = ε; fp32 lanes

    def model_mask(self, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """ℳ (1, 1, h, w) repeated over the latent channels and packed like the latents:
        (1, h/2·w/2, 4C), each packed value carrying ℳ at its own latent pixel."""
        channels = z.shape[-1] // 4
        return pack_latents(mask.expand(mask.shape[0], channels, *mask.shape[-2:]).contiguous())

    def model_inputs(self, backend, latents, timestep, rows, image_size) -> dict:
        transformer = self.denoiser(backend.pipeline)
        batch = latents.shape[0]
        embeds = torch.cat([row.prompt_embeds for row in rows])
        pooled = torch.cat([row.pooled_prompt_embeds for row in rows])
        guidance = None
        if transformer.config.guidance_embeds:
            scale = backend.guidance_scale if backend.guidance_scale is not None else self.default_embedded_guidance
            guidance = torch.full([batch], scale, device=latents.device, dtype=torch.float32)
        latent_size = self.latent_size(backend.pipeline, *image_size)
        timestep = torch.as_tensor(timestep, device=latents.device).expand(batch).to(latents.dtype)
        return dict(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype),
            img_ids=image_ids(latent_size, latents.device, embeds.dtype),
            return_dict=False,
        )

    def attention_capture(self, denoiser, store, layers):
        from .attention import capture_joint_attention

        return capture_joint_attention(denoiser, store, layers)

    def attention_grid(self, latent_size):
        """The packed token grid: one token per 2×2 latent patch (:func:`pack_latents`)."""
        return latent_size[0] // 2, latent_size[1] // 2

    def fasa_layers(self, denoiser, layers):
        from .fasa import joint_fasa_layers

        return joint_fasa_layers(denoiser, layers)

    def foundation_aware_attention(self, denoiser, state, layers):
        from .fasa import foundation_aware_joint_attention

        return foundation_aware_joint_attention(denoiser, state, layers)

    def decode(self, pipeline, latents, image_size):
        latent_size = self.latent_size(pipeline, *image_size)
        config = pipeline.vae.config
        latents = unpack_latents(latents, latent_size) / config.scaling_factor + config.shift_factor
        return _vae_decode(pipeline, latents)

    def inversion_schedulers(self, scheduler_config, num_inference_steps, device, z):
        from diffusers import FlowMatchEulerDiscreteScheduler

        forward = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        flow_timesteps(forward, num_inference_steps, device, z.shape[1])
        return FlowEulerInverseScheduler(forward), forward


UNET = UNetFamily()
FLUX = FluxFamily()


def family_of(pipeline) -> ModelFamily:
    """The family of a diffusers pipeline: FLUX when it has a FLUX transformer, else a UNet."""
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None and type(transformer).__name__.startswith("Flux"):
        return FLUX
    if getattr(pipeline, "unet", None) is not None:
        return UNET
    raise InputError(f"{type(pipeline).__name__} is neither a Stable Diffusion (UNet) nor a FLUX pipeline")


__all__ = [
    "FLUX",
    "UNET",
    "FlowEulerInverseScheduler",
    "FluxFamily",
    "ModelFamily",
    "UNetFamily",
    "family_of",
    "pack_latents",
    "unpack_latents",
]
