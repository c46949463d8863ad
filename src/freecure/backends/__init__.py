"""Personalization backends: the protocol and the built-in implementations."""

from ..core.conditioning import Conditions, TextConditioning
from .base import Backend
from .common.random_identity import RandomProjectionIdentityEncoder
from .face_diffuser.backend import FaceDiffuserBackend
from .fastcomposer.backend import FastComposerBackend
from .infiniteyou.backend import InfiniteYouBackend
from .ip_adapter.faceid import IPAdapterFaceIDBackend
from .ip_adapter.instantid import InstantIDBackend
from .photomaker.backend import PhotoMakerBackend
from .pulid.flux import PuLIDFluxBackend
from .pulid.sdxl import PuLIDSDXLBackend
from .token_fusion.backend import TokenFusionBackend

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
