"""Personalization backends: the protocol, the registry and the built-in methods, one line each."""

from .base import Backend
from .common.random_identity import RandomProjectionIdentityEncoder
from .face_diffuser import FaceDiffuserBackend
from .fastcomposer import FastComposerBackend
from .infiniteyou import InfiniteYouBackend
from .ip_adapter import InstantIDBackend, IPAdapterFaceIDBackend
from .photomaker import PhotoMakerBackend
from .pulid import PuLIDFluxBackend, PuLIDSDXLBackend
from .reference import Flux2Backend, Flux2KleinBackend, FluxKontextBackend, ReferenceImageBackend
from .registry import BACKENDS, DEFAULT_BACKEND, get_backend, register, unregister
from .token_fusion import TokenFusionBackend

register(TokenFusionBackend)
register(FastComposerBackend)
register(FaceDiffuserBackend)
register(PhotoMakerBackend)
register(InfiniteYouBackend)
register(IPAdapterFaceIDBackend)
register(InstantIDBackend)
register(PuLIDSDXLBackend)
register(PuLIDFluxBackend)
register(FluxKontextBackend)
register(Flux2KleinBackend)
register(Flux2Backend)

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "Backend",
    "FaceDiffuserBackend",
    "FastComposerBackend",
    "Flux2Backend",
    "Flux2KleinBackend",
    "FluxKontextBackend",
    "InfiniteYouBackend",
    "IPAdapterFaceIDBackend",
    "InstantIDBackend",
    "PhotoMakerBackend",
    "PuLIDFluxBackend",
    "PuLIDSDXLBackend",
    "ReferenceImageBackend",
    "RandomProjectionIdentityEncoder",
    "TokenFusionBackend",
    "get_backend",
    "register",
    "unregister",
]


def __getattr__(name: str):
    if name in ("Conditions", "TextConditioning"):  # former re-exports (one release)
        from ..core import conditioning
        from ..core.deprecation import _warn

        _warn(f"freecure.backends.{name}", f"freecure.core.conditioning.{name}")
        return getattr(conditioning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
