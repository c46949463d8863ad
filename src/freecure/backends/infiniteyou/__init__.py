"""InfiniteYou (ByteDance, 2025): InfuseNet residuals from an ArcFace embedding on FLUX."""

from __future__ import annotations

from ...core.deprecation import moved_names
from .backend import InfiniteYouBackend

#: names of the former module freecure.backends.infiniteyou (one release)
__getattr__ = moved_names(__name__, ["freecure.backends.infiniteyou.backend"])

__all__ = ["InfiniteYouBackend"]
