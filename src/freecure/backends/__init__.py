"""Personalization backends: the protocol and the built-in implementations."""

from .base import Backend, Conditions, TextConditioning
from .face_diffuser import FaceDiffuserBackend
from .infiniteyou import InfiniteYouBackend
from .fastcomposer import FastComposerBackend
from .instantid import InstantIDBackend
from .ip_adapter_faceid import IPAdapterFaceIDBackend
from .photomaker import PhotoMakerBackend
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
    "RandomProjectionIdentityEncoder",
    "TextConditioning",
    "TokenFusionBackend",
]
