"""FLUX: a flow-matching MMDiT on packed 2×2 latent patches, guidance-distilled (:class:`FluxFamily`),
and its pieces: packing, position ids, the shifted σ schedule and the reversed Euler inverse
scheduler of the expression stage."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import get_module_execution_device

from ..core.errors import InputError
from .base import ModelFamily, _vae_decode


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
        from ..core.conditioning import TextConditioning

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
        from ..core.guidance import Guidance

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

    def model_inputs(self, backend, latents, timestep, rows, image_size, references=None) -> dict:
        """One call's inputs; ``references`` appended after every row's image tokens with their
        own ids (FLUX.1 Kontext's layout: ``FluxKontextPipeline``'s ``latent_model_input``)."""
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
        ids = image_ids(latent_size, latents.device, embeds.dtype)
        hidden_states = latents
        if references is not None:
            tokens = references.latents.to(device=latents.device, dtype=latents.dtype).expand(batch, -1, -1)
            hidden_states = torch.cat([latents, tokens], dim=1)
            ids = torch.cat([ids, references.ids.to(device=ids.device, dtype=ids.dtype)])
        return dict(
            hidden_states=hidden_states,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype),
            img_ids=ids,
            return_dict=False,
        )

    # -- FLUX.1 Kontext: reference images in context ----------------------------------------
    reads_references = True

    def encode_references(self, pipeline, images, image_size, auto_resize: bool = True):
        """The references as FluxKontextPipeline prepares its ``image``: resized to the preferred
        Kontext resolution nearest its aspect ratio (``auto_resize``; else its own size),
        rounded to multiples of 16 px, VAE-encoded to the posterior mean, shifted and scaled,
        packed; ids (index, row, column) with index 1 for the first reference. Kontext was
        trained on one reference; a further one gets the next index (2, 3, …), as ComfyUI's
        "index" method chains them."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        from ..core.conditioning import ReferenceTokens

        vae, processor = pipeline.vae, pipeline.image_processor
        multiple = pipeline.vae_scale_factor * 2
        device = get_module_execution_device(vae)
        tokens, ids, blocks = [], [], []
        for index, image in enumerate(images, start=1):
            height, width = processor.get_default_height_width(image)
            if auto_resize:
                aspect = width / height
                _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
            width, height = width // multiple * multiple, height // multiple * multiple
            pixels = processor.preprocess(processor.resize(image, height, width), height, width)
            with torch.no_grad():
                latent = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist.mode()
            latent = (latent - vae.config.shift_factor) * vae.config.scaling_factor
            grid = latent.shape[-2:]
            reference_ids = image_ids(tuple(grid), device, torch.float32)
            reference_ids[:, 0] = index
            tokens.append(pack_latents(latent))
            ids.append(reference_ids)
            blocks.append(int(reference_ids.shape[0]))
        return ReferenceTokens(torch.cat(tokens, dim=1), torch.cat(ids), tuple(blocks))

    def attention_capture(self, denoiser, store, layers):
        from ..attention.capture import capture_joint_attention

        return capture_joint_attention(denoiser, store, layers)

    def attention_grid(self, latent_size):
        """The packed token grid: one token per 2×2 latent patch (:func:`pack_latents`)."""
        return latent_size[0] // 2, latent_size[1] // 2

    def fasa_layers(self, denoiser, layers):
        from ..attention.fasa import joint_fasa_layers

        return joint_fasa_layers(denoiser, layers)

    def foundation_aware_attention(self, denoiser, state, layers):
        from ..attention.fasa import foundation_aware_joint_attention

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


FLUX = FluxFamily()
