"""The face parser Ψ(·) of SAME (paper §4.1, §8.1): BiSeNet on a face crop.

Typical use::

    from freecure.parsing import BiSeNetFaceParser

    parse = BiSeNetFaceParser.from_pretrained()
    result = parse("portrait.png")
    hair = result.mask(["hair"])  # Ψ(I)_hair of eq. (4), bool (H, W)

The engine depends only on the :class:`FaceParser` protocol and :class:`ParseResult`.
"""

from ..core.labels import CLASSES, GROUPS, PALETTE, class_ids
from .bisenet import BiSeNet
from .face_crop import FaceDetector, MTCNNFaceDetector, face_crop_box
from .parser import (
    BiSeNetFaceParser,
    FaceParser,
    ParseResult,
    overlay_labels,
    render_label_map,
)
from .weights import ENV_VAR, HUB_FILENAME, HUB_REPO_ID, HUB_REVISION, resolve_bisenet_weights

__all__ = [
    "CLASSES",
    "ENV_VAR",
    "GROUPS",
    "HUB_FILENAME",
    "HUB_REPO_ID",
    "HUB_REVISION",
    "PALETTE",
    "BiSeNet",
    "BiSeNetFaceParser",
    "FaceDetector",
    "FaceParser",
    "MTCNNFaceDetector",
    "ParseResult",
    "class_ids",
    "face_crop_box",
    "overlay_labels",
    "render_label_map",
    "resolve_bisenet_weights",
]
