"""Face-diffuser (Wang et al., 2024): FastComposer's subject model (SDM) beside the text model
(TDM), blended by saliency.
"""

from __future__ import annotations

from ...core.deprecation import moved_names
from .backend import FaceDiffuserBackend

#: names of the former module freecure.backends.face_diffuser (one release)
__getattr__ = moved_names(__name__, ["freecure.backends.face_diffuser.backend"])

__all__ = ["FaceDiffuserBackend"]
