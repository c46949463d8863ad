"""Reference-image models (FLUX.1 Kontext, FLUX.2): the person's photo read in context."""

from .base import QUANTIZATIONS, ReferenceImageBackend, quantization_config
from .kontext import FluxKontextBackend

__all__ = ["QUANTIZATIONS", "FluxKontextBackend", "ReferenceImageBackend", "quantization_config"]
