"""Token fusion: the smallest personalization method, an identity embedding in place of the class
token (a reference backend).
"""

from __future__ import annotations

from ...core.deprecation import moved_names
from ..common.random_identity import RandomProjectionIdentityEncoder
from .backend import TokenFusionBackend

#: names of the former module freecure.backends.token_fusion (one release)
__getattr__ = moved_names(
    __name__, ["freecure.backends.token_fusion.backend", "freecure.backends.common.random_identity"]
)

__all__ = ["RandomProjectionIdentityEncoder", "TokenFusionBackend"]
