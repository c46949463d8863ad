"""Personalization backends: the protocol and the built-in implementations."""

from .base import Backend, Conditions, TextConditioning
from .face_diffuser import FaceDiffuserBackend
from .fastcomposer import FastComposerBackend
from .infiniteyou import InfiniteYouBackend
from .photomaker import PhotoMakerBackend
from .pulid import PuLIDSDXLBackend
from .pulid_flux import PuLIDFluxBackend
from .token_fusion import RandomProjectionIdentityEncoder, TokenFusionBackend

#: Backends by the name the CLI takes.
BACKENDS: dict[str, type[Backend]] = {
    TokenFusionBackend.name: TokenFusionBackend,
    FastComposerBackend.name: FastComposerBackend,
    FaceDiffuserBackend.name: FaceDiffuserBackend,
    PhotoMakerBackend.name: PhotoMakerBackend,
    InfiniteYouBackend.name: InfiniteYouBackend,
    PuLIDSDXLBackend.name: PuLIDSDXLBackend,
    PuLIDFluxBackend.name: PuLIDFluxBackend,
}

__all__ = [
    "BACKENDS",
    "Backend",
    "Conditions",
    "FaceDiffuserBackend",
    "FastComposerBackend",
    "InfiniteYouBackend",
    "PhotoMakerBackend",
    "PuLIDFluxBackend",
    "PuLIDSDXLBackend",
    "RandomProjectionIdentityEncoder",
    "TextConditioning",
    "TokenFusionBackend",
]
