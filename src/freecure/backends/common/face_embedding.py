"""Face-recognition embeddings and keypoints for the adapter backends (IP-Adapter-FaceID,
InstantID, and any other insightface-based method).

The released methods compute, from the reference photo, with insightface:

* IP-Adapter-FaceID: ``buffalo_l``'s ArcFace embedding, L2-normalised (``normed_embedding``);
* InstantID: ``antelopev2``'s raw embedding (``embedding``) and the 5 facial keypoints
  (eyes, nose, mouth corners) of the largest face, drawn into IdentityNet's control image.

insightface's pretrained models are licensed for **non-commercial research only**, and
insightface/onnxruntime are an optional extra (``pip install 'freecure[insightface]'``). A
precomputed embedding (``--face-embedding FILE.safetensors``, and ``--face-keypoints FILE`` for
InstantID) lets the backends run without it. The file's tensors:

``id_embedding`` (512,) or (1, 512) — required; ``keypoints`` (5, 2) — pixel (x, y) in the
photo, optional; ``image_size`` (2,) — (width, height) of that photo, integers, optional;
``clip_embedding`` (257, 1280) and ``negative_clip_embedding`` (257, 1280) — CLIP ViT-H
penultimate hidden states of the aligned face and of a zero image (IP-Adapter-FaceID
Plus/PlusV2 only). Each backend's ``identity_schema`` (:func:`face_file_schema`, checked by
:mod:`.identity_files`) says which it reads, with the widths of its model.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...core.errors import InputError, WeightsNotFoundError
from ...core.options import Option
from .identity_files import MAX_IMAGE_SIDE, IdentitySchema, TensorField, read_identity_file

logger = logging.getLogger(__name__)

#: ArcFace embedding width (buffalo_l and antelopev2).
FACE_EMBEDDING_DIM = 512

INSIGHTFACE_LICENCE = (
    "insightface's pretrained face models (buffalo_l, antelopev2) are available for NON-COMMERCIAL "
    "research purposes only"
)


def how_to_supply(method: str, keypoints: bool = False) -> str:
    """The one-line instruction given when no face embedding can be computed."""
    extra = " and --face-keypoints FILE.json (5 [x, y] pairs)" if keypoints else ""
    return (
        f"{method} needs a face-recognition embedding of the reference: install insightface "
        f"(`pip install 'freecure[insightface]'`, i.e. insightface and onnxruntime; {INSIGHTFACE_LICENCE}), "
        f"or pass a precomputed one with --face-embedding FILE.safetensors (tensor 'id_embedding', 512 floats){extra}. "
        "To try the machinery offline, run with --tiny."
    )


@dataclass(frozen=True)
class FaceEmbedding:
    """One reference face.

    Attributes:
        id_embedding: the face-recognition embedding, (512,).
        keypoints: 5 (x, y) keypoints in the photo's pixels, (5, 2), or None.
        image_size: (width, height) of the photo the keypoints refer to, or None.
        clip_embedding, negative_clip_embedding: CLIP ViT-H penultimate states of the aligned
            face and of a zero image, (257, 1280) each (IP-Adapter-FaceID Plus only), or None.
        aligned_face: the face aligned to ArcFace's template (insightface ``norm_crop``, 224 px),
            from which a CLIP encoder computes the Plus variants' states; None for files.
    """

    id_embedding: torch.Tensor
    keypoints: torch.Tensor | None = None
    image_size: tuple[int, int] | None = None
    clip_embedding: torch.Tensor | None = None
    negative_clip_embedding: torch.Tensor | None = None
    aligned_face: Image.Image | None = None

    def __post_init__(self):
        if self.id_embedding.ndim != 1 or not torch.isfinite(self.id_embedding).all():
            raise InputError(f"a face embedding must be one finite vector, got shape {tuple(self.id_embedding.shape)}")
        if self.keypoints is not None and (
            tuple(self.keypoints.shape) != (5, 2) or not torch.isfinite(self.keypoints).all()
        ):
            raise InputError(f"face keypoints must be 5 finite (x, y) pairs, got shape {tuple(self.keypoints.shape)}")
        for name in ("clip_embedding", "negative_clip_embedding"):
            value = getattr(self, name)
            if value is not None and (value.ndim != 2 or not torch.isfinite(value).all()):
                raise InputError(f"{name} must be a finite (tokens, width) matrix, got shape {tuple(value.shape)}")


# --------------------------------------------------------------------------- the file format

#: The tensors of the insightface backends' ``--face-embedding`` file (:mod:`.identity_files`);
#: each backend's ``identity_schema`` takes the ones it reads (:func:`face_file_schema`).
ID_EMBEDDING = TensorField(
    "id_embedding",
    (("id_width",), (1, "id_width")),
    "the face-recognition (ArcFace) embedding of insightface",
)
KEYPOINTS = TensorField(
    "keypoints",
    ((5, 2),),
    "pixel (x, y) of eyes, nose and mouth corners in the photo",
    kind="real",
    required=False,
    bound=MAX_IMAGE_SIDE,
    within="image_size",
)
IMAGE_SIZE = TensorField(
    "image_size",
    ((2,),),
    "(width, height) of the photo the keypoints are in",
    kind="int",
    required=False,
    bound=None,
    minimum=1,
    maximum=MAX_IMAGE_SIDE,
)
CLIP_EMBEDDING = TensorField(
    "clip_embedding",
    (("clip_tokens", "clip_width"),),
    "CLIP ViT-H penultimate hidden states of the aligned face (required by Plus/PlusV2)",
    required=False,
)
NEGATIVE_CLIP_EMBEDDING = TensorField(
    "negative_clip_embedding",
    (("clip_tokens", "clip_width"),),
    "the same of an all-zero image, for the negative branch (required by Plus/PlusV2)",
    required=False,
)


def face_file_schema(backend: str, doc: str, what: str, clip: bool) -> IdentitySchema:
    """The ``--face-embedding`` schema of an insightface backend: ``id_embedding`` (``what``
    says which embedding), the optional keypoints and photo size, and (``clip``) the CLIP states."""
    fields = [replace(ID_EMBEDDING, what=what), KEYPOINTS, IMAGE_SIZE]
    if clip:
        fields += [CLIP_EMBEDDING, NEGATIVE_CLIP_EMBEDDING]
    return IdentitySchema(backend, "--face-embedding", tuple(fields), doc)


#: The whole format, for readers that name no backend.
FACE_FILE_SCHEMA = face_file_schema(
    "an insightface backend", "docs/backends/ip_adapter_faceid.md", ID_EMBEDDING.what, clip=True
)


def face_from_tensors(tensors: dict[str, torch.Tensor]) -> FaceEmbedding:
    """A :class:`FaceEmbedding` of a checked file's tensors."""
    size = tensors.get("image_size")
    optional = {name: tensors[name].float() for name in ("keypoints", "clip_embedding", "negative_clip_embedding")
                if name in tensors}
    return FaceEmbedding(
        id_embedding=tensors["id_embedding"].float().reshape(-1),
        image_size=None if size is None else (int(size[0]), int(size[1])),
        **optional,
    )


def load_face_embedding(
    path: str | os.PathLike,
    schema: IdentitySchema = FACE_FILE_SCHEMA,
    dims: dict[str, int] | None = None,
    size: tuple[int, int] | None = None,
) -> FaceEmbedding:
    """Read a ``--face-embedding`` file, checked against ``schema`` (the backend's
    ``identity_schema``) with the model's widths ``dims`` (default: the 512-d embedding);
    ``size`` is the reference photo's (width, height) for keypoints without ``image_size``."""
    dims = {"id_width": FACE_EMBEDDING_DIM} if dims is None else dims
    return face_from_tensors(read_identity_file(path, schema, dims, size=size))


def save_face_embedding(path: str | os.PathLike, face: FaceEmbedding) -> None:
    """Write ``face`` in the ``--face-embedding`` format."""
    from safetensors.torch import save_file

    tensors = {"id_embedding": face.id_embedding.float().contiguous()}
    if face.keypoints is not None:
        tensors["keypoints"] = face.keypoints.float().contiguous()
    if face.image_size is not None:
        tensors["image_size"] = torch.tensor(face.image_size, dtype=torch.int64)
    for name in ("clip_embedding", "negative_clip_embedding"):
        if getattr(face, name) is not None:
            tensors[name] = getattr(face, name).contiguous()
    save_file(tensors, str(path))


#: ``--face-keypoints``: a JSON list of the 5 [x, y] pairs.
KEYPOINTS_FILE_SCHEMA = IdentitySchema(
    "instantid", "--face-keypoints", (replace(KEYPOINTS, required=True),), "docs/backends/instantid.md"
)


def load_face_keypoints(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read ``--face-keypoints``: a JSON list of 5 ``[x, y]`` pixel pairs, (5, 2), inside the
    photo of (width, height) ``size`` when given."""
    return read_identity_file(path, KEYPOINTS_FILE_SCHEMA, size=size)["keypoints"].float()


# --------------------------------------------------------------------------- analyzers


class InsightFaceAnalyzer:
    """insightface's ``FaceAnalysis`` (detection + recognition): the largest face of a photo.

    Args:
        name: model pack, ``"buffalo_l"`` (IP-Adapter-FaceID) or ``"antelopev2"`` (InstantID).
        normed: return the L2-normalised embedding (IP-Adapter-FaceID's ``normed_embedding``)
            instead of the raw one (InstantID's ``embedding``).
    """

    def __init__(
        self,
        name: str,
        normed: bool,
        device: torch.device | str = "cpu",
        root: str | None = None,
        aligned_size: int | None = None,
    ):
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise InputError(how_to_supply("this backend")) from None
        logger.warning(INSIGHTFACE_LICENCE)
        cuda = torch.device(device).type == "cuda"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        try:
            self.app = FaceAnalysis(name=name, providers=providers, **({"root": root} if root else {}))
            self.app.prepare(ctx_id=0 if cuda else -1, det_size=(640, 640))
        except Exception as error:  # insightface downloads its models on first use
            raise WeightsNotFoundError(
                f"could not load insightface's {name!r} models ({error}); insightface downloads them on first "
                "use (network needed), or pass --face-embedding FILE.safetensors. Offline, try --tiny."
            ) from None
        self.normed = normed
        self.aligned_size = aligned_size

    def __call__(self, image: Image.Image) -> FaceEmbedding:
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
        faces = self.app.get(bgr)
        if not faces:
            raise InputError("no face detected in the reference photo; pass --face-embedding FILE.safetensors")
        face = max(faces, key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]))
        vector = face["normed_embedding"] if self.normed else face["embedding"]
        aligned = None
        if self.aligned_size:  # IP-Adapter-FaceID Plus: face_align.norm_crop(image, kps, 224)
            from insightface.utils import face_align

            crop = face_align.norm_crop(bgr, landmark=face["kps"], image_size=self.aligned_size)
            aligned = Image.fromarray(np.ascontiguousarray(crop[:, :, ::-1]))
        return FaceEmbedding(
            id_embedding=torch.from_numpy(np.asarray(vector, dtype=np.float32)),
            keypoints=torch.from_numpy(np.asarray(face["kps"], dtype=np.float32)),
            image_size=image.size,
            aligned_face=aligned,
        )


class RandomFaceAnalyzer:
    """A checkpoint-free stand-in for insightface (``--tiny``): a fixed random projection of the
    downsampled photo, and keypoints of a centred frontal face. Its output has no meaning."""

    def __init__(self, dim: int = FACE_EMBEDDING_DIM, clip_shape: tuple[int, int] | None = None, seed: int = 0):
        from .random_identity import RandomProjectionIdentityEncoder

        self.projection = RandomProjectionIdentityEncoder(dim, seed=seed)
        self.clip_shape = clip_shape
        self.seed = seed

    def __call__(self, image: Image.Image) -> FaceEmbedding:
        w, h = image.size
        keypoints = torch.tensor([[0.38, 0.42], [0.62, 0.42], [0.5, 0.55], [0.41, 0.68], [0.59, 0.68]]) * torch.tensor(
            [w, h]
        )
        clip = negative = None
        if self.clip_shape is not None:
            g = torch.Generator().manual_seed(self.seed + 1)
            clip = torch.randn(self.clip_shape, generator=g) + self.projection([image])[: self.clip_shape[1]].mean()
            negative = torch.randn(self.clip_shape, generator=g)
        return FaceEmbedding(self.projection([image]), keypoints, (w, h), clip, negative)


class ClipFaceEncoder:
    """The Plus variants' CLIP states, as the original's ``get_image_embeds``: the aligned face
    through ``CLIPImageProcessor()`` (224 px, OpenAI CLIP normalisation) and the CLIP vision
    tower (ViT-H/14 of ``h94/IP-Adapter``, ``models/image_encoder``), penultimate hidden state;
    the negative branch's states are those of an all-zero (normalised) image."""

    def __init__(self, image_encoder, processor=None):
        from transformers import CLIPImageProcessor

        self.image_encoder = image_encoder.eval().requires_grad_(False)
        self.processor = processor or CLIPImageProcessor()

    @torch.no_grad()
    def __call__(self, aligned_face: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.image_encoder
        pixels = self.processor(images=aligned_face.convert("RGB"), return_tensors="pt").pixel_values
        pixels = pixels.to(device=encoder.device, dtype=encoder.dtype)
        states = [
            encoder(x, output_hidden_states=True).hidden_states[-2][0].float().cpu()
            for x in (pixels, torch.zeros_like(pixels))
        ]
        return states[0], states[1]

    def fill(self, face: FaceEmbedding) -> FaceEmbedding:
        """``face`` with its CLIP states computed from its aligned face (kept when already there)."""
        if face.clip_embedding is not None or face.aligned_face is None:
            return face
        clip, negative = self(face.aligned_face)
        return replace(face, clip_embedding=clip, negative_clip_embedding=negative)


def reference_face(
    references: Sequence[Image.Image],
    embedding_file: str | os.PathLike | None,
    keypoints_file: str | os.PathLike | None,
    analyzer,
    method: str,
    need_keypoints: bool = False,
    schema: IdentitySchema = FACE_FILE_SCHEMA,
    dims: dict[str, int] | None = None,
) -> FaceEmbedding:
    """The face a run conditions on: the ``--face-embedding`` file if given (keypoints from
    ``--face-keypoints`` override the file's), else ``analyzer`` on the first reference photo.

    The files are checked against ``schema`` with the model's widths ``dims``. Keypoints are
    pixels of the photo of the file's ``image_size``, else of the first reference photo; they
    must lie inside it.

    Raises:
        InputError: no file, no analyzer, or no reference; a file that does not fit; the message
            says what to pass.
    """
    photo = references[0].size if references else None
    if embedding_file is not None:
        face = load_face_embedding(embedding_file, schema, dims, size=photo)
    elif analyzer is not None and references:
        face = analyzer(references[0])
    else:
        if analyzer is not None:
            raise InputError(f"{method} needs a reference photo (--ref) or --face-embedding FILE.safetensors")
        raise InputError(how_to_supply(method, keypoints=need_keypoints))
    if keypoints_file is not None:
        size = face.image_size or photo
        face = replace(face, keypoints=load_face_keypoints(keypoints_file, size=size), image_size=size)
    elif face.keypoints is not None and face.image_size is None:
        face = replace(face, image_size=photo)  # a file's keypoints are the photo's pixels too
    if need_keypoints and face.keypoints is None:
        raise InputError(f"{method} needs the face's 5 keypoints: pass --face-keypoints FILE.json (5 [x, y] pairs)")
    return face


#: ``--face-embedding`` of the insightface-based adapters (a backend declares what it reads).
FACE_EMBEDDING_OPTION = Option(
    "--face-embedding",
    metavar="FILE",
    help="ip-adapter-faceid/instantid: precomputed face embedding (safetensors, tensor 'id_embedding'; "
    "see docs/backends/ip_adapter_faceid.md) instead of running insightface",
)
#: ``--face-keypoints``: InstantID's five keypoints.
FACE_KEYPOINTS_OPTION = Option(
    "--face-keypoints", metavar="FILE", help="instantid: the face's 5 keypoints as a JSON list of [x, y] pixel pairs"
)


# --------------------------------------------------------------------------- keypoint image

#: Colours of the 5 keypoints (left eye, right eye, nose, left and right mouth corner).
KEYPOINT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
#: Limbs from each keypoint to the nose, coloured like their first end.
KEYPOINT_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))


def draw_keypoints(
    size: tuple[int, int], keypoints: torch.Tensor, stick_width: int = 4, radius: int = 10
) -> Image.Image:
    """InstantID's control image: on black, a filled ellipse (half-width ``stick_width``)
    from each of eyes and mouth corners to the nose, at 60 % of its keypoint's colour, then
    a disc of radius ``radius`` in full colour on each keypoint.

    Drawn with PIL from the original's description (its OpenCV rasterisation differs by a few
    edge pixels).
    """
    width, height = size
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    kps = [tuple(map(float, point)) for point in keypoints.tolist()]
    for a, b in KEYPOINT_LIMBS:
        (x0, y0), (x1, y1) = kps[a], kps[b]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        half = math.hypot(x1 - x0, y1 - y0) / 2
        angle = math.atan2(y0 - y1, x0 - x1)
        polygon = [
            (
                cx + half * math.cos(s) * math.cos(angle) - stick_width * math.sin(s) * math.sin(angle),
                cy + half * math.cos(s) * math.sin(angle) + stick_width * math.sin(s) * math.cos(angle),
            )
            for s in np.linspace(0, 2 * math.pi, 72, endpoint=False)
        ]
        draw.polygon(polygon, fill=tuple(int(c * 0.6) for c in KEYPOINT_COLOURS[a]))
    for (x, y), colour in zip(kps, KEYPOINT_COLOURS):
        draw.ellipse((int(x) - radius, int(y) - radius, int(x) + radius, int(y) + radius), fill=colour)
    return canvas


def scale_keypoints(keypoints: torch.Tensor, source: tuple[int, int] | None, target: tuple[int, int]) -> torch.Tensor:
    """Keypoints from a ``source`` (width, height) photo to a ``target`` (width, height) image."""
    if source is None:
        return keypoints
    return keypoints * torch.tensor([target[0] / source[0], target[1] / source[1]])
