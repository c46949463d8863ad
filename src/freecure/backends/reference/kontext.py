"""FLUX.1 Kontext [dev]: one reference photo read in context by FLUX.1's transformer.

``FluxKontextPipeline`` packs the photo's VAE latent like the target's and appends its tokens,
with position index 1, after the target's (:meth:`freecure.families.flux.FluxFamily.encode_references`);
FD is FLUX.1 Kontext's transformer as a plain text-to-image model. The weights are under the
FLUX.1 [dev] Non-Commercial License.
"""

from __future__ import annotations

import logging

import torch

from ...core.options import Option
from .base import QUANTIZE_OPTION, ReferenceImageBackend

logger = logging.getLogger(__name__)

REPO_ID = "black-forest-labs/FLUX.1-Kontext-dev"
LICENSE = (
    "FLUX.1 Kontext [dev]: FLUX.1 [dev] Non-Commercial License (black-forest-labs/FLUX.1-Kontext-dev; "
    "outputs may be used commercially, the weights may not)"
)
#: reference size of tiny runs: 64² px, 16 tokens (Kontext's preferred 1024² would be 4096)
TINY_REFERENCE_AREA = 64 * 64
RESIZE_CHOICES = ("preferred", "keep")


class FluxKontextBackend(ReferenceImageBackend):
    """FLUX.1 Kontext [dev] with the person's photo in context (PD) and without it (FD).

    Args:
        pipeline: a diffusers ``FluxKontextPipeline``.
        resize: ``"preferred"`` (the pipeline's default: the photo resized to the Kontext
            training resolution nearest its aspect ratio) or ``"keep"`` (its own size, rounded
            to 16 px: ``_auto_resize=False``).
    """

    name = "flux-kontext"
    families = ("flux",)
    license = LICENSE
    default_trigger = None

    options = (
        Option(
            "--kontext-resize",
            choices=RESIZE_CHOICES,
            default="preferred",
            help="flux-kontext: resize the reference to Kontext's preferred resolution (default) or keep its size",
        ),
        QUANTIZE_OPTION,
    )

    def __init__(self, pipeline, resize: str = "preferred", **kwargs):
        super().__init__(pipeline, **kwargs)
        self.resize = resize

    def encode_references_kwargs(self) -> dict:
        return {"auto_resize": self.resize == "preferred" and self.reference_max_area is None}

    @classmethod
    def build_tiny(cls, seed: int = 0, directory=None, **kwargs) -> FluxKontextBackend:
        """Tiny random FLUX components in a ``FluxKontextPipeline``, saved and reloaded, offline."""
        from diffusers import FluxKontextPipeline

        from ...families.tiny import TINY_FLUX_SAMPLE_SIZE, _save_and_reload, build_tiny_flux_components

        pipeline = _save_and_reload(
            FluxKontextPipeline(**build_tiny_flux_components(seed)), FluxKontextPipeline, directory
        )
        pipeline.default_sample_size = TINY_FLUX_SAMPLE_SIZE
        kwargs.setdefault("reference_max_area", TINY_REFERENCE_AREA)
        return cls(pipeline, **kwargs)

    @classmethod
    def from_options(cls, args) -> FluxKontextBackend:
        if args.tiny:
            backend = cls.build_tiny(resize=args.kontext_resize)
            backend.pipeline.to(args.device)
            return backend
        from diffusers import FluxKontextPipeline, FluxTransformer2DModel

        from .loading import load_reference_pipeline

        logger.warning("%s", LICENSE)
        pipeline = load_reference_pipeline(
            FluxKontextPipeline,
            FluxTransformer2DModel,
            args.base_model or REPO_ID,
            args.device,
            args.dtype or torch.bfloat16,
            args.quantize,
        )
        return cls(pipeline, resize=args.kontext_resize)
