"""TODO docstring."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


class RandomProjectionIdentityEncoder:
    """A fixed random projection of the downsampled reference image(s): a stand-in identity
    encoder with no checkpoint. Different faces give different embeddings; its output has no
    semantic meaning. Multiple references are averaged.
    """

    def __init__(self, dim: int, resolution: int = 16, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.resolution = resolution
        self.projection = torch.randn(3 * resolution * resolution, dim, generator=generator)

    def __call__(self, references: Sequence[Image.Image]) -> torch.Tensor:
        features = []
        for image in references:
            small = image.convert("RGB").resize((self.resolution, self.resolution), Image.BICUBIC)
            pixels = torch.from_numpy(np.asarray(small, dtype=np.float32) / 127.5 - 1.0).flatten()
            features.append(pixels @ self.projection)
        embedding = torch.stack(features).mean(dim=0)
        return (embedding - embedding.mean()) / (embedding.std() + 1e-6)


def text_dim(pipeline) -> int:
    """Width of the text states the denoiser attends to (SD: cross-attention dim; FLUX: T5's)."""
    config = (pipeline.transformer if getattr(pipeline, "transformer", None) is not None else pipeline.unet).config
    return int(config.get("cross_attention_dim") or config.get("joint_attention_dim"))
