"""Personalization backends: the protocol and the built-in implementations."""

from .base import Backend, Conditions, TextConditioning
from .face_diffuser import FaceDiffuserBackend
from .fastcomposer import FastComposerBackend
from .infiniteyou import InfiniteYouBackend
from .photomaker import PhotoMakerBackend
from .token_fusion import RandomProjectionIdentityEncoder, TokenFusionBackend

#: Backends by the name the CLI takes.
BACKENDS: dict[str, type[Backend]] = {
    TokenFusionBackend.name: TokenFusionBackend,
    FastComposerBackend.name: FastComposerBackend,
    FaceDiffuserBackend.name: FaceDiffuserBackend,
    PhotoMakerBackend.name: PhotoMakerBackend,
    InfiniteYouBackend.name: InfiniteYouBackend,
}

__all__ = [
    "BACKENDS",
    "Backend",
    "Conditions",
    "FaceDiffuserBackend",
    "FastComposerBackend",
    "InfiniteYouBackend",
    "PhotoMakerBackend",
    "RandomProjectionIdentityEncoder",
    "TextConditioning",
    "TokenFusionBackend",
]
