"""FastComposer (Xiao et al., 2023): image-augmented text embeddings and delayed subject conditioning."""

from __future__ import annotations

from ...core.deprecation import moved_names
from .backend import FastComposerBackend, ImageAugmentedBackend

#: names of the former module freecure.backends.fastcomposer (one release)
__getattr__ = moved_names(__name__, ["freecure.backends.fastcomposer.backend"])

__all__ = ["FastComposerBackend", "ImageAugmentedBackend"]
