"""FLUX.2 [dev] and FLUX.2 [klein]: one or more reference photos read in context.

``Flux2Pipeline`` / ``Flux2KleinPipeline`` encode each photo with the VAE (posterior mode,
patchified, batch-normalised), pack it, and append its tokens after the target's with a time
offset of 10 per reference in their 4-D position ids (:meth:`freecure.families.flux2.Flux2Family.encode_references`).
FD is the same transformer as a plain text-to-image model.

Licences (say them wherever the weights are used): FLUX.2 [dev] is under the FLUX.2 [dev]
Non-Commercial License; FLUX.2 [klein] 4B under Apache 2.0, [klein] 9B under the FLUX
Non-Commercial License. Check the model card of the repository you load.
"""

from __future__ import annotations

import logging

import torch

from ...core.options import Option
from .base import QUANTIZE_OPTION, ReferenceImageBackend

logger = logging.getLogger(__name__)

DEV_REPO_ID = "black-forest-labs/FLUX.2-dev"
DEV_LICENSE = (
    "FLUX.2 [dev]: FLUX.2 [dev] Non-Commercial License (black-forest-labs/FLUX.2-dev; the weights are for "
    "non-commercial use)"
)
#: FLUX.2 [klein] repositories by (size, variant): the step-distilled models and the base ones
KLEIN_REPO_IDS = {
    ("4b", "distilled"): "black-forest-labs/FLUX.2-klein-4B",
    ("9b", "distilled"): "black-forest-labs/FLUX.2-klein-9B",
    ("4b", "base"): "black-forest-labs/FLUX.2-klein-base-4B",
    ("9b", "base"): "black-forest-labs/FLUX.2-klein-base-9B",
}
KLEIN_LICENSES = {
    "4b": "FLUX.2 [klein] 4B: Apache License 2.0",
    "9b": "FLUX.2 [klein] 9B: FLUX Non-Commercial License (the weights are for non-commercial use)",
}
#: reference size of tiny runs: 64² px (FLUX.2 refuses a side under 64 px)
TINY_REFERENCE_AREA = 64 * 64


def _tiny_pipeline(name: str, seed: int = 0, directory=None, **kwargs):
    from ...families.tiny_flux2 import tiny_flux2_klein_pipeline, tiny_flux2_pipeline

    build = tiny_flux2_klein_pipeline if name == "flux2-klein" else tiny_flux2_pipeline
    return build(directory=directory, seed=seed, **kwargs)


class Flux2Backend(ReferenceImageBackend):
    """FLUX.2 [dev] (32 B transformer, Mistral Small 3.1 text encoder) with the person's photos
    in context (PD) and without them (FD). Guidance is embedded (default 4.0), one row per lane.
    On one 80 GB card it needs ``--offload model`` or ``--quantize``."""

    name = "flux2"
    families = ("flux2",)
    license = DEV_LICENSE
    options = (QUANTIZE_OPTION,)

    @classmethod
    def build_tiny(cls, seed: int = 0, directory=None, **kwargs) -> Flux2Backend:
        """Tiny random FLUX.2 [dev]-shaped components (Mistral-3 text encoder), offline."""
        kwargs.setdefault("reference_max_area", TINY_REFERENCE_AREA)
        return cls(_tiny_pipeline(cls.name, seed, directory), **kwargs)

    @classmethod
    def from_options(cls, args) -> Flux2Backend:
        if args.tiny:
            backend = cls.build_tiny()
            backend.pipeline.to(args.device)
            return backend
        from diffusers import Flux2Pipeline, Flux2Transformer2DModel

        from .loading import load_reference_pipeline

        logger.warning("%s", DEV_LICENSE)
        source = args.base_model or DEV_REPO_ID
        dtype = args.dtype or torch.bfloat16
        pipeline = load_reference_pipeline(
            Flux2Pipeline, Flux2Transformer2DModel, source, args.device, dtype, args.quantize
        )
        return cls(pipeline)


class Flux2KleinBackend(ReferenceImageBackend):
    """FLUX.2 [klein] (4 B or 9 B transformer, Qwen3 text encoder; the consumer-GPU one) with the
    person's photos in context (PD) and without them (FD). The step-distilled models take one
    row per lane and ignore the guidance scale; the base models run real CFG (two rows)."""

    name = "flux2-klein"
    families = ("flux2-klein",)
    license = f"{KLEIN_LICENSES['4b']}; {KLEIN_LICENSES['9b']}"
    options = (
        Option("--klein-size", choices=("4b", "9b"), default="4b", help="flux2-klein: model size (default 4b)"),
        Option(
            "--klein-variant",
            choices=("distilled", "base"),
            default="distilled",
            help="flux2-klein: the step-distilled model (default; few steps, no CFG) or the base model (real CFG)",
        ),
        QUANTIZE_OPTION,
    )

    def __init__(self, pipeline, size: str | None = None, **kwargs):
        super().__init__(pipeline, **kwargs)
        self.size = size
        if size is not None:
            self.license = KLEIN_LICENSES[size]

    @classmethod
    def build_tiny(cls, seed: int = 0, directory=None, distilled: bool = False, **kwargs) -> Flux2KleinBackend:
        """Tiny random FLUX.2 [klein]-shaped components (Qwen3 text encoder), offline; ``distilled``
        picks the step-distilled reading (one row per lane), else the base model's real CFG."""
        kwargs.setdefault("reference_max_area", TINY_REFERENCE_AREA)
        return cls(_tiny_pipeline(cls.name, seed, directory, distilled=distilled), **kwargs)

    @classmethod
    def from_options(cls, args) -> Flux2KleinBackend:
        if args.tiny:
            backend = cls.build_tiny(distilled=args.klein_variant == "distilled")
            backend.pipeline.to(args.device)
            return backend
        from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

        from .loading import load_reference_pipeline

        if args.klein_size == "9b":
            logger.warning("%s", KLEIN_LICENSES["9b"])
        source = args.base_model or KLEIN_REPO_IDS[args.klein_size, args.klein_variant]
        dtype = args.dtype or torch.bfloat16
        pipeline = load_reference_pipeline(
            Flux2KleinPipeline, Flux2Transformer2DModel, source, args.device, dtype, args.quantize
        )
        return cls(pipeline, size=args.klein_size)
