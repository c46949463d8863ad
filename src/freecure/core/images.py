"""Reading user images with clear errors and documented mode conversions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phone photos are stored sideways with a tag saying so).

    Every image freecure reads from a file goes through here (via :func:`load_image`); an
    image without the tag is returned unchanged.
    """
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):  # a broken EXIF block: keep the pixels
        return image


#: A reference photo's shorter side must be at least this many pixels to hold a usable face.
MIN_REFERENCE_SIDE = 32


def load_image(source: ImageInput) -> Image.Image:
    """Load an image from a path, a PIL image or an array and return it upright as 8-bit RGB.

    Files are turned upright by their EXIF orientation (:func:`upright`). Pillow's
    decompression-bomb limit applies (``PIL.Image.MAX_IMAGE_PIXELS``).

    Raises:
        InputError: the path does not exist, is not a readable image, is too large to decode
            safely, or the array has a shape that is not (H, W), (H, W, 3) or (H, W, 4).
    """
    if isinstance(source, Image.Image):
        return to_rgb(upright(source))
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise InputError(f"an image array must have shape (H, W), (H, W, 3) or (H, W, 4); got {array.shape}")
        if 0 in array.shape:
            raise InputError(f"an image array must not be empty; got shape {array.shape}")
        if array.dtype != np.uint8:
            if np.issubdtype(array.dtype, np.floating):
                if not np.isfinite(array).all():
                    raise InputError("an image array holds NaN or infinite values")
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
            return to_rgb(upright(image))
    except Image.DecompressionBombError as error:
        raise InputError(
            f"{path} is too large to decode safely ({error}); give an image of at most "
            f"{Image.MAX_IMAGE_PIXELS or 0:,} pixels (resize it first)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as error:
        raise InputError(
            f"cannot read {path} as an image ({error}); give a PNG, JPEG, WebP or other format that Pillow reads"
        ) from None


def load_reference(source: ImageInput, min_side: int = MIN_REFERENCE_SIDE) -> Image.Image:
    """:func:`load_image` for a reference photo of a face: also refuses images too small to
    hold one (shorter side under ``min_side`` pixels)."""
    image = load_image(source)
    if min(image.size) < min_side:
        name = source if isinstance(source, (str, os.PathLike)) else "a reference image"
        raise InputError(
            f"{name} is {image.width}×{image.height} px, too small to hold a face; give a photo whose "
            f"shorter side is at least {min_side} px"
        )
    return image
