"""Face detection and the square crop the face parser Ψ looks at.

The released BiSeNet was trained on CelebAMask-HQ, where the face fills the middle of a
square image and the hair is visible. :func:`face_crop_box` turns a detector's tight face
box into such a square: enlarged by ``scale`` around the box, lifted a little to include
the hair, and clamped to the image. Detection uses MTCNN (Zhang et al. 2016) from the
optional ``facenet-pytorch`` package.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
"""(left, top, right, bottom) in pixels; right and bottom are exclusive."""

INSTALL_HINT = (
    "install the MTCNN face detector with `pip install --no-deps facenet-pytorch` "
    "(it also needs torchvision: `pip install torchvision`)"
)


class FaceDetector(Protocol):
    """Anything that finds the main face of an RGB image."""

    def __call__(self, image: Image.Image) -> Box | None:
        """The (left, top, right, bottom) box of the main face, or None if there is none."""
        ...


class MTCNNFaceDetector:
    """MTCNN from ``facenet-pytorch`` (weights ship inside its wheel).

    Among the faces found with probability at least ``min_probability`` it returns the
    largest one: the subject of a portrait.

    Args:
        device: where MTCNN runs.
        min_probability: detections less confident than this are ignored.

    Raises:
        ImportError: ``facenet_pytorch`` is not installed; the message says how to install it.
    """

    def __init__(self, device: torch.device | str = "cpu", min_probability: float = 0.9) -> None:
        try:
            from facenet_pytorch import MTCNN
        except ImportError as error:
            raise ImportError(
                f"facenet_pytorch is not available ({error}); {INSTALL_HINT}"
            ) from error
        self.min_probability = min_probability
        self._mtcnn = MTCNN(keep_all=True, device=torch.device(device))

    def __call__(self, image: Image.Image) -> Box | None:
        boxes, probabilities = self._mtcnn.detect(image.convert("RGB"))
        if boxes is None:
            return None
        candidates = [
            box
            for box, probability in zip(boxes, probabilities)
            if probability is not None and probability >= self.min_probability
        ]
        if not candidates:
            return None
        largest = max(candidates, key=lambda box: (box[2] - box[0]) * (box[3] - box[1]))
        return clamp_box(largest, image.size)


def clamp_box(box, image_size: tuple[int, int]) -> Box:
    """Round a float box to whole pixels inside an image of ``image_size`` = (width, height)."""
    width, height = image_size
    left, top, right, bottom = (float(value) for value in box)
    left = int(np.clip(np.floor(left), 0, width - 1))
    top = int(np.clip(np.floor(top), 0, height - 1))
    right = int(np.clip(np.ceil(right), left + 1, width))
    bottom = int(np.clip(np.ceil(bottom), top + 1, height))
    return left, top, right, bottom


def face_crop_box(
    face_box: Box, image_size: tuple[int, int], scale: float = 2.0, lift: float = 0.1
) -> Box:
    """Square region around a face for the parser: face, hair and some background.

    Args:
        face_box: the detector's (left, top, right, bottom) face box.
        image_size: (width, height) of the image.
        scale: side of the square as a multiple of the face box's longer side.
        lift: move the square's centre up by this fraction of the face height, so the hair
            above the forehead is inside.

    Returns:
        A square box inside the image. It is shifted (not cut) where it would cross an
        edge, and only shrinks when the image itself is smaller than the square.
    """
    width, height = image_size
    left, top, right, bottom = face_box
    side = round(scale * max(right - left, bottom - top))
    side = max(1, min(side, width, height))
    centre_x = (left + right) / 2
    centre_y = (top + bottom) / 2 - lift * (bottom - top)
    crop_left = int(np.clip(round(centre_x - side / 2), 0, width - side))
    crop_top = int(np.clip(round(centre_y - side / 2), 0, height - side))
    return crop_left, crop_top, crop_left + side, crop_top + side
