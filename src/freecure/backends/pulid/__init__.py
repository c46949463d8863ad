"""PuLID (Guo et al., NeurIPS 2024): ID tokens from an IDFormer, attended to by cross-attention
adapters (SDXL) or blocks (FLUX).
"""

from __future__ import annotations

from ...core.deprecation import moved_names
from .flux import PuLIDFluxBackend
from .sdxl import PuLIDSDXLBackend

#: names of the former module freecure.backends.pulid (one release)
__getattr__ = moved_names(__name__, ["freecure.backends.pulid.sdxl"])

__all__ = ["PuLIDFluxBackend", "PuLIDSDXLBackend"]
