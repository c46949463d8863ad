"""SAME: Spatially Aligned Mask Extraction (paper §4.1, eq. 4 and 5).

Every function here is pure: tensors in, tensors out, no model calls. Masks are float
tensors in [0, 1]; parse masks are boolean or {0, 1} tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def normalize_map(heatmap: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """𝒩(H): min–max normalise an attention map of shape (h, w) to [0, 1] (eq. 4).

    A constant map carries no localisation and normalises to all zeros.
    """
    heatmap = heatmap.float()
    low, high = heatmap.min(), heatmap.max()
    if float(high - low) <= eps:
        return torch.zeros_like(heatmap)
    return (heatmap - low) / (high - low)


def resize_map(heatmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize an (h, w) map to ``size`` = (H, W); down-sizing averages areas."""
    heatmap = heatmap.float()[None, None]
    if size[0] <= heatmap.shape[-2] and size[1] <= heatmap.shape[-1]:
        resized = F.interpolate(heatmap, size=size, mode="area")
    else:
        resized = F.interpolate(heatmap, size=size, mode="bilinear", align_corners=False)
    return resized[0, 0]


def attribute_mask(attention: torch.Tensor, parse_pd: torch.Tensor, parse_fd: torch.Tensor) -> torch.Tensor:
    """ℳ_i = 𝒩(H_i) · Ψ(I_p)_i · Ψ(I_f)_i (eq. 4).

    Args:
        attention: FD's cross-attention map H_i of the attribute, shape (h, w), any scale.
        parse_pd: the attribute's region in the PD image, (H, W) boolean or {0, 1}.
        parse_fd: the attribute's region in the FD image, same shape as ``parse_pd``.

    Returns:
        The spatially aligned mask at the parse masks' resolution, values in [0, 1].
    """
    if parse_pd.shape != parse_fd.shape:
        raise ValueError(
            f"PD and FD parse masks must have the same shape, got {tuple(parse_pd.shape)} and {tuple(parse_fd.shape)}"
        )
    heat = normalize_map(resize_map(attention, tuple(parse_pd.shape)))
    return heat * parse_pd.float() * parse_fd.float()


def merge_masks(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """ℳ(j, k) = max_i ℳ_i(j, k): merge attribute masks by pixel-wise maximum (eq. 5)."""
    if len(masks) == 0:
        raise ValueError("merge_masks needs at least one mask")
    return torch.stack([mask.float() for mask in masks]).amax(dim=0)


def to_latent_resolution(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Down-sample an image-resolution mask to the latent grid by area averaging.

    Returns a (1, 1, h, w) tensor that broadcasts over the latent's batch and channels.
    """
    return resize_map(mask, latent_size).clamp_(0.0, 1.0)[None, None]


def render_mask_overlay(
    image: Image.Image,
    mask: torch.Tensor | np.ndarray,
    color: tuple[int, int, int] = (255, 32, 32),
    alpha: float = 0.6,
) -> Image.Image:
    """Tint ``image`` with ``color`` in proportion to ``mask`` (any resolution, values in [0, 1])."""
    mask_t = torch.as_tensor(np.asarray(mask, dtype=np.float32)) if isinstance(mask, np.ndarray) else mask
    weight = resize_map(mask_t, (image.height, image.width)).clamp(0, 1).cpu().numpy()[..., None]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    tint = np.asarray(color, dtype=np.float32)[None, None]
    blended = base * (1 - alpha * weight) + tint * (alpha * weight)
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def render_mask(mask: torch.Tensor, size: tuple[int, int] | None = None) -> Image.Image:
    """The mask as a greyscale image (white = 1), optionally resized to ``size`` = (W, H)."""
    if size is not None:
        mask = resize_map(mask, (size[1], size[0]))
    array = (mask.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(array, mode="L")
