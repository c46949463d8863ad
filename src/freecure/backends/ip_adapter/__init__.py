"""IP-Adapter family: IP-Adapter-FaceID (Ye et al.) and InstantID (Wang et al., 2024), image
tokens in decoupled cross-attention (InstantID adds an IdentityNet ControlNet)."""

from __future__ import annotations

from .faceid import IPAdapterFaceIDBackend
from .instantid import InstantIDBackend

__all__ = ["IPAdapterFaceIDBackend", "InstantIDBackend"]
