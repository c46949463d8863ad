"""Personalization backends: the protocol and the built-in implementations."""

from .base import Backend, Conditions, TextConditioning
from .token_fusion import RandomProjectionIdentityEncoder, TokenFusionBackend

#: Backends by the name the CLI takes.
BACKENDS: dict[str, type[Backend]] = {
    TokenFusionBackend.name: TokenFusionBackend,
}

__all__ = [
    "BACKENDS",
    "Backend",
    "Conditions",
    "RandomProjectionIdentityEncoder",
    "TextConditioning",
    "TokenFusionBackend",
]
