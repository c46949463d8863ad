"""Stable Diffusion UNets (SD1.5, SDXL): ε (or v) prediction on a (C, h, w) latent, classifier-free
guidance, DDIM inversion (:class:`UNetFamily`)."""

from __future__ import annotations

import torch

from ..core.errors import InputError
from .base import ModelFamily, _vae_decode


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
        from ..core.conditioning import TextConditioning

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
        from ..core.conditioning import TextConditioning

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
        from ..core.guidance import Guidance

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

    def model_inputs(self, backend, latents, timestep, rows, image_size, references=None) -> dict:
        if references is not None:
            raise ValueError("a UNet does not read reference images in context")
        embeds = torch.cat([row.prompt_embeds for row in rows])
        return dict(
            sample=latents,
            timestep=timestep,
            encoder_hidden_states=embeds,
            added_cond_kwargs=backend.added_cond_kwargs(rows, *image_size),
            return_dict=False,
        )

    def attention_capture(self, denoiser, store, layers):
        from ..attention.capture import capture_cross_attention

        return capture_cross_attention(denoiser, store, layers)

    def fasa_layers(self, denoiser, layers):
        from ..attention.fasa import fasa_layers

        return fasa_layers(denoiser, layers)

    def foundation_aware_attention(self, denoiser, state, layers):
        from ..attention.fasa import foundation_aware_self_attention

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


UNET = UNetFamily()
