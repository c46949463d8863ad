"""The model-family protocol (:class:`ModelFamily`): every seam where an ε-prediction UNet and a
flow-matching transformer differ, as one small object per family (see :mod:`freecure.families`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import get_module_execution_device
from PIL import Image


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
    def model_inputs(self, backend, latents, timestep, rows, image_size, references=None) -> dict:
        """Keyword arguments of one denoiser call on the stacked rows; ``references``
        (:class:`~freecure.core.conditioning.ReferenceTokens`) appended to every row's image
        tokens where the family reads reference images in context."""
        raise NotImplementedError

    def predict(self, backend, latents, timestep, rows, image_size, references=None) -> torch.Tensor:
        """The denoiser's prediction for each row (ε, v or velocity), on the target image's
        tokens only (the reference tokens' outputs are dropped, as the reference pipelines do)."""
        inputs = self.model_inputs(backend, latents, timestep, rows, image_size, references)
        out = self.denoiser(backend.pipeline)(**inputs)[0]
        return out if references is None else out[:, : latents.shape[1]]

    # -- reference images in context (FLUX.1 Kontext, FLUX.2) ---------------------------------
    #: Whether the denoiser can read reference images as extra tokens of its sequence.
    reads_references: bool = False

    def encode_references(self, pipeline, images: Sequence[Image.Image], image_size: tuple[int, int]):
        """The reference photos as :class:`~freecure.core.conditioning.ReferenceTokens`, prepared
        exactly as the family's reference pipeline prepares its ``image`` input (resized,
        VAE-encoded to the posterior mean, normalised, packed; position ids with one image index
        per reference)."""
        from ..core.errors import InputError

        raise InputError(f"{self.name} models do not read reference images in context")

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
