"""Small builders the tests share (the tiny pipelines themselves are session fixtures in conftest.py)."""

from __future__ import annotations

from freecure.backends import RandomProjectionIdentityEncoder, TokenFusionBackend
from freecure.families.tiny import LayoutFaceParser
from freecure.pipeline import FreeCureConfig, FreeCurePipeline


def token_fusion_backend(pipeline, dim: int = 32, seed: int = 0) -> TokenFusionBackend:
    """The checkpoint-free backend on ``pipeline``: a random projection of the reference replaces
    the class token (``dim``: the text encoder's width, 32 for tiny SD1.5 and FLUX, 64 for SDXL)."""
    return TokenFusionBackend(pipeline, RandomProjectionIdentityEncoder(dim, seed=seed))


def token_fusion_freecure(pipeline, dim: int = 32, parser=None, **config) -> FreeCurePipeline:
    """FreeCure on :func:`token_fusion_backend`, the layout parser by default, progress bars off;
    ``config`` goes to :class:`FreeCureConfig`."""
    freecure = FreeCurePipeline(
        token_fusion_backend(pipeline, dim), parser or LayoutFaceParser(), FreeCureConfig(**config)
    )
    freecure.set_progress_bar_config(disable=True)
    return freecure
