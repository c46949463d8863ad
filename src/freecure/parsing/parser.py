"""The face parser Ψ(·) of SAME (§4.1, eq. 4): image → per-pixel CelebAMask-HQ label map.

:class:`FaceParser` is the protocol the engine depends on; :class:`BiSeNetFaceParser` is
the paper's choice (BiSeNet, §8.1). Pre-processing follows the released model: the face
region (see :mod:`.face_crop`) is resized to 512×512 with bilinear filtering and
normalised with the ImageNet mean and standard deviation. Post-processing returns labels
at the input's resolution: the 512×512 logits are bilinearly resized to the crop's size
and the argmax is taken there (smoother borders than resizing a label map). Crops larger
than :data:`LOGIT_RESIZE_LIMIT` take the argmax at that size and are enlarged
nearest-neighbour, which bounds memory.

Hair beyond the crop. The 2×-face-box crop matches the training framing of CelebAMask-HQ and
gives the most accurate face classes, but long hair falls outside it. A second, larger crop
(``hair_crop_scale``, default 3× the face box, centred on the face) is parsed as well, and
only its hair and hat labels are used, only outside the tight crop, and only where they are
connected to the hair or hat the tight crop found (:func:`extend_hair`): hair is one large
region that the network still recognises with the face smaller in view, whereas eyes, lips
and earrings need the tight crop's resolution; the connectivity rule drops stray "hair"
that the wider, less familiar framing may report on backgrounds. Inside the tight crop the
labels are exactly the tight crop's. Other pixels outside both crops are background.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.errors import InputError
from ..core.images import ImageInput, load_image
from ..core.labels import CLASSES, PALETTE, class_ids
from .bisenet import BiSeNet
from .face_crop import (
    INSTALL_HINT,
    Box,
    FaceDetector,
    MTCNNFaceDetector,
    clamp_box,
    face_crop_box,
)
from .weights import WeightsLocation, load_bisenet, resolve_bisenet_weights

logger = logging.getLogger(__name__)

INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOGIT_RESIZE_LIMIT = 1024


@dataclass
class ParseResult:
    """A face-parsing map Ψ(I) and how it was obtained.

    Attributes:
        labels: (H, W) uint8 class ids (:data:`~freecure.parsing.labels.CLASSES`) at the
            input's resolution.
        face_box: (left, top, right, bottom) of the detected face in input pixels, or None.
        crop_box: (left, top, right, bottom) of the region that was parsed.
        face_found: whether a face was detected (otherwise the whole image was parsed).
        note: a human-readable account, e.g. "no face detected; parsed the whole image".
        hair_box: the larger crop whose hair and hat extend the labels beyond ``crop_box``,
            or None.
    """

    labels: np.ndarray
    face_box: Box | None
    crop_box: Box
    face_found: bool
    note: str
    hair_box: Box | None = None

    def mask(self, names: Iterable[str] | str) -> np.ndarray:
        """Binary mask Ψ(I)_i of eq. (4): pixels whose class is one of ``names``.

        Args:
            names: class names (``"hair"``) and/or group names (``"eyes"``), see
                :func:`~freecure.parsing.labels.class_ids`; a single string is one name.

        Returns:
            (H, W) bool array.
        """
        if isinstance(names, str):
            names = [names]
        return np.isin(self.labels, class_ids(names))

    def fractions(self) -> dict[str, float]:
        """Fraction of the image's pixels in each class, for all 19 classes."""
        counts = np.bincount(self.labels.ravel(), minlength=len(CLASSES))[: len(CLASSES)]
        total = max(self.labels.size, 1)
        return {name: float(count) / total for name, count in zip(CLASSES, counts)}


class FaceParser(Protocol):
    """Ψ(·): anything that turns an image into a :class:`ParseResult`."""

    def __call__(self, image: ImageInput) -> ParseResult:
        """Parse one image (a path, PIL image or array, see :func:`freecure.images.load_image`)."""
        ...


@dataclass(frozen=True)
class _Region:
    """Where in one image the parser looks, and why."""

    face_box: Box | None
    crop_box: Box
    note: str
    hair_box: Box | None = None


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class BiSeNetFaceParser:
    """Ψ(·) with the released BiSeNet: crop the face, parse it, map labels back to the image.

    Args:
        model: a :class:`BiSeNet` (the released one, or a tiny random one in tests).
        detector: finds the face to crop; None parses the whole image.
        device: where the network runs (default: where ``model`` is).
        input_size: side of the square the network sees (512 for the release).
        crop_scale: face-crop side as a multiple of the face box (see :func:`face_crop_box`).
        crop_lift: upward shift of the crop, as a fraction of the face height.
        hair_crop_scale: side of the second, hair-only crop as a multiple of the face box
            (centred on the face); None parses the tight crop only. See :func:`extend_hair`.
        weights: where the model's checkpoint came from (reported by the CLI).
        no_detector_note: why there is no detector, used in results when ``detector`` is None.
    """

    def __init__(
        self,
        model: BiSeNet,
        detector: FaceDetector | None = None,
        device: torch.device | str | None = None,
        *,
        input_size: int = INPUT_SIZE,
        crop_scale: float = 2.0,
        crop_lift: float = 0.1,
        hair_crop_scale: float | None = 3.0,
        weights: WeightsLocation | None = None,
        no_detector_note: str = "face detection is off",
    ) -> None:
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.detector = detector
        self.input_size = input_size
        self.crop_scale = crop_scale
        self.crop_lift = crop_lift
        self.hair_crop_scale = hair_crop_scale
        self.weights = weights
        self.no_detector_note = no_detector_note

    @classmethod
    def from_pretrained(
        cls,
        weights: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        detect_faces: bool = True,
    ) -> BiSeNetFaceParser:
        """Load the released ``79999_iter.pth`` and, if available, the MTCNN face detector.

        Args:
            weights: checkpoint path; None searches the places listed in
                :mod:`freecure.parsing.weights`.
            device: default CUDA when available, else CPU.
            detect_faces: crop around a detected face; False always parses the whole image.
                Without ``facenet-pytorch`` installed, a warning is logged and the whole
                image is parsed.

        Raises:
            WeightsNotFoundError: the checkpoint is missing or does not match BiSeNet.
        """
        location = resolve_bisenet_weights(weights)
        device = _default_device(device)
        model = load_bisenet(location.path, device)
        detector: FaceDetector | None = None
        note = "face detection is off"
        if detect_faces:
            try:
                detector = MTCNNFaceDetector(device)
            except ImportError:
                note = f"no face detector is installed ({INSTALL_HINT})"
                logger.warning("%s; the face parser will parse whole images", note)
        return cls(model, detector, device, weights=location, no_detector_note=note)

    def __call__(self, image: ImageInput) -> ParseResult:
        """Parse one image; see :meth:`parse_batch`."""
        return self.parse_batch([image])[0]

    @torch.inference_mode()
    def parse_batch(self, images: Sequence[ImageInput], batch_size: int = 8) -> list[ParseResult]:
        """Parse several images, running BiSeNet on up to ``batch_size`` crops at a time.

        Args:
            images: anything :func:`~freecure.images.load_image` accepts; sizes may differ.
            batch_size: crops per forward pass (bounds memory).

        Returns:
            One :class:`ParseResult` per image, in order.

        Raises:
            InputError: an image cannot be read.
        """
        pictures = [load_image(image) for image in images]
        regions = [self._locate(picture) for picture in pictures]
        results: list[ParseResult] = []
        for start in range(0, len(pictures), batch_size):
            chunk = slice(start, start + batch_size)
            logits = self._logits(pictures[chunk], [region.crop_box for region in regions[chunk]])
            wide = [(p, r) for p, r in zip(pictures[chunk], regions[chunk]) if r.hair_box is not None]
            wide_logits = iter(self._logits([p for p, _ in wide], [r.hair_box for _, r in wide]) if wide else ())
            for picture, region, logit in zip(pictures[chunk], regions[chunk], logits):
                labels = labels_in_image(logit, region.crop_box, picture.size)
                if region.hair_box is not None:
                    wide_labels = labels_in_image(next(wide_logits), region.hair_box, picture.size)
                    labels = extend_hair(labels, wide_labels, region.crop_box)
                results.append(
                    ParseResult(
                        labels=labels,
                        face_box=region.face_box,
                        crop_box=region.crop_box,
                        face_found=region.face_box is not None,
                        note=region.note,
                        hair_box=region.hair_box,
                    )
                )
        return results

    def _locate(self, image: Image.Image) -> _Region:
        """Step 1: the face box and the crop to parse, or the whole image with a note."""
        whole = (0, 0, image.width, image.height)
        if self.detector is None:
            logger.info("%s; parsing the whole image", self.no_detector_note)
            return _Region(None, whole, f"{self.no_detector_note}; parsed the whole image")
        detected = self.detector(image)
        if detected is None:
            logger.warning("no face detected; parsing the whole %dx%d image", *image.size)
            return _Region(None, whole, "no face detected; parsed the whole image")
        face_box = clamp_box(detected, image.size)
        crop_box = face_crop_box(face_box, image.size, self.crop_scale, self.crop_lift)
        note = f"face detected at {face_box}; parsed the square crop {crop_box}"
        hair_box = None
        if self.hair_crop_scale is not None:
            hair_box = face_crop_box(face_box, image.size, self.hair_crop_scale, lift=0.0)
            if hair_box == crop_box:
                hair_box = None
            else:
                note += f" and its hair in {hair_box}"
        return _Region(face_box, crop_box, note, hair_box)

    def _logits(self, images: Sequence[Image.Image], boxes: Sequence[Box]) -> torch.Tensor:
        """Steps 2–3: normalised crops → BiSeNet logits, (N, 19, input_size, input_size)."""
        batch = torch.stack([preprocess(image, box, self.input_size) for image, box in zip(images, boxes)])
        return self.model(batch.to(self.device)).float().cpu()


def preprocess(image: Image.Image, crop_box: Box, size: int = INPUT_SIZE) -> torch.Tensor:
    """Crop, resize to ``size``×``size`` (bilinear) and normalise with ImageNet mean/std.

    Returns:
        (3, size, size) float32 tensor.
    """
    crop = image.crop(crop_box).resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(crop, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def labels_in_image(logits: torch.Tensor, crop_box: Box, image_size: tuple[int, int]) -> np.ndarray:
    """Step 4: logits of one crop → uint8 label map of the whole image.

    The logits are resized (bilinear) to the crop's size, capped at
    :data:`LOGIT_RESIZE_LIMIT` per side, and the argmax is taken; a capped map is enlarged
    nearest-neighbour. Pixels outside ``crop_box`` are background (0).

    Args:
        logits: (C, h, w) logits of the crop.
        crop_box: where the crop lies in the image.
        image_size: (width, height) of the image.
    """
    left, top, right, bottom = crop_box
    crop_width, crop_height = right - left, bottom - top
    shrink = min(1.0, LOGIT_RESIZE_LIMIT / max(crop_width, crop_height))
    size = (max(1, round(crop_height * shrink)), max(1, round(crop_width * shrink)))
    resized = F.interpolate(logits[None], size=size, mode="bilinear", antialias=True)[0]
    crop_labels = resized.argmax(dim=0).to(torch.uint8).numpy()
    if size != (crop_height, crop_width):
        enlarged = Image.fromarray(crop_labels).resize(
            (crop_width, crop_height), Image.Resampling.NEAREST
        )
        crop_labels = np.asarray(enlarged)
    width, height = image_size
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[top:bottom, left:right] = crop_labels
    return labels


HAIR_CLASSES = ("hair", "hat")
_GROW_GRID = 128


def extend_hair(labels: np.ndarray, wide_labels: np.ndarray, crop_box: Box) -> np.ndarray:
    """The tight crop's labels, plus the wide crop's hair and hat outside the tight crop where
    they connect to the tight crop's own hair or hat.

    Connectivity is geodesic growth (repeated 3×3 dilation inside the allowed region) on a
    grid of at most 128 cells per side: it follows hair down the shoulders, and it drops
    "hair" the wide crop reports on a background that does not touch the head.

    Args:
        labels, wide_labels: (H, W) label maps of the whole image from the two crops.
        crop_box: the tight crop; inside it ``labels`` are returned unchanged.
    """
    hair_ids = list(class_ids(HAIR_CLASSES))
    left, top, right, bottom = crop_box
    outside = np.ones(labels.shape, dtype=bool)
    outside[top:bottom, left:right] = False
    seed = np.isin(labels, hair_ids)
    candidate = np.isin(wide_labels, hair_ids) & outside
    if not seed.any() or not candidate.any():
        return labels
    height, width = labels.shape
    grid = (min(height, _GROW_GRID), min(width, _GROW_GRID))

    def coarse(mask: np.ndarray) -> torch.Tensor:
        return F.adaptive_max_pool2d(torch.from_numpy(mask).float()[None, None], grid)

    allowed, reached = coarse(seed | candidate), coarse(seed)
    while True:
        grown = F.max_pool2d(reached, 3, stride=1, padding=1) * allowed
        if torch.equal(grown, reached):
            break
        reached = grown
    connected = F.interpolate(reached, size=labels.shape, mode="nearest")[0, 0].numpy() > 0
    extended = labels.copy()
    keep = candidate & connected
    extended[keep] = wide_labels[keep]
    return extended


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            f"a label map must be a 2-D integer array; got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(PALETTE)):
        raise InputError(
            f"label ids must lie in 0..{len(PALETTE) - 1}; got {labels.min()}..{labels.max()}"
        )
    return labels


def render_label_map(labels: np.ndarray) -> Image.Image:
    """Colour image of a label map, one :data:`~freecure.parsing.labels.PALETTE` colour per class.

    Raises:
        InputError: ``labels`` is not a 2-D integer array of valid class ids.
    """
    labels = _check_labels(labels)
    palette = np.array(PALETTE, dtype=np.uint8)
    return Image.fromarray(palette[labels])


def overlay_labels(image: ImageInput, labels: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with the class colours blended over every non-background pixel.

    Args:
        image: anything :func:`~freecure.images.load_image` accepts, of the labels' size.
        labels: (H, W) class ids.
        alpha: opacity of the colours (0 shows only the image, 1 only the colours).

    Raises:
        InputError: sizes differ, ``alpha`` is outside [0, 1], or the labels are invalid.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must lie in [0, 1]; got {alpha}")
    labels = _check_labels(labels)
    base = np.asarray(load_image(image), dtype=np.float32)
    if base.shape[:2] != labels.shape:
        raise InputError(
            f"image is {base.shape[1]}x{base.shape[0]} but the label map is "
            f"{labels.shape[1]}x{labels.shape[0]}"
        )
    colours = np.asarray(render_label_map(labels), dtype=np.float32)
    blended = np.where(labels[..., None] > 0, (1 - alpha) * base + alpha * colours, base)
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
