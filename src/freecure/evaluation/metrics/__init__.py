"""The paper's evaluation metrics (§5.1, §8.2): PC (CLIP-T), IF, face diversity, PC × IF.

Each module's docstring gives its exact definition and what differs from the paper.
"""

from .clip_score import DEFAULT_CLIP_MODEL, PromptConsistency, build_tiny_clip, clip_preprocess
from .diversity import DIVERSITY_SAMPLES, choose_results, face_diversity
from .identity import (
    IDENTITY_MODELS,
    DlibEmbedder,
    Face,
    FaceNetEmbedder,
    IdentityFidelity,
    face_crop,
    load_facenet,
    resolve_facenet_weights,
)
from .lpips import LPIPS

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DIVERSITY_SAMPLES",
    "IDENTITY_MODELS",
    "LPIPS",
    "DlibEmbedder",
    "Face",
    "FaceNetEmbedder",
    "IdentityFidelity",
    "PromptConsistency",
    "build_tiny_clip",
    "choose_results",
    "clip_preprocess",
    "face_crop",
    "face_diversity",
    "load_facenet",
    "resolve_facenet_weights",
]
