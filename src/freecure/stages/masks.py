"""SAME: Spatially Aligned Mask Extraction (paper §4.1, eq. 4 and 5).

Every function here is pure: tensors in, tensors out, no model calls. Masks are float
tensors in [0, 1]; parse masks are boolean or {0, 1} tensors.

PD's factor of eq. 4. Read literally, Ψ(I_p)_i is the attribute's own class in PD's image:
if PD drew no sunglasses — the very failure FreeCure exists to cure — the product is empty
and the attribute can never come back. The paper's figures show accessories restored, so by
default (``pd_region="placement"``) PD's factor is :func:`placement_region`: *where the
attribute belongs on PD's face* (eyewear: the eyes and brows, dilated; headwear: the hair and
the space above the head; earrings: around the ears; necklaces: around the neck), always
including the attribute's own class. Attributes that change the colour or style of a part
PD already has (hair, lips, eyes, …) keep their own class, i.e. the literal reading. FD's
factor Ψ(I_f)_i stays literal in both modes: FD drew the attribute, so its class is where it
is. ``pd_region="literal"`` restores the plain eq. 4 everywhere.

The functions are pure; :class:`SameMasks` is the stage that parses the SAME pass's images and
applies them per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Placement:
    """Where an attribute category belongs on a face, in parser classes.

    Attributes:
        classes: classes/groups (of :mod:`freecure.parsing.labels`) the attribute sits on.
        dilate: grow that region by this fraction of the face height (0: not at all).
        above: also take every pixel above the head (hair, hat and face) in its columns.
    """

    classes: tuple[str, ...]
    dilate: float = 0.0
    above: bool = False


PLACEMENTS: dict[str, Placement] = {
    "eyewear": Placement(("eyes", "brows"), dilate=0.08),
    "hat": Placement(("hair",), above=True),
    "earrings": Placement(("ears",), dilate=0.08),
    "necklace": Placement(("neck",), dilate=0.05),
}
"""PD-side placement per attribute category; categories not listed keep their own class."""

PD_REGION_MODES = ("placement", "literal")
HEAD_CLASSES = ("hair", "hat", "face")


def dilate_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a boolean (H, W) mask by ``radius`` pixels (square structuring element)."""
    if radius <= 0:
        return mask.bool()
    grown = F.max_pool2d(mask.float()[None, None], kernel_size=2 * radius + 1, stride=1, padding=radius)
    return grown[0, 0] > 0


def above_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pixels strictly above the topmost pixel of ``mask`` in their column (boolean (H, W))."""
    seen = mask.bool().int().cumsum(dim=0) > 0  # at or below the first pixel of the column
    return ~seen & mask.bool().any(dim=0, keepdim=True)


def face_height(labels_mask: Callable[[Sequence[str]], torch.Tensor]) -> int:
    """Rows spanned by the face classes; the image height when there is no face."""
    face = labels_mask(("face",))
    rows = torch.nonzero(face.any(dim=1)).flatten()
    return int(rows[-1] - rows[0] + 1) if len(rows) else face.shape[0]


def placement_region(
    labels_mask: Callable[[Sequence[str]], torch.Tensor], category: str, parse_classes: Sequence[str]
) -> torch.Tensor:
    """R_p: where an attribute of ``category`` belongs on a parsed face (PD's factor of eq. 4).

    Args:
        labels_mask: class/group names → boolean (H, W) tensor of the parsed image.
        category: the attribute's category ("eyewear", "hat", …).
        parse_classes: the attribute's own classes; always part of the region.

    Returns:
        Boolean (H, W): the own classes, plus the category's :data:`PLACEMENTS` entry.
    """
    own = labels_mask(tuple(parse_classes)).bool()
    placement = PLACEMENTS.get(category)
    if placement is None:
        return own
    region = labels_mask(placement.classes).bool()
    if placement.dilate > 0:
        region = dilate_mask(region, round(placement.dilate * face_height(labels_mask)))
    if placement.above:
        region = region | above_mask(labels_mask(HEAD_CLASSES))
    return own | region


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


def parse_images(parser, images: Sequence[Image.Image]) -> list:
    """Ψ of several images, batched when the parser can."""
    batch = getattr(parser, "parse_batch", None)
    return list(batch(images)) if batch is not None else [parser(image) for image in images]


def mask_bytes(output) -> int:
    """Bytes of one image's masks and attention maps (FreeCure's own memory)."""
    tensors = [*output.attribute_masks.values(), *output.attention_maps.values(), output.mask, output.latent_mask]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class SameMasks:
    """Stage 2: parse each image's FD and PD, ℳ_i of eq. 4 per localized attribute found in
    both, merged by eq. 5; skipped when the prompt names no localized attribute."""

    name = "masks"

    def run(self, ctx) -> None:
        if not ctx.parsed.localized:
            ctx.records.skip(self.name, "the prompt names no localized attribute")
            return
        with ctx.records.run(self.name) as record:
            for output in ctx.outputs:
                self.build(output, ctx.face_parser, ctx.config.pd_region, ctx.latent_size)
            record.freecure_bytes = sum(mask_bytes(output) for output in ctx.outputs)

    @staticmethod
    def build(output, face_parser, pd_region: str, latent_size: tuple[int, int]) -> None:
        """Eq. (4) for every localized attribute with a region in both images, eq. (5) to merge.

        FD's factor is the attribute's own class in FD's image; PD's factor is its own class
        (``pd_region="literal"``) or where it belongs on PD's face (``"placement"``).
        """
        parse_fd, parse_pd = parse_images(face_parser, [output.images["fd"], output.images["pd"]])
        output.parse_fd, output.parse_pd = parse_fd, parse_pd
        for parse, name in ((parse_fd, "FD"), (parse_pd, "PD")):
            if not parse.face_found:
                output.notes.append(f"{name} image: {parse.note}")
        for attribute in output.parsed.localized:
            region_fd = torch.from_numpy(parse_fd.mask(attribute.parse_classes))
            if pd_region == "placement":
                region_pd = placement_region(
                    lambda names: torch.from_numpy(parse_pd.mask(names)), attribute.category, attribute.parse_classes
                )
            else:
                region_pd = torch.from_numpy(parse_pd.mask(attribute.parse_classes))
            missing = [name for name, region in (("FD", region_fd), ("PD", region_pd)) if not region.any()]
            if missing:
                output.notes.append(
                    f"attribute {attribute.text!r}: no {'/'.join(attribute.parse_classes)} region in the "
                    f"{' and '.join(missing)} image; it is not blended"
                )
                continue
            heat = output.attention_maps[attribute.text]
            output.attribute_masks[attribute.text] = attribute_mask(heat, region_pd, region_fd)
        if output.attribute_masks:
            output.mask = merge_masks(list(output.attribute_masks.values()))
            output.latent_mask = to_latent_resolution(output.mask, latent_size)
