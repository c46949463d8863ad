"""Reference-image models (FLUX.1 Kontext, FLUX.2): the person's photo read in context."""

from .base import QUANTIZATIONS, ReferenceImageBackend, quantization_config
from .flux2 import Flux2Backend, Flux2KleinBackend
from .kontext import FluxKontextBackend

__all__ = [
    "QUANTIZATIONS",
    "Flux2Backend",
    "Flux2KleinBackend",
    "FluxKontextBackend",
    "ReferenceImageBackend",
    "quantization_config",
]
