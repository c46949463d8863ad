"""IP-Adapter-FaceID (Ye et al., ``tencent-ailab/IP-Adapter``; weights ``h94/IP-Adapter-FaceID``)
on SD1.5 and SDXL, in its plain, Plus and PlusV2 variants.

How identity enters (the original ``ip_adapter/ip_adapter_faceid.py``):

1. a face-recognition embedding f (insightface ``buffalo_l``, L2-normalised, 512-d) is
   projected to 4 identity tokens: ``MLPProjModel`` (Linear 512→1024, GELU, Linear → 4·D,
   LayerNorm) for the plain model; ``ProjPlusModel`` for Plus/PlusV2, which refines those
   tokens with a perceiver over the CLIP ViT-H penultimate states of the aligned face
   (PlusV2 adds the tokens back: ``out = x + s_scale · perceiver(x)``);
2. every cross-attention layer adds ``scale · softmax(q K_ipᵀ/√d) V_ip`` to its text
   attention (decoupled cross-attention, each with its own softmax);
3. a rank-128 LoRA on q, k, v and out of every attention layer, stored in the same file;
4. the negative branch of classifier-free guidance carries the tokens of the *zero* embedding
   (and, for Plus, of the CLIP states of a zero image).

diffusers 0.42.1's ``load_ip_adapter`` reads all of these files: it converts the projection
into ``IPAdapterFaceIDImageProjection`` / ``IPAdapterFaceIDPlusImageProjection``, installs
``IPAdapterAttnProcessor2_0`` with ``to_k_ip``/``to_v_ip`` and loads the LoRA with peft
(adapter ``faceid_0``). This backend checks the file strictly against the released layout
first (:class:`ReleasedFaceIDLayout`, key lists in ``tests/data/``), then hands it to
``load_ip_adapter``.

FreeCure mapping:

* PD = the released model with the identity from ``inject_step`` on (default 0: the method
  has no delayed injection); its negative branch carries the zero-embedding tokens, as the
  original's.
* FD = the same UNet (LoRA kept, as FD keeps PhotoMaker's LoRA) with the identity term switched
  off *for FD's batch rows only*: :class:`RowGate` multiplies each row's identity tokens by
  1 or 0 after the projection, so FD's rows get ``scale · attention(q, 0, 0) = 0`` added,
  bit for bit a run with the adapter's scale 0, and FD and PD still share one UNet call.
* ``fd_lora=False``: FD without the LoRA either (the base model); this needs a separate UNet
  call for FD's rows per step (peft's ``disable_lora`` around it), counted by ``freecure cost``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ...core import checkpoints
from ...core.conditioning import PD, PD_UNCOND, Conditions, TextConditioning
from ...core.errors import InputError, WeightsNotFoundError
from ...core.options import Option, finite_float
from ..base import Backend
from ..common.face_embedding import (
    FACE_EMBEDDING_DIM,
    FACE_EMBEDDING_OPTION,
    INSIGHTFACE_LICENCE,
    ClipFaceEncoder,
    FaceEmbedding,
    InsightFaceAnalyzer,
    RandomFaceAnalyzer,
    face_file_schema,
    load_face_embedding,
    reference_face,
)

logger = logging.getLogger(__name__)

REPO_ID = "h94/IP-Adapter-FaceID"
BASE_MODELS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
#: CLIP ViT-H/14 image encoder of the Plus variants (``h94/IP-Adapter``, ``models/image_encoder``).
CLIP_VIT_H = dict(hidden_size=1280, tokens=257)
IMAGE_ENCODER_REPO = "h94/IP-Adapter"
LORA_RANK = 128
NUM_TOKENS = 4


@dataclass(frozen=True)
class Release:
    filename: str
    size: str


#: Released files by (variant, family); sizes computed from the parameter counts of the
#: released layouts (fp16 storage assumed; see docs/backends/ip_adapter_faceid.md).
RELEASES = {
    ("plain", "sd15"): Release("ip-adapter-faceid_sd15.bin", "≈96 MB (computed)"),
    ("plus", "sd15"): Release("ip-adapter-faceid-plus_sd15.bin", "≈156 MB (computed)"),
    ("plusv2", "sd15"): Release("ip-adapter-faceid-plusv2_sd15.bin", "≈156 MB (computed)"),
    ("plain", "sdxl"): Release("ip-adapter-faceid_sdxl.bin", "≈1.07 GB (computed)"),
    ("plusv2", "sdxl"): Release("ip-adapter-faceid-plusv2_sdxl.bin", "≈1.49 GB (computed)"),
}
VARIANTS = ("plain", "plus", "plusv2")

LICENSE = (
    "IP-Adapter-FaceID weights: released for non-commercial research use (h94/IP-Adapter-FaceID model card, "
    "because of the insightface face models they were trained with); face embeddings from insightface "
    "buffalo_l: NON-COMMERCIAL research only; the base model's licence applies too"
)


# --------------------------------------------------------------------------- released layout


class LoRALinear(nn.Module):
    """The original's ``LoRALinearLayer`` key layout: ``down`` (in → rank), ``up`` (rank → out)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)


class ProcessorLayout(nn.Module):
    """One attention processor's weights in the original: ``LoRAAttnProcessor`` (self-attention),
    ``LoRAIPAttnProcessor`` (cross-attention: plus ``to_k_ip``/``to_v_ip``), or InstantID's
    ``IPAttnProcessor`` (``to_k_ip``/``to_v_ip`` only; ``rank=0``)."""

    def __init__(self, hidden: int, cross: int | None, rank: int):
        super().__init__()
        if rank:
            self.to_q_lora = LoRALinear(hidden, hidden, rank)
            self.to_k_lora = LoRALinear(cross or hidden, hidden, rank)
            self.to_v_lora = LoRALinear(cross or hidden, hidden, rank)
            self.to_out_lora = LoRALinear(hidden, hidden, rank)
        if cross is not None:
            self.to_k_ip = nn.Linear(cross, hidden, bias=False)
            self.to_v_ip = nn.Linear(cross, hidden, bias=False)


def processor_layouts(unet_config, processor_names: Sequence[str], rank: int) -> nn.ModuleList:
    """``ModuleList(unet.attn_processors.values())`` of the original's ``set_ip_adapter``:
    hidden size from the block, cross-attention dim for ``attn2`` layers."""
    blocks = list(unet_config["block_out_channels"])
    layers = []
    for name in processor_names:
        cross = None if name.endswith("attn1.processor") else unet_config["cross_attention_dim"]
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        layers.append(ProcessorLayout(hidden, cross, rank))
    return nn.ModuleList(layers)


class MLPProjLayout(nn.Module):
    """The original's ``MLPProjModel``: Linear(512, 1024), GELU, Linear(1024, 4·D); LayerNorm(D)."""

    def __init__(self, cross_attention_dim: int, id_dim: int = FACE_EMBEDDING_DIM, num_tokens: int = NUM_TOKENS):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(id_dim, id_dim * 2), nn.GELU(), nn.Linear(id_dim * 2, cross_attention_dim * num_tokens)
        )
        self.norm = nn.LayerNorm(cross_attention_dim)


class ProjPlusLayout(MLPProjLayout):
    """The original's ``ProjPlusModel``: the MLP projection plus a ``FacePerceiverResampler``
    (depth 4, heads D/64 of width 64, over the CLIP states)."""

    def __init__(self, cross_attention_dim: int, clip_dim: int = CLIP_VIT_H["hidden_size"]):
        super().__init__(cross_attention_dim)
        from ..common.layers import FacePerceiverResampler

        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim,
            depth=4,
            dim_head=64,
            heads=cross_attention_dim // 64,
            embedding_dim=clip_dim,
            output_dim=cross_attention_dim,
        )


class ReleasedFaceIDLayout(nn.Module):
    """Keys and shapes of a released IP-Adapter-FaceID file: ``image_proj.*`` and
    ``ip_adapter.<processor index>.*``."""

    def __init__(self, unet_config, processor_names: Sequence[str], variant: str, rank: int = LORA_RANK, clip_dim=None):
        super().__init__()
        cross = unet_config["cross_attention_dim"]
        if variant == "plain":
            self.image_proj = MLPProjLayout(cross)
        else:
            self.image_proj = ProjPlusLayout(cross, clip_dim or CLIP_VIT_H["hidden_size"])
        self.ip_adapter = processor_layouts(unet_config, processor_names, rank)


def lora_rank(ip_adapter: Mapping[str, torch.Tensor]) -> int:
    """The LoRA rank a file was trained with (128 in every release)."""
    down = ip_adapter.get("0.to_q_lora.down.weight")
    if down is None:
        raise WeightsNotFoundError(
            "the file holds no LoRA ('ip_adapter.0.to_q_lora.down.weight' is missing): it is not an "
            "IP-Adapter-FaceID file (InstantID's ip-adapter.bin goes with --backend instantid)"
        )
    return int(down.shape[0])


def check_faceid_state_dict(unet, state: Mapping[str, Mapping[str, torch.Tensor]], variant: str) -> None:
    """Strict key and shape check of a FaceID file against the released layout for ``unet``."""
    if variant not in VARIANTS:
        raise InputError(f"unknown IP-Adapter-FaceID variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not isinstance(state, Mapping) or set(state) != {"image_proj", "ip_adapter"}:
        found = ", ".join(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
        raise WeightsNotFoundError(f"an IP-Adapter file holds exactly 'image_proj' and 'ip_adapter', not {found}")
    clip = state["image_proj"].get("perceiver_resampler.proj_in.weight")
    clip_dim = int(clip.shape[1]) if clip is not None else None
    with torch.device("meta"):
        layout = ReleasedFaceIDLayout(
            unet.config, list(unet.attn_processors), variant, lora_rank(state["ip_adapter"]), clip_dim
        )
    flat = {f"{part}.{key}": value for part in ("image_proj", "ip_adapter") for key, value in state[part].items()}
    checkpoints.check_state_dict(
        layout,
        flat,
        f"the file does not match IP-Adapter-FaceID {variant} for this base model",
        hint="Check --faceid-variant (plain, plus, plusv2) and that the base model's family (SD1.5/SDXL) "
        "is the file's.",
    )


def split_adapter_state(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj.x": …, "ip_adapter.y": …}`` → ``{"image_proj": {"x": …}, "ip_adapter": {"y": …}}``."""
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in flat.items():
        part, _, name = key.partition(".")
        state.setdefault(part, {})[name] = tensor
    return state


def read_adapter_file(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read an IP-Adapter file: ``.bin`` with ``torch.load(weights_only=True)``, or
    ``.safetensors`` with ``image_proj.``/``ip_adapter.`` prefixes (as the original reads it)."""
    path = Path(path)
    state = checkpoints.read_tensors(path, "the IP-Adapter file", nested=True)
    return split_adapter_state(state) if path.suffix == ".safetensors" else state


def resolve_file(repo_id: str, filename: str, size: str, weights, option: str) -> Path:
    """``weights`` (a file, or a folder with ``filename``) or the Hub file, with one clear message."""
    how = (
        f"Allow the download (network, HF_HUB_OFFLINE unset) or download {filename} yourself and pass "
        f"{option} PATH. To try the machinery offline, run with --tiny."
    )
    if weights is not None:
        path = Path(weights).expanduser()
        path = path / filename if path.is_dir() else path
        if not path.is_file():
            raise WeightsNotFoundError(f"{path} does not exist. {how}")
        return path
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as error:
        reason = (
            "HF_HUB_OFFLINE is set and the file is not in the local cache"
            if constants.HF_HUB_OFFLINE
            else (str(error).strip().splitlines() or [type(error).__name__])[0]
        )
        raise WeightsNotFoundError(f"could not get {filename} from {repo_id} ({size}): {reason}. {how}") from None


def load_faceid_adapter(pipeline, state, variant: str, scale: float = 1.0, s_scale: float = 1.0) -> None:
    """Check ``state`` strictly, then load it with diffusers' ``load_ip_adapter`` (projection,
    IP processors and the LoRA as peft adapter ``faceid_0``) and set the scales."""
    from diffusers.utils import USE_PEFT_BACKEND

    check_faceid_state_dict(pipeline.unet, state, variant)
    if not USE_PEFT_BACKEND:
        raise InputError("IP-Adapter-FaceID's LoRA needs peft: `pip install peft`")
    pipeline.load_ip_adapter(
        {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])},
        subfolder="",
        weight_name="ip-adapter-faceid.bin",
        image_encoder_folder=None,
    )
    pipeline.set_ip_adapter_scale(scale)
    projection = pipeline.unet.encoder_hid_proj.image_projection_layers[0]
    if variant != "plain":
        projection.shortcut = variant == "plusv2"
        projection.shortcut_scale = s_scale


def load_clip_encoder(source: str | os.PathLike | None, device, dtype) -> ClipFaceEncoder:
    """The Plus variants' CLIP ViT-H/14 (``h94/IP-Adapter``, ``models/image_encoder``, ≈2.5 GB fp32)."""
    from transformers import CLIPVisionModelWithProjection

    try:
        if source is None:
            encoder = CLIPVisionModelWithProjection.from_pretrained(
                IMAGE_ENCODER_REPO, subfolder="models/image_encoder", dtype=dtype
            )
        else:
            encoder = CLIPVisionModelWithProjection.from_pretrained(str(source), dtype=dtype)
    except (OSError, ValueError) as error:
        raise WeightsNotFoundError(
            f"could not load the CLIP ViT-H image encoder of the Plus variants ({IMAGE_ENCODER_REPO}/models/"
            f"image_encoder, ≈2.5 GB): {str(error).splitlines()[0]}. Pass --faceid-image-encoder FOLDER, or put "
            "'clip_embedding'/'negative_clip_embedding' into --face-embedding FILE.safetensors."
        ) from None
    return ClipFaceEncoder(encoder.to(device))


# --------------------------------------------------------------------------- per-row gate


class RowGate(nn.Module):
    """The UNet's identity projection with each batch row's tokens multiplied by ``gate[row]``
    (1 or 0). A row with zero tokens gets ``scale · softmax(q·0) · 0 = 0`` from every IP
    processor: exactly the text attention alone, i.e. the adapter's scale 0 for that row."""

    def __init__(self, projection: nn.Module, gate: torch.Tensor):
        super().__init__()
        self.projection = projection
        self.gate = gate

    def forward(self, image_embeds):
        tokens = self.projection(image_embeds)
        return [t * self.gate.to(t.dtype).view(-1, *([1] * (t.ndim - 1))) for t in tokens]


@contextlib.contextmanager
def gated_identity(unet, gate: torch.Tensor):
    """Install :class:`RowGate` as the UNet's ``encoder_hid_proj`` for one call; restored in ``finally``."""
    original = unet.encoder_hid_proj
    unet.encoder_hid_proj = RowGate(original, gate)
    try:
        yield
    finally:
        unet.encoder_hid_proj = original


@contextlib.contextmanager
def lora_disabled(unet, disabled: bool):
    """peft's ``disable_lora`` for the block (FD without the LoRA); re-enabled in ``finally``."""
    if not disabled:
        yield
        return
    unet.disable_lora()
    try:
        yield
    finally:
        unet.enable_lora()


def identity_rows(row_keys: Sequence[str]) -> list[bool]:
    """Which rows carry the identity: PD's conditional rows, and PD's negative rows when they are
    guided against a PD row in the same batch (the released negative branch carries the zero
    identity exactly when its positive branch carries the identity). Every other row — FD's,
    the unconditional row of FD, PD's rows before injection, the expression stage's — is FD."""
    has_pd = PD in row_keys
    return [key == PD or (key == PD_UNCOND and has_pd) for key in row_keys]


@dataclass(frozen=True)
class IdentityConditioning(TextConditioning):
    """A text conditioning plus the identity its rows carry.

    Attributes:
        face_embeds: the face embedding fed to the projection, (1, 512); zeros on the negative branch.
        clip_embeds: Plus only: CLIP ViT-H states, (1, 257, 1280) (of a zero image on the negative branch).
        keypoint_image: InstantID only: IdentityNet's control image, (1, 3, H, W) in [0, 1].
    """

    face_embeds: torch.Tensor | None = None
    clip_embeds: torch.Tensor | None = None
    keypoint_image: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> IdentityConditioning:
        moved = super().to(device, dtype)
        extra = {
            name: None if getattr(self, name) is None else getattr(self, name).to(device=device, dtype=dtype)
            for name in ("face_embeds", "clip_embeds", "keypoint_image")
        }
        return replace(moved, **extra)


# --------------------------------------------------------------------------- the backend


class IPAdapterFaceIDBackend(Backend):
    """IP-Adapter-FaceID: FD = the same UNet with the identity gated off for FD's rows; PD = the
    released model with the identity from ``inject_step`` on.

    Args:
        pipeline: an SD1.5 or SDXL pipeline with the FaceID file loaded (:func:`load_faceid_adapter`).
        variant: ``"plain"``, ``"plus"`` or ``"plusv2"``.
        analyzer: image → :class:`FaceEmbedding` (insightface ``buffalo_l``), or None when
            ``face_embedding`` files are given.
        fd_lora: FD keeps the LoRA (default); False runs FD's rows without it, in a separate call.
        inject_step: first step with identity (default 0).
        face_embedding: a ``--face-embedding`` file used instead of the analyzer.
        clip_encoder: Plus only: a :class:`ClipFaceEncoder` computing the CLIP states of the
            analyzer's aligned face (not needed when the embedding file holds them).
    """

    name = "ip-adapter-faceid"
    identity_mechanism = "IP-Adapter's decoupled image cross-attention on face-embedding tokens"
    families = ("sd15", "sdxl")
    family_option = "faceid_family"
    license = LICENSE
    default_guidance_scale = 7.5
    #: ``--face-embedding``: the L2-normalised 512-d embedding; Plus/PlusV2 also the CLIP states,
    #: (257, 1280) for the released CLIP ViT-H (the width is the projection's ``proj_in`` input).
    identity_schema = face_file_schema(
        name,
        "docs/backends/ip_adapter_faceid.md",
        "insightface buffalo_l's L2-normalised ArcFace embedding (normed_embedding, norm 1)",
        clip=True,
    )

    def __init__(
        self,
        pipeline,
        variant: str = "plain",
        analyzer=None,
        fd_lora: bool = True,
        inject_step: int = 0,
        face_embedding: str | os.PathLike | None = None,
        clip_encoder=None,
    ):
        super().__init__(pipeline)
        projection = getattr(pipeline.unet, "encoder_hid_proj", None)
        if projection is None or not hasattr(projection, "image_projection_layers"):
            raise InputError("the pipeline has no IP-Adapter loaded; use load_faceid_adapter or from_pretrained")
        if variant not in VARIANTS:
            raise InputError(f"unknown IP-Adapter-FaceID variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if inject_step < 0:
            raise InputError(f"the injection step must be ≥ 0, got {inject_step}")
        self.variant = variant
        self.analyzer = analyzer
        self.fd_lora = fd_lora
        self.inject_step = inject_step
        self.face_embedding = face_embedding
        self.clip_encoder = clip_encoder
        if self.is_sdxl:
            self.default_guidance_scale = 5.0  # StableDiffusionXLPipeline's default, which IPAdapterFaceIDXL keeps

    @property
    def projection(self) -> nn.Module:
        return self.unet.encoder_hid_proj.image_projection_layers[0]

    @property
    def rows_in_one_call(self) -> bool:
        """With ``fd_lora=False`` FD's rows go through a call of their own."""
        return self.fd_lora

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        family: str = "sd15",
        variant: str = "plain",
        base_model: str | None = None,
        weights: str | os.PathLike | None = None,
        device=None,
        dtype=None,
        scale: float = 1.0,
        s_scale: float = 1.0,
        fd_lora: bool = True,
        inject_step: int = 0,
        face_embedding=None,
        image_encoder: str | os.PathLike | None = None,
    ) -> IPAdapterFaceIDBackend:
        """The released FaceID file on a base pipeline; insightface only when no embedding file is given."""
        from ...core.runtime import load_base_pipeline, resolve_device, resolve_dtype

        if (variant, family) not in RELEASES:
            raise InputError(
                f"IP-Adapter-FaceID has no {variant} release for {family}; released: "
                + ", ".join(f"{v}/{f}" for v, f in RELEASES)
            )
        release = RELEASES[variant, family]
        device = resolve_device(str(device) if device is not None else None)
        dtype = dtype or resolve_dtype(None, device)
        analyzer = clip_encoder = None
        if face_embedding is None:
            plus = variant != "plain"
            analyzer = InsightFaceAnalyzer(  # warns about the licence
                "buffalo_l", normed=True, device=device, aligned_size=224 if plus else None
            )
            clip_encoder = load_clip_encoder(image_encoder, device, dtype) if plus else None
        else:
            logger.warning("%s; an embedding computed with them carries that licence", INSIGHTFACE_LICENCE)
        state = read_adapter_file(resolve_file(REPO_ID, release.filename, release.size, weights, "--faceid-weights"))
        pipeline = load_base_pipeline(base_model or BASE_MODELS[family], device, dtype, sdxl=family == "sdxl")
        load_faceid_adapter(pipeline, state, variant, scale, s_scale)
        return cls(pipeline, variant, analyzer, fd_lora, inject_step, face_embedding, clip_encoder)

    @classmethod
    def build_tiny(
        cls, family: str = "sd15", variant: str = "plain", seed: int = 0, **kwargs
    ) -> IPAdapterFaceIDBackend:
        """Tiny random pipeline with a random FaceID file of the released layout (rank 4)."""
        pipeline = tiny_faceid_pipeline(family, variant, seed=seed)
        clip_shape = None if variant == "plain" else (5, TINY_CLIP_DIM)
        return cls(pipeline, variant, RandomFaceAnalyzer(clip_shape=clip_shape, seed=seed), **kwargs)

    options = (
        Option("--faceid-variant", choices=VARIANTS, default="plain", help="ip-adapter-faceid: variant"),
        Option(
            "--faceid-family",
            choices=("sd15", "sdxl"),
            help="ip-adapter-faceid: SD1.5 or SDXL file (default sd15; with --tiny: --tiny-family)",
        ),
        Option("--faceid-weights", metavar="PATH", help="ip-adapter-faceid: local FaceID .bin (or its folder)"),
        Option(
            "--faceid-scale", type=finite_float(), default=1.0, help="ip-adapter-faceid: identity scale (default 1.0)"
        ),
        Option(
            "--faceid-s-scale",
            type=finite_float(),
            default=1.0,
            help="ip-adapter-faceid plusv2: shortcut scale (default 1.0)",
        ),
        Option(
            "--faceid-fd-lora",
            choices=("keep", "off"),
            default="keep",
            help="ip-adapter-faceid: FD keeps the LoRA (default; one UNet call per step) or runs without it "
            "(a separate FD call per step)",
        ),
        Option(
            "--faceid-image-encoder",
            metavar="FOLDER",
            help="ip-adapter-faceid plus/plusv2: local CLIP ViT-H image encoder folder "
            "(default: h94/IP-Adapter models/image_encoder)",
        ),
        FACE_EMBEDDING_OPTION,  # FaceID reads no keypoints
    )

    @classmethod
    def from_options(cls, args) -> IPAdapterFaceIDBackend:
        for name in ("faceid_scale", "faceid_s_scale"):
            value = getattr(args, name)
            if not (value == value and abs(value) < float("inf")) or value < 0:
                raise InputError(f"--{name.replace('_', '-')} must be a finite number ≥ 0, got {value}")
        inject = args.inject_step if args.inject_step is not None else 0
        kwargs = dict(fd_lora=args.faceid_fd_lora == "keep", inject_step=inject, face_embedding=args.face_embedding)
        if args.tiny:
            backend = cls.build_tiny(args.faceid_family or args.tiny_family, args.faceid_variant, **kwargs)
            backend.pipeline.set_ip_adapter_scale(args.faceid_scale)
            if args.faceid_variant != "plain":
                backend.projection.shortcut_scale = args.faceid_s_scale
            return backend.to_device(args.device)
        family = args.faceid_family or "sd15"
        args.base_model = args.base_model or BASE_MODELS[family]
        return cls.from_pretrained(
            family,
            args.faceid_variant,
            args.base_model,
            args.faceid_weights,
            args.device,
            args.dtype,
            args.faceid_scale,
            args.faceid_s_scale,
            image_encoder=args.faceid_image_encoder,
            **kwargs,
        )

    @classmethod
    def file_schema(cls, variant: str):
        """The schema for ``variant``: Plus/PlusV2 need the CLIP states in the file."""
        if variant == "plain":
            return cls.identity_schema
        return cls.identity_schema.requiring("clip_embedding", "negative_clip_embedding")

    @classmethod
    def identity_dims(cls, args) -> dict[str, int]:
        """The widths the file must have, before any model loads: the released projection's
        (512-d embedding; CLIP ViT-H: 257 tokens of 1280), or the tiny model's CLIP width."""

        dims = {"id_width": FACE_EMBEDDING_DIM}
        if args.faceid_variant != "plain":
            if args.tiny:
                dims["clip_width"] = TINY_CLIP_DIM
            else:
                dims.update(clip_width=CLIP_VIT_H["hidden_size"], clip_tokens=CLIP_VIT_H["tokens"])
        return dims

    @classmethod
    def check_identity_files(cls, args) -> None:
        """``--face-embedding`` against :attr:`identity_schema`, before any model loads."""
        if getattr(args, "face_embedding", None) is not None:
            load_face_embedding(args.face_embedding, cls.file_schema(args.faceid_variant), cls.identity_dims(args))

    def model_dims(self) -> dict[str, int]:
        """The widths of the loaded projection: its embedding input and (Plus) its CLIP input."""
        projection = self.projection
        first = next(m for m in projection.modules() if isinstance(m, nn.Linear))
        dims = {"id_width": first.in_features}
        proj_in = getattr(projection, "proj_in", None)  # the Plus projection's CLIP input
        if self.variant != "plain" and isinstance(proj_in, nn.Linear):
            dims["clip_width"] = proj_in.in_features
        return dims

    def to_device(self, device) -> IPAdapterFaceIDBackend:
        self.pipeline.to(device)
        return self

    # -- conditioning -----------------------------------------------------------------
    def face(self, references) -> FaceEmbedding:
        return reference_face(
            references,
            self.face_embedding,
            None,
            self.analyzer,
            "IP-Adapter-FaceID",
            schema=self.file_schema(self.variant),
            dims=self.model_dims(),
        )

    def identity_conditions(self, parsed, references, fd, num_inference_steps):
        face = self.face(references)
        clip = None
        if self.variant != "plain":
            if self.clip_encoder is not None:
                face = self.clip_encoder.fill(face)
            if face.clip_embedding is None or face.negative_clip_embedding is None:
                raise InputError(
                    "IP-Adapter-FaceID Plus/PlusV2 needs the CLIP ViT-H embedding of the aligned face: put "
                    "'clip_embedding' and 'negative_clip_embedding' (257×1280 each) into the --face-embedding file"
                )
            clip = face.clip_embedding[None]
        self._face = face
        pd = IdentityConditioning(fd.prompt_embeds, fd.pooled_prompt_embeds, face.id_embedding[None], clip)
        return pd, self.inject_step

    def conditions(self, parsed, references, num_inference_steps, negative_prompt=None) -> Conditions:
        """The base conditions plus PD's own negative branch: the negative prompt with the
        tokens of the zero embedding, as the original's ``uncond_image_prompt_embeds``."""
        conditions = super().conditions(parsed, references, num_inference_steps, negative_prompt)
        face = self._face
        clip = None if face.negative_clip_embedding is None else face.negative_clip_embedding[None]
        uncond = conditions.uncond
        pd_uncond = IdentityConditioning(
            uncond.prompt_embeds, uncond.pooled_prompt_embeds, torch.zeros_like(face.id_embedding)[None], clip
        )
        return replace(conditions, pd_uncond=pd_uncond)

    # -- noise prediction ---------------------------------------------------------------
    def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size):
        """One UNet call with the identity gated per row; with ``fd_lora=False`` FD's rows go
        through a second call with the LoRA disabled."""
        personal = identity_rows(row_keys)
        if self.fd_lora or all(personal) or not any(personal):
            lora_off = not self.fd_lora and not any(personal)
            return self._call(latents, timestep, rows, personal, image_size, lora_off)
        out = torch.empty_like(latents)
        for flag in (False, True):
            index = [i for i, p in enumerate(personal) if p == flag]
            out[index] = self._call(
                latents[index], timestep, [rows[i] for i in index], [flag] * len(index), image_size, not flag
            ).to(out.dtype)
        return out

    def _call(self, latents, timestep, rows, personal, image_size, lora_off: bool) -> torch.Tensor:
        unet = self.unet
        embeds = torch.cat([row.prompt_embeds for row in rows])
        template = next((row for row in rows if isinstance(row, IdentityConditioning)), None)
        width = FACE_EMBEDDING_DIM if template is None else template.face_embeds.shape[-1]
        faces, clips = [], []
        for row, carries in zip(rows, personal):
            if carries and not isinstance(row, IdentityConditioning):
                raise TypeError("ip-adapter-faceid: PD rows need the IdentityConditioning of conditions()")
            faces.append(row.face_embeds if carries else embeds.new_zeros(1, width))
            if self.variant != "plain":
                clips.append(row.clip_embeds if carries else template.clip_embeds if template else None)
        added = self.added_cond_kwargs(rows, *image_size) or {}
        added["image_embeds"] = [torch.cat(faces).to(embeds.dtype)[:, None]]
        if self.variant != "plain":
            if any(c is None for c in clips):  # FD-only call: its tokens are gated to zero anyway
                shape = next((c.shape for c in clips if c is not None), None) or self._clip_shape()
                clips = [c if c is not None else embeds.new_zeros(shape) for c in clips]
            self.projection.clip_embeds = torch.cat(clips).to(embeds.dtype)[:, None]
        gate = torch.tensor([1.0 if p else 0.0 for p in personal], device=embeds.device)
        with gated_identity(unet, gate), lora_disabled(unet, lora_off):
            return unet(latents, timestep, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    def _clip_shape(self):
        proj_in = self.projection.proj_in
        return (1, CLIP_VIT_H["tokens"], proj_in.in_features)


#: Width of the tiny Plus variants' stand-in CLIP states (ViT-H's is 1280).
TINY_CLIP_DIM = 32


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
                parameter.copy_(1 + std * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator) * 4)


def faceid_state_dict(unet, variant: str = "plain", rank: int = 4, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A random IP-Adapter-FaceID file for ``unet`` in the released layout (LoRA rank ``rank``)."""
    if variant != "plain" and unet.config.cross_attention_dim < 64:
        raise InputError(
            f"IP-Adapter-FaceID {variant}'s perceiver has heads of width 64; this UNet's cross-attention "
            f"width is {unet.config.cross_attention_dim}: use --tiny-family sdxl (width 64) for Plus variants"
        )
    layout = ReleasedFaceIDLayout(unet.config, list(unet.attn_processors), variant, rank, TINY_CLIP_DIM)
    _randomize(layout, seed)
    return split_adapter_state(layout.state_dict())


def tiny_faceid_pipeline(family: str = "sd15", variant: str = "plain", seed: int = 0, scale: float = 1.0):
    """A tiny SD1.5- or SDXL-shaped pipeline with a random FaceID file loaded through diffusers."""
    from ...families.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

    pipeline = tiny_sdxl_pipeline(seed=seed) if family == "sdxl" else tiny_sd15_pipeline(seed=seed)
    pipeline.set_progress_bar_config(disable=True)
    load_faceid_adapter(pipeline, faceid_state_dict(pipeline.unet, variant, seed=seed), variant, scale)
    return pipeline
