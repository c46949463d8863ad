"""What PuLID's IDFormer reads about a face, and the ``--face-embedding`` file that holds it.

The original (ToTheBeginning/PuLID @ 1aa2fc7, ``get_id_embedding``) builds, per reference photo:

1. the antelopev2 ArcFace embedding (512) of the largest detected face (insightface;
   its models are for **non-commercial research only**);
2. the face aligned to 512 × 512, parsed by BiSeNet; background, ears, earrings, neck,
   necklace, cloth and hat (labels 0, 7, 8, 9, 14, 15, 16, 18) are set to white and the rest is
   converted to grey (:func:`face_features_image`, with the BiSeNet parser we ship);
3. EVA02-CLIP-L-14-336 on that image (resized to 336, bicubic, normalised with OpenAI CLIP's
   mean/std): its image embedding (768, L2-normalised) and the hidden states entering its
   blocks 4, 8, 12, 16, 20 (each (577, 1024));
4. ``id_cond`` = [ArcFace; EVA-CLIP embedding] (1280) and the five hidden states.

The IDFormer's *unconditional* input is all zeros of the same shapes.

:mod:`.pulid_encoder` computes it (optional extra ``freecure[pulid]``: insightface, onnxruntime,
timm); a ``--face-embedding`` safetensors file (``freecure embed`` writes one) carries steps 1–4's
result instead, with tensors

* ``id_cond``: (refs, 1280),
* ``vit_hidden.0`` … ``vit_hidden.4``: (refs, 577, 1024),

one row per reference photo (PuLID SDXL v1.1 accepts several: ``id_cond`` becomes
(1, refs, 1280) and the hidden states are concatenated along the patch axis, as the original
does; PuLID-FLUX takes one). :func:`pulid_schema` is the file's schema (:mod:`.identity_files`);
the widths come from the IDFormer (:data:`RELEASED_DIMS`, or the tiny one's under ``--tiny``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...core.errors import InputError
from ..common.identity_files import IdentitySchema, TensorField, read_identity_file
from .idformer import VIT_ROUNDS

#: BiSeNet (CelebAMask-HQ) labels the original whitens before EVA-CLIP sees the face.
BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)

INSIGHTFACE_LICENSE = "insightface antelopev2 models: non-commercial research use only"


#: The released sizes: ``id_cond`` 1280 (ArcFace 512 ‖ EVA-CLIP 768), EVA02-CLIP-L-14-336's
#: hidden states 577 patches (24² + class token) of 1024.
RELEASED_DIMS = {"id_dim": 1280, "vit_dim": 1024, "patches": 577}


def pulid_schema(backend: str) -> IdentitySchema:
    """The ``--face-embedding`` schema of a PuLID backend: ``id_cond`` and the five hidden states,
    one row per reference photo (``refs``, the same in every tensor)."""
    hidden = tuple(
        TensorField(
            f"vit_hidden.{i}",
            (("refs", "patches", "vit_dim"),),
            f"EVA02-CLIP-L-14-336 hidden states entering block {4 * (i + 1)}",
        )
        for i in range(VIT_ROUNDS)
    )
    id_cond = TensorField(
        "id_cond",
        (("refs", "id_dim"),),
        "antelopev2 ArcFace embedding (512) ‖ L2-normalised EVA-CLIP image embedding (768), one row per photo",
    )
    return IdentitySchema(backend, "--face-embedding", (id_cond, *hidden), "docs/backends/pulid.md")


#: The schema of either PuLID backend's file (PuLID-FLUX adds refs = 1).
PULID_SCHEMA = pulid_schema("pulid")


@dataclass(frozen=True)
class PuLIDFaceEmbedding:
    """The IDFormer's input for one identity.

    Attributes:
        id_cond: (refs, id_dim): ArcFace embedding ‖ normalised EVA-CLIP embedding per photo.
        vit_hidden: five tensors (refs, patches, vit_dim): EVA-CLIP hidden states per photo.
    """

    id_cond: torch.Tensor
    vit_hidden: tuple[torch.Tensor, ...]

    def idformer_inputs(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The original's batching: (1, refs, id_dim) and hidden states (1, refs·patches, dim)."""
        return self.id_cond[None], [h.reshape(1, -1, h.shape[-1]) for h in self.vit_hidden]

    def zeros(self) -> PuLIDFaceEmbedding:
        """The unconditional input: zeros of the same shapes."""
        return PuLIDFaceEmbedding(torch.zeros_like(self.id_cond), tuple(torch.zeros_like(h) for h in self.vit_hidden))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors: ``id_cond`` and ``vit_hidden.0`` … ``vit_hidden.4``."""
        return {"id_cond": self.id_cond, **{f"vit_hidden.{i}": h for i, h in enumerate(self.vit_hidden)}}

    def check(self, id_dim: int, vit_dim: int, what: str, schema: IdentitySchema = PULID_SCHEMA, **dims) -> None:
        """Check against ``schema`` with the IDFormer's widths (``dims``: e.g. ``refs=1``)."""
        if len(self.vit_hidden) != VIT_ROUNDS:
            raise InputError(f"{what}: {len(self.vit_hidden)} hidden states, expected {VIT_ROUNDS}")
        schema.check(self.tensors(), {"id_dim": id_dim, "vit_dim": vit_dim, **dims}, source=what)


def load_face_embedding(path, dims: dict[str, int] | None = None, schema: IdentitySchema = PULID_SCHEMA):
    """Read a ``--face-embedding`` safetensors file (see the module docstring), checked against
    ``schema`` with the IDFormer's widths ``dims`` (default: none fixed)."""
    tensors = read_identity_file(path, schema, dims or {})
    return PuLIDFaceEmbedding(
        tensors["id_cond"].float(), tuple(tensors[f"vit_hidden.{i}"].float() for i in range(VIT_ROUNDS))
    )


def save_face_embedding(embedding: PuLIDFaceEmbedding, path, metadata: dict[str, str] | None = None) -> None:
    """Write ``embedding`` in the ``--face-embedding`` format; ``metadata`` goes into the
    safetensors header (``freecure embed`` records where the embedding came from and the
    insightface licence it carries)."""
    from safetensors.torch import save_file

    tensors = {"id_cond": embedding.id_cond.contiguous()}
    tensors.update({f"vit_hidden.{i}": h.contiguous() for i, h in enumerate(embedding.vit_hidden)})
    save_file(tensors, str(path), metadata=metadata)


def face_features_image(aligned: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The image EVA-CLIP sees: grey face, white where BiSeNet says background/ears/neck/…

    Args:
        aligned: the aligned face, (H, W, 3) RGB, floats in [0, 1].
        labels: BiSeNet's label map of the same face, (H, W).
    Returns:
        (H, W, 3) floats: grey = 0.299 R + 0.587 G + 0.114 B on the face, 1 elsewhere.
    """
    if aligned.shape[:2] != labels.shape:
        raise ValueError(f"image {aligned.shape[:2]} and label map {labels.shape} differ in size")
    grey = aligned[..., 0] * 0.299 + aligned[..., 1] * 0.587 + aligned[..., 2] * 0.114
    background = np.isin(labels, BACKGROUND_LABELS)
    return np.repeat(np.where(background, 1.0, grey)[..., None], 3, axis=-1)


def random_face_embedding(id_dim: int, vit_dim: int, patches: int = 9, refs: int = 1, seed: int = 0):
    """A random embedding of the right shapes, for tiny runs (``--tiny`` without a file)."""
    g = torch.Generator().manual_seed(seed)
    return PuLIDFaceEmbedding(
        torch.randn(refs, id_dim, generator=g),
        tuple(torch.randn(refs, patches, vit_dim, generator=g) for _ in range(VIT_ROUNDS)),
    )


def needs_face_embedding(backend: str) -> InputError:
    """The error when neither ``--face-embedding`` nor a ``--ref`` photo is given outside ``--tiny``."""
    return InputError(
        f"{backend} needs --ref PHOTO (its face embedding is then computed with insightface antelopev2 and "
        f"EVA02-CLIP-L-14-336; {INSIGHTFACE_LICENSE}) or --face-embedding FILE.safetensors (id_cond and "
        "vit_hidden.0-4, see docs/backends/pulid.md). Offline, try --tiny."
    )


def needs_face_encoder(
    backend: str, missing: str, instead: str = "pass --face-embedding FILE.safetensors"
) -> InputError:
    """The one-line error when the photo → embedding path lacks an optional package."""
    return InputError(
        f"{backend} computes its face embedding from --ref with insightface and EVA-CLIP, and {missing} is not "
        f"installed: `pip install 'freecure[pulid]'` (insightface, onnxruntime, timm; {INSIGHTFACE_LICENSE}), "
        f"or {instead} (see docs/backends/pulid.md). Offline, try --tiny."
    )


class FaceSource:
    """Where a PuLID backend's face embedding comes from: a fixed one (the ``--face-embedding``
    file, or a random one under ``--tiny``) or an encoder run on the reference photos (once per
    distinct set of photos).

    Args:
        face: the fixed embedding, or None.
        encoder: photos → :class:`PuLIDFaceEmbedding` (:class:`~.pulid_encoder.PuLIDFaceEncoder`), or None.
        max_refs: how many photos the method reads (PuLID-FLUX: 1, the first).
    """

    def __init__(self, face: PuLIDFaceEmbedding | None = None, encoder=None, max_refs: int | None = None):
        if face is None and encoder is None:
            raise ValueError("a face source needs a face embedding or an encoder")
        self.face, self.encoder, self.max_refs = face, encoder, max_refs
        self._cache: tuple[tuple, PuLIDFaceEmbedding] | None = None

    def __call__(self, references) -> PuLIDFaceEmbedding:
        if self.face is not None:
            return self.face
        references = list(references)[: self.max_refs]
        if not references:
            raise InputError("PuLID needs a reference photo (--ref) or --face-embedding FILE.safetensors")
        key = tuple((image.size, hash(image.convert("RGB").tobytes())) for image in references)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.encoder(references))
        return self._cache[1]
