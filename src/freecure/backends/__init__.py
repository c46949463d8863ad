"""Personalization backends: the protocol and the built-in implementations."""

from .base import Backend, Conditions, TextConditioning
from .face_diffuser import FaceDiffuserBackend
from .fastcomposer import FastComposerBackend
from .infiniteyou import InfiniteYouBackend
from .instantid import InstantIDBackend
from .ip_adapter_faceid import IPAdapterFaceIDBackend
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
    IPAdapterFaceIDBackend.name: IPAdapterFaceIDBackend,
    InstantIDBackend.name: InstantIDBackend,
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
    "IPAdapterFaceIDBackend",
    "InstantIDBackend",
    "PhotoMakerBackend",
    "PuLIDFluxBackend",
    "PuLIDSDXLBackend",
    "RandomProjectionIdentityEncoder",
    "TextConditioning",
    "TokenFusionBackend",
]
