"""Attention processors and the context managers that install and restore them: FD's attention capture
(UNet cross-attention, FLUX joint attention) and FASA's foundation-aware attention. Imports only from core."""

from __future__ import annotations

from ..core.deprecation import moved_names

#: names of the former module freecure.attention, now freecure.attention.capture (one release)
__getattr__ = moved_names(__name__, ["freecure.attention.capture"])
