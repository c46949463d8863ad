"""PhotoMaker v1 and v2 (Li et al., CVPR 2024): stacked ID embeddings fused into the class word's tokens."""

from __future__ import annotations

from ...core.deprecation import moved_names
from .backend import PhotoMakerBackend

#: names of the former module freecure.backends.photomaker (one release)
__getattr__ = moved_names(
    __name__,
    [
        "freecure.backends.photomaker.backend",
        "freecure.backends.photomaker.id_encoder",
        "freecure.backends.photomaker.v2",
        "freecure.backends.common.layers",
    ],
)

__all__ = ["PhotoMakerBackend"]
