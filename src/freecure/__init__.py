"""FreeCure: training-free recovery of prompt consistency for face-personalized diffusion models.

Paper: "Foundation Cures Personalization: Recovering Facial Personalized Models' Prompt
Consistency" (Cai et al.). The package is organised by the paper's parts:

- :mod:`freecure.attributes`  — prompt → facial attributes, token columns, template prompts
- :mod:`freecure.parsing`     — the face parser Ψ (BiSeNet) and its face crop
- :mod:`freecure.masks`       — SAME, eq. (4)–(5)
"""

__version__ = "0.1.0.dev0"

from .core import deprecation as _deprecation
from .core.errors import FreeCureError, InputError, WeightsNotFoundError

_deprecation.install()  # old import paths (freecure.fasa, freecure.sampling, …) for one release

__all__ = ["FreeCureError", "InputError", "WeightsNotFoundError", "__version__"]
