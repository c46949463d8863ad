"""PhotoMaker v2 (``TencentARC/PhotoMaker-V2``): the v1 ID encoder plus ArcFace embeddings.

v2 keeps v1's vision tower, projections and fuse module (their keys are still in the
checkpoint) and changes what is fused into the class tokens:

* each reference photo's ArcFace embedding (512-d, from insightface's ``buffalo_l``
  recognition model, as the released scripts use it) is projected to two tokens of the
  text width (``token_proj``) and normalised;
* a Q-Former-style perceiver (:class:`FacePerceiverResampler`, 4 layers) refines those two
  tokens by attending to the CLIP vision tower's patch features (its last hidden state);
* the class token is repeated **twice** per reference photo and each copy is fused with
  one of the two tokens.

The released pipeline also tokenizes the prompt padded and truncated to 77 tokens before
expanding the class token (v1 expands first); :attr:`PhotoMakerV2IDEncoder.truncate_before_expanding`
reproduces that.

Licence: insightface's pretrained models (``buffalo_l`` among them) are available for
non-commercial research purposes only; the PhotoMaker-V2 weights themselves are Apache-2.0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...core.errors import InputError, WeightsNotFoundError
from ..common.layers import FacePerceiverResampler
from .id_encoder import SDXL_TEXT_DIMS, PhotoMakerIDEncoder, fuse_class_tokens

logger = logging.getLogger(__name__)

#: ArcFace embedding width.
FACE_EMBEDDING_DIM = 512


class QFormerPerceiver(nn.Module):
    """ArcFace embedding → ``num_tokens`` tokens of width ``width``, refined by the perceiver
    on the CLIP patch features, with a residual connection."""

    def __init__(
        self,
        face_dim: int,
        width: int,
        num_tokens: int,
        embedding_dim: int,
        dim_head: int,
        ratio: int = 4,
        depth: int = 4,
    ):
        super().__init__()
        self.num_tokens, self.width = num_tokens, width
        self.token_proj = nn.Sequential(
            nn.Linear(face_dim, face_dim * ratio),
            nn.GELU(),
            nn.Linear(face_dim * ratio, width * num_tokens),
        )
        self.token_norm = nn.LayerNorm(width)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=width,
            depth=depth,
            dim_head=dim_head,
            heads=width // dim_head,
            embedding_dim=embedding_dim,
            output_dim=width,
            ff_mult=4,
        )

    def forward(self, face_embeds: torch.Tensor, patch_features: torch.Tensor) -> torch.Tensor:
        tokens = self.token_norm(self.token_proj(face_embeds).reshape(-1, self.num_tokens, self.width))
        return tokens + self.perceiver_resampler(tokens, patch_features)


class PhotoMakerV2IDEncoder(PhotoMakerIDEncoder):
    """PhotoMaker v2's ID encoder; its ``state_dict`` keys are the v1 keys plus
    ``qformer_perceiver.*``, as in the released ``photomaker-v2.bin``.

    Args:
        vision_config: a ``CLIPVisionConfig`` (ViT-L/14 for the release).
        text_dims: widths of the two text encoders (768, 1280).
        face_dim: ArcFace embedding width (512).
        dim_head: perceiver head width; default 128 (16 heads at width 2048) for the
            release, a quarter of the width for tiny encoders.
    """

    tokens_per_image = 2
    needs_face_embeddings = True
    truncate_before_expanding = True

    def __init__(
        self,
        vision_config=None,
        text_dims: tuple[int, int] = SDXL_TEXT_DIMS,
        face_dim: int = FACE_EMBEDDING_DIM,
        dim_head: int | None = None,
    ):
        super().__init__(vision_config, text_dims)
        width = sum(text_dims)
        dim_head = dim_head or (128 if width >= 512 else width // 4)
        self.qformer_perceiver = QFormerPerceiver(
            face_dim, width, self.tokens_per_image, self.vision_config.hidden_size, dim_head
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        prompt_embeds: torch.Tensor,
        class_mask: torch.Tensor,
        face_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """The fused prompt embedding; ``face_embeds`` holds one ArcFace row per image."""
        if face_embeds.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images but {face_embeds.shape[0]} face embeddings")
        patches = self.vision_model(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state
        id_tokens = self.qformer_perceiver(face_embeds.to(self.device, self.dtype), patches)
        return fuse_class_tokens(self.fuse_module, prompt_embeds, id_tokens.flatten(0, 1), class_mask)


class ArcFaceEmbedder:
    """insightface's ``FaceAnalysis`` (detection + ArcFace recognition) as the released v2
    scripts use it: the first detected face's raw 512-d embedding per photo, retrying with
    smaller detector sizes (640 → 256) when no face is found.

    Photos without a face are left out (the released pipeline would fail on them).
    insightface downloads its ``buffalo_l`` models (≈0.3 GB) to ``~/.insightface`` on first
    use; they are licensed for non-commercial research only.
    """

    DETECTION_SIZES = (640, 576, 512, 448, 384, 320, 256)

    def __init__(self, name: str = "buffalo_l", device: torch.device | str = "cpu", root: str | None = None):
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise InputError(
                "PhotoMaker v2 needs insightface and onnxruntime: `pip install insightface onnxruntime` "
                "(onnxruntime-gpu on CUDA). insightface's face models are for non-commercial research only."
            ) from None
        cuda = torch.device(device).type == "cuda"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        kwargs = {"root": root} if root else {}
        try:
            self.app = FaceAnalysis(
                name=name, providers=providers, allowed_modules=["detection", "recognition"], **kwargs
            )
            self.app.prepare(ctx_id=0 if cuda else -1, det_size=(640, 640))
        except Exception as error:  # insightface downloads its models on first use
            raise WeightsNotFoundError(
                f"could not load insightface's {name!r} face models ({error}); insightface downloads them to "
                "~/.insightface/models on first use (network needed). To try the machinery offline, run with --tiny."
            ) from None

    def faces(self, image: Image.Image) -> list:
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
        for size in self.DETECTION_SIZES:
            self.app.det_model.input_size = (size, size)
            found = self.app.get(bgr)
            if found:
                return found
        return []

    def embed(self, references: Sequence[Image.Image]) -> tuple[list[Image.Image], torch.Tensor]:
        """The photos with a face and their embeddings, (n, 512)."""
        kept, embeddings = [], []
        for index, image in enumerate(references):
            found = self.faces(image)
            if not found:
                logger.warning("reference photo %d: no face detected; PhotoMaker v2 leaves it out", index)
                continue
            kept.append(image)
            embeddings.append(torch.from_numpy(np.asarray(found[0]["embedding"], dtype=np.float32)))
        if not kept:
            raise InputError("no face detected in any reference photo; PhotoMaker v2 needs at least one")
        return kept, torch.stack(embeddings)


class RandomFaceEmbedder:
    """A checkpoint-free stand-in for ArcFace (``--tiny``): a fixed random projection of each
    downsampled photo to 512 numbers. Its output has no meaning."""

    def __init__(self, dim: int = FACE_EMBEDDING_DIM, seed: int = 0):
        from ..common.random_identity import RandomProjectionIdentityEncoder

        self.projection = RandomProjectionIdentityEncoder(dim, seed=seed)

    def embed(self, references: Sequence[Image.Image]) -> tuple[list[Image.Image], torch.Tensor]:
        references = list(references)
        return references, torch.stack([self.projection([image]) for image in references])
