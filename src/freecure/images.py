"""Reading user images with clear errors and documented mode conversions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Conversions: palette and greyscale are expanded; an alpha channel is composited
    over white (a transparent background is not "black"); 16-bit and 32-bit integer
    greyscale ("I;16", "I") are rescaled from their full range to 0..255; float ("F")
    images are taken to lie in [0, 1].
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float64) * 255.0 + 0.5, 0, 255)
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageInput) -> Image.Image:
    """Load an image from a path, a PIL image or an array and return it as 8-bit RGB.

    Raises:
        InputError: the path does not exist, is not a readable image, or the array has
            a shape that is not (H, W), (H, W, 3) or (H, W, 4).
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise InputError(f"an image array must have shape (H, W), (H, W, 3) or (H, W, 4); got {array.shape}")
        if array.dtype != np.uint8:
            if np.issubdtype(array.dtype, np.floating):
                array = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
            else:
                top = float(np.iinfo(array.dtype).max)
                array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return to_rgb(Image.fromarray(array))
    path = Path(source)
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an image file, got a directory: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InputError(
            f"cannot read {path} as an image ({error}); give a PNG, JPEG, WebP or other format that Pillow reads"
        ) from None
