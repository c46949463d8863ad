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

FLUX.2 (:class:`Flux2Family`, :mod:`freecure.families.flux2`) follows FLUX's column with a
Qwen3 or Mistral-3 text encoder behind a chat template, channel-major 2×2 patches, 4-D position
ids, and real CFG for FLUX.2 [klein] base.

A backend reaches its family as ``backend.family`` (found from the pipeline by
:func:`family_of`); a new model family is a new subclass of :class:`ModelFamily`, never a
branch inside the stages.
"""

from __future__ import annotations

from ..core.deprecation import moved_names
from ..core.errors import InputError
from .base import ModelFamily
from .flux import FLUX, FlowEulerInverseScheduler, FluxFamily, pack_latents, unpack_latents
from .flux2 import FLUX2, Flux2Family
from .unet import UNET, UNetFamily


def family_of(pipeline) -> ModelFamily:
    """The family of a diffusers pipeline: FLUX.2 (configured for the pipeline,
    :meth:`Flux2Family.for_pipeline`) when it has a ``Flux2Transformer2DModel``, FLUX.1 when it has
    another FLUX transformer, else a UNet."""
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None and type(transformer).__name__ == "Flux2Transformer2DModel":
        return FLUX2.for_pipeline(pipeline)
    if transformer is not None and type(transformer).__name__.startswith("Flux"):
        return FLUX
    if getattr(pipeline, "unet", None) is not None:
        return UNET
    raise InputError(f"{type(pipeline).__name__} is neither a Stable Diffusion (UNet) nor a FLUX pipeline")


__all__ = [
    "FLUX",
    "FLUX2",
    "UNET",
    "FlowEulerInverseScheduler",
    "Flux2Family",
    "FluxFamily",
    "ModelFamily",
    "UNetFamily",
    "family_of",
    "pack_latents",
    "unpack_latents",
]

#: names of the former single module (one release)
__getattr__ = moved_names(__name__, ["freecure.families.base", "freecure.families.unet", "freecure.families.flux"])
