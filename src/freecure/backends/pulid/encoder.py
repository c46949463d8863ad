"""PuLID's face encoder: reference photos → the IDFormer's input (:class:`PuLIDFaceEmbedding`).

Written from the original's description (ToTheBeginning/PuLID @ 1aa2fc7, ``get_id_embedding``
in ``pulid/pipeline_v1_1.py`` and ``pulid/pipeline_flux.py``; EVA-CLIP in ``eva_clip/``), per photo:

1. insightface ``antelopev2`` on the photo: the raw (not normalised) recognition embedding (512)
   of the largest face (:class:`~.face_embedding.InsightFaceAnalyzer`);
2. the face aligned to 512 × 512 (FFHQ's 5-point template, a similarity transform, bilinear,
   grey border (132, 133, 135) RGB) — :func:`similarity_transform`, :func:`warp_face`;
3. BiSeNet parsing of the aligned face, background/ears/neck/cloth/hat white, the rest grey
   (:func:`.pulid_embedding.face_features_image`, with the BiSeNet parser FreeCure ships);
4. resized to 336 (bicubic), normalised with OpenAI CLIP's mean/std (:func:`eva_pixels`);
5. EVA02-CLIP-L-14-336's vision tower (:class:`EvaCLIPVision`, timm's ``Eva``): its image
   embedding (768, then L2-normalised) and the hidden states *entering* blocks 4, 8, 12, 16, 20
   (the original's ``forward_features(return_hidden=True)`` keeps ``x`` before block ``idx``
   for ``0 < idx ≤ 20, idx % 4 == 0``: five states of (577, 1024), the five the IDFormer reads);
6. ``id_cond`` = [antelopev2 embedding; normalised EVA-CLIP embedding] (1280).

Differences from the original (documented in docs/backends/pulid.md):

* alignment: the original detects and aligns with facexlib's RetinaFace (``FaceRestoreHelper``,
  the face nearest the centre) and OpenCV's ``estimateAffinePartial2D(LMEDS)``/``warpAffine``;
  here the 5 keypoints of insightface's largest face are fitted to the same template by least
  squares (Umeyama) and warped bilinearly in torch. facexlib is not a dependency.
* no face found by insightface: the original falls back to ``get_feat`` of the aligned face
  (facexlib's detection); here it is an error (no keypoints, no alignment).
* resize: torchvision 0.15.2 (the original's pin) resizes tensors *without* antialiasing; so
  does :func:`eva_pixels` (torch's bicubic, ``antialias=False``).

insightface's antelopev2 models are for **non-commercial research only**. EVA-CLIP's weights
(``QuanSun/EVA-CLIP`` ``EVA02_CLIP_L_336_psz14_s6B.pt``, MIT) are read with
``torch.load(weights_only=True)``, their ``visual.*`` tensors checked strictly against the
original's layout (``tests/data/eva02_clip_l_336_visual_keys.txt``) and loaded into timm's
``Eva`` with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ...core.checkpoints import check_state_dict, read_tensors
from ...core.errors import InputError, WeightsNotFoundError
from .embedding import PuLIDFaceEmbedding, face_features_image, needs_face_encoder

logger = logging.getLogger(__name__)

#: OpenAI CLIP's mean/std, which the original's EVA-CLIP uses (``eva_clip/constants.py``).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: facexlib's FFHQ 5-point template for 512 × 512 faces (eyes, nose, mouth corners; x, y).
FACE_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)
ALIGNED_SIZE = 512
#: facexlib's border colour, (135, 133, 132) in its BGR image: RGB (132, 133, 135).
ALIGN_BORDER_RGB = (132, 133, 135)

EVA_CLIP_REPO = "QuanSun/EVA-CLIP"
EVA_CLIP_FILE = "EVA02_CLIP_L_336_psz14_s6B.pt"
EVA_CLIP_HINT = (
    f"EVA02-CLIP-L-14-336 comes from {EVA_CLIP_REPO} ({EVA_CLIP_FILE}): pass a local copy with "
    "--eva-clip-weights FILE, or pass --face-embedding FILE.safetensors instead of computing it"
)
#: The original's ``eva_clip/rope.py`` buffers, recomputed at build time and deleted from the
#: checkpoint before loading (``RoPE=1``); never loaded.
ROPE_BUFFERS = ("rope.freqs_cos", "rope.freqs_sin")


# --------------------------------------------------------------------------- EVA-CLIP vision tower


@dataclass(frozen=True)
class EvaVisionConfig:
    """EVA02-CLIP-L-14-336's vision tower (the original's ``EVA02-CLIP-L-14-336.json``
    ``vision_cfg``: rope with ``intp_freq``, SwiGLU with sub-LN, q/v biases, class-token
    pooling, final LayerNorm, linear head to ``embed_dim``); the defaults are the released sizes.

    Attributes:
        pt_hw_seq_len: the rope's reference grid (224 / 14 = 16), interpolated to the grid.
        taps: blocks whose *input* is returned: the original's ``0 < idx <= 20 and idx % 4 == 0``.
    """

    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    head_width: int = 64
    mlp_ratio: float = 2.6667
    embed_dim: int = 768
    pt_hw_seq_len: int = 16

    @property
    def taps(self) -> tuple[int, ...]:
        return tuple(i for i in range(1, min(self.depth, 21)) if i % 4 == 0)

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


#: A tiny tower for tests and ``--tiny`` (same structure; 21 blocks so all five taps exist).
TINY_EVA = EvaVisionConfig(image_size=28, patch_size=14, width=16, depth=21, head_width=8, embed_dim=16)


def build_eva_vision(config: EvaVisionConfig = EvaVisionConfig()) -> nn.Module:
    """timm's ``eva02_large_patch14_clip_336`` architecture at ``config``'s sizes, no weights."""
    import timm

    return timm.create_model(
        "eva02_large_patch14_clip_336",
        pretrained=False,
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.width,
        depth=config.depth,
        num_heads=config.width // config.head_width,
        mlp_ratio=config.mlp_ratio,
        num_classes=config.embed_dim,
        ref_feat_shape=(config.pt_hw_seq_len, config.pt_hw_seq_len),
    )


class EvaCLIPVision(nn.Module):
    """The original's ``EVAVisionTransformer.forward(x, return_hidden=True)`` on timm's ``Eva``.

    Returns (embedding (B, embed_dim), hidden states entering the ``taps`` blocks, each
    (B, tokens, width), class token first). The embedding is LayerNorm → class token → head,
    *not* normalised (the caller does, as the original).
    """

    def __init__(self, config: EvaVisionConfig = EvaVisionConfig(), trunk: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.trunk = trunk if trunk is not None else build_eva_vision(config)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = [tap - 1 for tap in self.config.taps]  # the input of block i is the output of block i − 1
        final, taps = self.trunk.forward_intermediates(
            pixels, indices=outputs, return_prefix_tokens=True, output_fmt="NLC"
        )
        hidden = [torch.cat([prefix, spatial], dim=1) for spatial, prefix in taps]
        return self.trunk.forward_head(final), hidden


#: The original's visual names → timm ``Eva``'s, the renaming timm's ``eva.checkpoint_filter_fn``
#: applies to this layout (tests check the two agree).
TIMM_RENAMES = (
    ("mlp.ffn_ln", "mlp.norm"),
    ("attn.inner_attn_ln", "attn.norm"),
    ("mlp.w1", "mlp.fc1_g"),
    ("mlp.w2", "mlp.fc1_x"),
    ("mlp.w3", "mlp.fc2"),
    ("attn.q_bias", "attn.q_proj.bias"),
    ("attn.v_bias", "attn.v_proj.bias"),
)


def timm_key(key: str) -> str:
    """An original EVA-CLIP visual key (without ``visual.``) → timm's ``Eva`` key."""
    for old, new in TIMM_RENAMES:
        key = key.replace(old, new)
    return key


def original_key(key: str) -> str:
    """timm's ``Eva`` key → the original's checkpoint name (with ``visual.``), for messages."""
    for old, new in TIMM_RENAMES:
        key = key.replace(new, old)
    return f"visual.{key}"


def visual_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of an EVA-CLIP checkpoint, in the original's names without
    ``visual.``: as the original's loader, a ``model``/``module`` wrapper and a ``module.``
    prefix are removed and the rope buffers are dropped; the text tower is left out."""
    for wrapper in ("model", "module"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return {
        key[len("visual.") :]: value
        for key, value in state.items()
        if key.startswith("visual.") and not key.endswith(ROPE_BUFFERS)
    }


def load_eva_clip_vision(vision: EvaCLIPVision, state: Mapping[str, torch.Tensor], what: str) -> EvaCLIPVision:
    """Check ``state``'s visual tensors strictly (names and shapes of the original's layout,
    messages in the original's names), then ``load_state_dict(strict=True)`` into timm's Eva."""
    original = visual_state_dict(state)
    if not original:
        raise WeightsNotFoundError(
            f"{what} holds no 'visual.*' tensors: it is not an EVA-CLIP checkpoint. {EVA_CLIP_HINT}"
        )
    renamed = {timm_key(key): value for key, value in original.items()}
    check_state_dict(
        vision.trunk,
        renamed,
        f"{what} does not match EVA02-CLIP-L-14-336's vision tower",
        hint=EVA_CLIP_HINT,
        display=original_key,
    )
    vision.trunk.load_state_dict(renamed, strict=True)
    return vision


def eva_clip_weights(given: str | os.PathLike | None) -> str:
    """A local ``EVA02_CLIP_L_336_psz14_s6B.pt`` (``given``) or the Hub download."""
    if given is not None:
        if not os.path.isfile(given):
            raise WeightsNotFoundError(f"--eva-clip-weights {given} is not a file. {EVA_CLIP_HINT}")
        return str(given)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(EVA_CLIP_REPO, EVA_CLIP_FILE)
    except Exception as error:  # noqa: BLE001 - offline, gated, network: one message
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsNotFoundError(
            f"could not download {EVA_CLIP_REPO}/{EVA_CLIP_FILE} ({first}). {EVA_CLIP_HINT}"
        ) from None


def pretrained_eva_clip_vision(path: str | os.PathLike | None = None) -> EvaCLIPVision:
    """EVA02-CLIP-L-14-336's vision tower with the released weights (local file or the Hub)."""
    path = eva_clip_weights(path)
    state = read_tensors(path, "the EVA-CLIP checkpoint", hint=EVA_CLIP_HINT, nested=True)
    vision = load_eva_clip_vision(EvaCLIPVision(EvaVisionConfig()), state, path)
    return vision.eval().requires_grad_(False)


# --------------------------------------------------------------------------- alignment and pixels


def similarity_transform(points: np.ndarray, template: np.ndarray = FACE_TEMPLATE_512) -> np.ndarray:
    """The 2 × 3 similarity (rotation, uniform scale, translation) taking ``points`` closest
    to ``template`` in least squares (Umeyama 1991, eq. 40–42): the original fits the same
    model with OpenCV's ``estimateAffinePartial2D(LMEDS)``."""
    src, dst = np.asarray(points, np.float64), np.asarray(template, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(sigma) @ sign) / s.var(0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mu_d - scale * rotation @ mu_s
    return matrix


def warp_face(image: np.ndarray, matrix: np.ndarray, size: int = ALIGNED_SIZE, border=ALIGN_BORDER_RGB) -> np.ndarray:
    """``cv2.warpAffine(image, matrix, (size, size), INTER_LINEAR, BORDER_CONSTANT)`` in torch:
    output pixel (x, y) samples the photo bilinearly at ``matrix⁻¹ · (x, y, 1)`` (pixel centres
    at integer coordinates), the border colour outside; rounded to uint8 as OpenCV's.

    Args:
        image: (H, W, 3) uint8 RGB photo.
        matrix: 2 × 3 photo → aligned-face map.
    Returns:
        (size, size, 3) uint8.
    """
    height, width = image.shape[:2]
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)[:2]
    ys, xs = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing="ij")
    src = inverse @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    # grid_sample with align_corners=True: −1 and 1 are the centres of the first and last pixels
    grid = np.stack([src[0] / max(width - 1, 1) * 2 - 1, src[1] / max(height - 1, 1) * 2 - 1], -1)
    grid = torch.from_numpy(grid.reshape(1, size, size, 2))
    fill = torch.tensor(border, dtype=torch.float64).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.array(image, dtype=np.float64)).permute(2, 0, 1)[None] - fill
    warped = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + fill
    return warped[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def eva_pixels(features: np.ndarray, image_size: int) -> torch.Tensor:
    """EVA-CLIP's input from the face-features image: (H, W, 3) floats in [0, 1] → resized to
    ``image_size`` (bicubic, no antialiasing, as torchvision 0.15's tensor resize) and
    normalised with OpenAI CLIP's mean/std; (1, 3, image_size, image_size) float32."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=False)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def identity_condition(arcface: torch.Tensor, eva_embedding: torch.Tensor) -> torch.Tensor:
    """``id_cond`` = [antelopev2 embedding; EVA-CLIP embedding / ‖·‖₂], (B, 512 + 768)."""
    return torch.cat([arcface, eva_embedding / eva_embedding.norm(p=2, dim=1, keepdim=True)], dim=-1)


# --------------------------------------------------------------------------- the encoder


class PuLIDFaceEncoder:
    """Photos → :class:`PuLIDFaceEmbedding`, as the original's ``get_id_embedding``.

    Args:
        analyzer: photo → :class:`~.face_embedding.FaceEmbedding` with the raw embedding and
            5 keypoints of the largest face (insightface ``antelopev2``).
        parser: a :class:`~freecure.parsing.FaceParser` that parses the whole aligned face.
        vision: the EVA-CLIP vision tower.
    """

    def __init__(self, analyzer, parser, vision: EvaCLIPVision, device=None, dtype: torch.dtype = torch.float32):
        self.analyzer, self.parser = analyzer, parser
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self.vision = vision.to(device=self.device, dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        eva_clip_weights: str | os.PathLike | None = None,
        parser_weights: str | os.PathLike | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        backend: str = "PuLID",
        instead: str = "pass --face-embedding FILE.safetensors",
    ) -> PuLIDFaceEncoder:
        """insightface antelopev2 (non-commercial models, downloaded by insightface), FreeCure's
        BiSeNet parser and EVA02-CLIP-L-14-336 (``eva_clip_weights`` or the Hub).

        Raises:
            InputError: insightface, onnxruntime or timm is not installed (one line: what to
                install, or pass ``--face-embedding``), before anything loads.
        """
        for package in ("insightface", "onnxruntime", "timm"):
            if importlib.util.find_spec(package) is None:
                raise needs_face_encoder(backend, package, instead)
        from ...parsing import BiSeNetFaceParser
        from ...parsing.weights import load_bisenet, resolve_bisenet_weights
        from ..common.face_embedding import InsightFaceAnalyzer

        device = torch.device(device or "cpu")
        analyzer = InsightFaceAnalyzer("antelopev2", normed=False, device=device)  # warns about the licence
        location = resolve_bisenet_weights(parser_weights)
        parser = BiSeNetFaceParser(load_bisenet(location.path, device), None, device, hair_crop_scale=None)
        return cls(analyzer, parser, pretrained_eva_clip_vision(eva_clip_weights), device, dtype)

    @classmethod
    def tiny(cls, seed: int = 0, arcface_dim: int = 8) -> PuLIDFaceEncoder:
        """Random stand-ins of the tiny IDFormer's sizes (``id_dim`` 24, ``vit_dim`` 16): a random
        projection for antelopev2, a random narrow BiSeNet and a random tiny EVA tower."""
        from ...parsing import BiSeNet, BiSeNetFaceParser
        from ..common.face_embedding import RandomFaceAnalyzer

        torch.manual_seed(seed)
        parser = BiSeNetFaceParser(BiSeNet(width=8).eval(), None, "cpu", hair_crop_scale=None)
        return cls(RandomFaceAnalyzer(dim=arcface_dim, seed=seed), parser, EvaCLIPVision(TINY_EVA))

    def align(self, image: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
        """(antelopev2 embedding (512,), the face aligned to 512 × 512, uint8 RGB)."""
        face = self.analyzer(image)
        if face.keypoints is None:
            raise InputError("no face keypoints found in the reference photo; pass --face-embedding FILE.safetensors")
        matrix = similarity_transform(face.keypoints.double().numpy())
        return face.id_embedding, warp_face(np.asarray(image.convert("RGB")), matrix)

    @torch.no_grad()
    def encode_aligned(self, arcface: torch.Tensor, aligned: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Steps 3–6 on one aligned face: (id_cond (1, id_dim), hidden states (1, tokens, width))."""
        labels = self.parser(Image.fromarray(aligned)).labels
        features = face_features_image(aligned.astype(np.float32) / 255.0, labels)
        pixels = eva_pixels(features, self.vision.config.image_size).to(self.device, self.dtype)
        embedding, hidden = self.vision(pixels)
        id_cond = identity_condition(arcface.float()[None].to(self.device), embedding.float())
        return id_cond.cpu(), [h.float().cpu() for h in hidden]

    def __call__(self, images: Sequence[Image.Image]) -> PuLIDFaceEmbedding:
        """One row per photo: ``id_cond`` (refs, 1280), five hidden states (refs, 577, 1024)."""
        if not images:
            raise InputError("PuLID needs a reference photo (--ref) or --face-embedding FILE.safetensors")
        rows = [self.encode_aligned(*self.align(image)) for image in images]
        id_cond = torch.cat([row[0] for row in rows])
        hidden = tuple(torch.cat([row[1][i] for row in rows]) for i in range(len(rows[0][1])))
        return PuLIDFaceEmbedding(id_cond, hidden)


def embed_faces(backend: str, references, args):
    """``freecure embed`` for the PuLID backends: (a writer of the ``--face-embedding`` file, a
    summary of its tensors) for ``references``; ``args``: ``tiny`` (random stand-in models of
    the tiny sizes), ``eva_clip_weights``, ``parser_weights``, ``device``."""
    from ...core.errors import InputError
    from ...core.runtime import resolve_device
    from .embedding import INSIGHTFACE_LICENSE, save_face_embedding

    if args.tiny:
        if args.eva_clip_weights or args.parser_weights:
            raise InputError("--tiny uses random stand-in models: drop --eva-clip-weights/--parser-weights")
        encoder = PuLIDFaceEncoder.tiny()
    else:
        encoder = PuLIDFaceEncoder.from_pretrained(
            args.eva_clip_weights,
            args.parser_weights,
            resolve_device(args.device),
            backend=backend,
            instead="compute the embedding where they are installed",
        )
    face = encoder(references)
    metadata = {
        "freecure": f"PuLID face embedding ({backend}) from {len(references)} photo(s)"
        + (", random tiny stand-in models" if args.tiny else ": insightface antelopev2 + EVA02-CLIP-L-14-336"),
        "licence": INSIGHTFACE_LICENSE,
    }
    hidden = [f"vit_hidden.{i} {tuple(h.shape)}" for i, h in enumerate(face.vit_hidden)]
    summary = ", ".join([f"id_cond {tuple(face.id_cond.shape)}", *hidden])
    return (lambda path: save_face_embedding(face, path, metadata)), summary
