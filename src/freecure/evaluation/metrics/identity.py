"""Identity fidelity IF (paper §5.1 and §8.2) and the face crops of the diversity metric.

IF(I, R) = 100 · cos(φ(face(I)), φ(face(R))): the cosine between the face embedding of the
generated image I and that of the reference photo R, times 100 (the paper's "%"). With
several reference photos, IF is the mean over them. ``face(·)`` is the main face found by
MTCNN (Zhang et al. 2016; ``facenet-pytorch``'s weights, through
:class:`freecure.parsing.MTCNNFaceDetector`: the largest face with probability ≥ 0.9). A
generated image in which MTCNN finds no face has no IF: it is a *failure*, counted and
reported next to IF, never silently dropped.

Embedders φ:

- ``facenet`` (the paper's): InceptionResnetV1 trained on VGGFace2 (``facenet-pytorch``).
  Input: the MTCNN box, no margin, resized to 160×160 (bilinear) and standardised with
  ``(x − 127.5) / 128`` — what ``facenet_pytorch.MTCNN(image_size=160, margin=0)`` returns.
  Output: a unit 512-d vector. Weights: ``20180402-114759-vggface2.pt`` from facenet-pytorch's
  GitHub release, looked up as an explicit path, ``$FREECURE_FACENET_WEIGHTS``, the torch hub
  cache (``$TORCH_HOME/checkpoints``, where facenet-pytorch itself caches it), then
  downloaded there once. It is loaded with ``torch.load(weights_only=True)``.
- ``dlib`` (offline fallback): dlib's ResNet face descriptor (128-d, trained with a metric
  loss) on a 150×150 chip aligned by dlib's 5-point shape predictor inside the MTCNN box.
  Files: ``dlib_face_recognition_resnet_model_v1.dat`` and
  ``shape_predictor_5_face_landmarks.dat`` of the ``face-recognition-models`` sdist (or
  ``$FREECURE_DLIB_RECOGNITION`` and ``$FREECURE_DLIB_SHAPE_PREDICTOR``). Its cosines are not
  comparable with FaceNet's: dlib's descriptors of different people still have cosines
  around 0.8 (its own same-person test is Euclidean distance < 0.6).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...core.errors import InputError, WeightsNotFoundError
from ...parsing.face_crop import Box, FaceDetector, MTCNNFaceDetector
from ._files import resolve_file

logger = logging.getLogger(__name__)

FACE_SIZE = 160
FACENET_ENV_VAR = "FREECURE_FACENET_WEIGHTS"
FACENET_FILE = "20180402-114759-vggface2.pt"
FACENET_URL = f"https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/{FACENET_FILE}"
FACENET_HOW_TO = (
    f"Give the VGGFace2 FaceNet weights {FACENET_FILE} (--facenet-weights PATH or "
    f"{FACENET_ENV_VAR}), let them download once from facenet-pytorch's GitHub release into "
    "$TORCH_HOME/checkpoints, or use the offline identity model: --identity-model dlib."
)
DLIB_RECOGNITION_ENV_VAR = "FREECURE_DLIB_RECOGNITION"
DLIB_PREDICTOR_ENV_VAR = "FREECURE_DLIB_SHAPE_PREDICTOR"
DLIB_DISTRIBUTION = "face-recognition-models"
DLIB_RECOGNITION_FILE = "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"
DLIB_PREDICTOR_FILE = "face_recognition_models/models/shape_predictor_5_face_landmarks.dat"
DLIB_HOW_TO = (
    "Install dlib with `pip install dlib-bin` and its models with "
    "`pip install --no-deps face-recognition-models==0.3.0` (never imported; only its .dat "
    f"files are read), or name the files with {DLIB_RECOGNITION_ENV_VAR} and {DLIB_PREDICTOR_ENV_VAR}."
)


def face_crop(image: Image.Image, box: Box, size: int = FACE_SIZE) -> Image.Image:
    """The detector's box, no margin, resized to ``size``×``size`` (bilinear).

    The same crop as ``facenet_pytorch.extract_face(image, box, size, margin=0)``; it is
    FaceNet's input and the face region that the diversity metric compares.
    """
    return image.convert("RGB").crop(box).resize((size, size), Image.BILINEAR)


# --------------------------------------------------------------------------- FaceNet


def torch_checkpoints_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$TORCH_HOME/checkpoints`` (default ``~/.cache/torch/checkpoints``), facenet-pytorch's cache."""
    environ = os.environ if environ is None else environ
    home = environ.get("TORCH_HOME") or os.path.join(environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "checkpoints"


def resolve_facenet_weights(
    weights: str | os.PathLike | None = None, download: bool = True, environ: Mapping[str, str] | None = None
) -> Path:
    """Find (or download once) the VGGFace2 FaceNet weights; see the module docstring.

    Raises:
        WeightsNotFoundError: a given path does not exist, or there is no copy and
            ``download`` is False or the download failed.
    """
    environ = os.environ if environ is None else environ
    for value, what in ((weights, "given"), (environ.get(FACENET_ENV_VAR), f"named by {FACENET_ENV_VAR}")):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise WeightsNotFoundError(f"the FaceNet weights {what}, {path}, do not exist. {FACENET_HOW_TO}")
            return path
    cached = torch_checkpoints_dir(environ) / FACENET_FILE
    if cached.is_file():
        return cached
    if not download:
        raise WeightsNotFoundError(f"FaceNet weights not found at {cached} and downloads are off. {FACENET_HOW_TO}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("downloading FaceNet VGGFace2 weights from %s to %s", FACENET_URL, cached)
    try:
        torch.hub.download_url_to_file(FACENET_URL, str(cached), progress=False)
    except Exception as error:  # urllib raises many kinds; all mean "not available"
        raise WeightsNotFoundError(f"could not download {FACENET_URL}: {error}. {FACENET_HOW_TO}") from None
    return cached


def load_facenet(path: str | os.PathLike, device="cpu") -> torch.nn.Module:
    """``InceptionResnetV1(pretrained=None)`` with a state dict read by ``torch.load(weights_only=True)``.

    The classifier head of the released file (``logits.*``, 8631 VGGFace2 classes) is not
    part of the embedding network and is dropped; every other key must match.

    Raises:
        WeightsNotFoundError: the file is not a tensor-only state dict of InceptionResnetV1.
    """
    try:
        from facenet_pytorch import InceptionResnetV1
    except ImportError as error:
        raise ImportError(
            f"facenet_pytorch is not available ({error}); install it with `pip install --no-deps facenet-pytorch`"
        ) from error
    from ...core import checkpoints

    state = checkpoints.read_tensors(path, "FaceNet (InceptionResnetV1)", hint=FACENET_HOW_TO)
    state = {key: value for key, value in state.items() if not key.startswith("logits.")}
    model = InceptionResnetV1(pretrained=None, classify=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsNotFoundError(
            f"{path} does not match InceptionResnetV1: {str(error).splitlines()[0]}. {FACENET_HOW_TO}"
        ) from None
    return model.to(device).eval()


class FaceNetEmbedder:
    """φ = FaceNet (InceptionResnetV1, VGGFace2): the paper's identity model."""

    name = "facenet-vggface2"

    def __init__(self, model: torch.nn.Module, device="cpu"):
        self.model = model
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, device="cpu", download: bool = True):
        return cls(load_facenet(resolve_facenet_weights(weights, download), device), device)

    @torch.no_grad()
    def __call__(self, image: Image.Image, box: Box) -> torch.Tensor:
        crop = np.asarray(face_crop(image, box), dtype=np.float32)
        pixels = (torch.from_numpy(crop).permute(2, 0, 1)[None] - 127.5) / 128.0
        return self.model(pixels.to(self.device))[0].float().cpu()


# --------------------------------------------------------------------------- dlib


class DlibEmbedder:
    """φ = dlib's ResNet face descriptor on a 5-point-aligned chip (offline fallback)."""

    name = "dlib-resnet-v1"

    def __init__(self, recognition_model, shape_predictor):
        self.recognition_model = recognition_model
        self.shape_predictor = shape_predictor

    @classmethod
    def from_pretrained(
        cls, recognition: str | os.PathLike | None = None, shape_predictor: str | os.PathLike | None = None, **_
    ) -> DlibEmbedder:
        try:
            import dlib
        except ImportError as error:
            raise ImportError(f"dlib is not available ({error}). {DLIB_HOW_TO}") from error
        recognition = resolve_file(
            recognition, DLIB_RECOGNITION_ENV_VAR, DLIB_DISTRIBUTION, DLIB_RECOGNITION_FILE, DLIB_HOW_TO
        )
        shape_predictor = resolve_file(
            shape_predictor, DLIB_PREDICTOR_ENV_VAR, DLIB_DISTRIBUTION, DLIB_PREDICTOR_FILE, DLIB_HOW_TO
        )
        return cls(dlib.face_recognition_model_v1(str(recognition)), dlib.shape_predictor(str(shape_predictor)))

    def __call__(self, image: Image.Image, box: Box) -> torch.Tensor:
        import dlib

        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        shape = self.shape_predictor(pixels, dlib.rectangle(*(int(v) for v in box)))
        descriptor = self.recognition_model.compute_face_descriptor(pixels, shape)
        return torch.tensor(np.asarray(descriptor), dtype=torch.float32)


#: ``--identity-model`` names.
IDENTITY_MODELS = {"facenet": FaceNetEmbedder, "dlib": DlibEmbedder}


# --------------------------------------------------------------------------- IF


@dataclass
class Face:
    """The main face of an image: its box, embedding φ and the 160×160 crop."""

    box: Box
    embedding: torch.Tensor
    crop: Image.Image


class IdentityFidelity:
    """IF scorer: MTCNN finds the face, an embedder φ describes it; see the module docstring.

    Args:
        embedder: a callable (image, box) → 1-d embedding, e.g. :class:`FaceNetEmbedder`.
        detector: finds the main face's box; MTCNN when None.
        device: where MTCNN runs when ``detector`` is None.

    Example:
        >>> fidelity = IdentityFidelity(DlibEmbedder.from_pretrained())
        >>> reference = fidelity.reference("photo.png")
        >>> fidelity.score(generated_image, reference)  # 96.3, or None when there is no face
    """

    def __init__(self, embedder, detector: FaceDetector | None = None, device="cpu"):
        self.embedder = embedder
        self.detector = detector if detector is not None else MTCNNFaceDetector(device)

    @property
    def name(self) -> str:
        return f"mtcnn+{self.embedder.name}"

    @classmethod
    def from_name(cls, name: str, device="cpu", facenet_weights=None, download: bool = True) -> IdentityFidelity:
        if name not in IDENTITY_MODELS:
            raise InputError(f"unknown identity model {name!r}; choose one of {', '.join(IDENTITY_MODELS)}")
        if name == "facenet":
            embedder = FaceNetEmbedder.from_pretrained(facenet_weights, device=device, download=download)
        else:
            embedder = DlibEmbedder.from_pretrained()
        return cls(embedder, device=device)

    def face(self, image: Image.Image) -> Face | None:
        """The main face, or None when MTCNN finds none."""
        image = image.convert("RGB")
        box = self.detector(image)
        if box is None:
            return None
        return Face(box, self.embedder(image, box), face_crop(image, box))

    def reference(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Embeddings of an identity's reference photo(s).

        Raises:
            InputError: a reference photo shows no face MTCNN can find.
        """
        if isinstance(images, Image.Image):
            images = [images]
        embeddings = []
        for index, image in enumerate(images):
            face = self.face(image)
            if face is None:
                raise InputError(
                    f"no face found in reference photo {index + 1}: IF needs a visible, frontal face; "
                    "replace the photo or crop it closer"
                )
            embeddings.append(face.embedding)
        return embeddings

    @staticmethod
    def similarity(embedding: torch.Tensor, reference: Sequence[torch.Tensor]) -> float:
        """100 · mean over references of cos(embedding, reference)."""
        cosines = [torch.nn.functional.cosine_similarity(embedding, ref, dim=0) for ref in reference]
        return float(100.0 * torch.stack(cosines).mean())

    def score(self, image: Image.Image, reference: Sequence[torch.Tensor]) -> float | None:
        """IF of a generated image, or None (a failure) when it shows no face."""
        face = self.face(image)
        return None if face is None else self.similarity(face.embedding, reference)
