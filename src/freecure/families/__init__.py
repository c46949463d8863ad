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

from ..core.deprecation import moved_names
from ..core.errors import InputError
from .base import ModelFamily
from .flux import FLUX, FlowEulerInverseScheduler, FluxFamily, pack_latents, unpack_latents
from .unet import UNET, UNetFamily


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

#: names of the former single module (one release)
__getattr__ = moved_names(__name__, ["freecure.families.base", "freecure.families.unet", "freecure.families.flux"])
