"""InstantID (Wang et al., 2024; ``InstantID/InstantID``, weights ``InstantX/InstantID``) on SDXL.

How identity enters (the original ``pipeline_stable_diffusion_xl_instantid.py``):

1. the reference's face embedding (insightface ``antelopev2``, raw, 512-d) goes through a
   Resampler (perceiver, 16 learned queries of width 1280, depth 4, 20 heads of 64, output 2048)
   to 16 identity tokens; the negative branch gets the tokens of the *zero* embedding;
2. the UNet's cross-attention layers add ``scale · attention(q, K_ip, V_ip)`` (decoupled
   cross-attention, ``ip-adapter.bin``: ``image_proj`` + ``ip_adapter``; scale 0.8 in the
   released ``infer.py``);
3. IdentityNet, a ControlNet (``ControlNetModel``), sees the identity tokens as its text stream
   (``encoder_hidden_states``) and the drawing of the 5 facial keypoints as its control image;
   its residuals, times the conditioning scale (0.8), are added to the UNet's.

diffusers 0.42.1's ``load_ip_adapter`` reads ``ip-adapter.bin`` (its Resampler becomes
``IPAdapterPlusImageProjection``); the file is checked strictly first
(:class:`ReleasedInstantIDLayout`, key list in ``tests/data/``). The sampling step is this
backend's :meth:`InstantIDBackend.predict_noise` (diffusers has InstantID only as a community
pipeline).

FreeCure mapping, as FreeCure's released InstantID example: FD = the same call with the zero
identity embedding through the Resampler, for both the UNet's identity branch and IdentityNet,
with the same keypoint image; PD = the real identity from the injection step (default 0). The
option ``fd_identitynet=False`` switches IdentityNet off for FD's rows instead (its residuals
are zero for them; still one UNet call).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ...core import checkpoints
from ...core.conditioning import PD, Conditions
from ...core.errors import InputError, WeightsNotFoundError
from ...core.options import Option, finite_float
from ..base import Backend
from ..common.face_embedding import (
    FACE_EMBEDDING_DIM,
    FACE_EMBEDDING_OPTION,
    FACE_KEYPOINTS_OPTION,
    INSIGHTFACE_LICENCE,
    InsightFaceAnalyzer,
    RandomFaceAnalyzer,
    draw_keypoints,
    face_file_schema,
    load_face_embedding,
    load_face_keypoints,
    reference_face,
    scale_keypoints,
)
from ..common.identity_files import reference_size
from ..common.layers import FacePerceiverResampler
from .faceid import (
    IdentityConditioning,
    _randomize,
    identity_rows,
    processor_layouts,
    read_adapter_file,
    resolve_file,
    split_adapter_state,
)

logger = logging.getLogger(__name__)

REPO_ID = "InstantX/InstantID"
ADAPTER_FILE = "ip-adapter.bin"
CONTROLNET_FOLDER = "ControlNetModel"
DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
#: Sizes computed from the released layouts' parameter counts (fp16 storage).
ADAPTER_SIZE = "≈1.69 GB (computed, fp32 as released)"
CONTROLNET_SIZE = "≈2.50 GB (computed, fp16)"
#: The released ``infer.py`` defaults.
IP_ADAPTER_SCALE = 0.8
CONTROLNET_SCALE = 0.8
#: The released Resampler (``set_image_proj_model``).
RESAMPLER = dict(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=FACE_EMBEDDING_DIM, ff_mult=4)

LICENSE = (
    "InstantID weights: Apache-2.0 (InstantX/InstantID model card); face embeddings from insightface "
    "antelopev2: NON-COMMERCIAL research only; the base model's licence applies too (SDXL: CreativeML Open RAIL++-M)"
)


class ResamplerLayout(FacePerceiverResampler):
    """The original ``Resampler``'s keys: ``latents`` (1, queries, dim) plus the perceiver
    (``proj_in``, ``proj_out``, ``norm_out``, ``layers.N.{0,1}``)."""

    def __init__(self, dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult=4):
        super().__init__(dim, depth, dim_head, heads, embedding_dim, output_dim, ff_mult)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)


class ReleasedInstantIDLayout(nn.Module):
    """Keys and shapes of ``ip-adapter.bin``: the Resampler (``image_proj``) and ``to_k_ip``/
    ``to_v_ip`` of every cross-attention processor (``ip_adapter.<index>``)."""

    def __init__(self, unet_config, processor_names, resampler: dict | None = None):
        super().__init__()
        config = dict(RESAMPLER if resampler is None else resampler)
        self.image_proj = ResamplerLayout(**config, output_dim=unet_config["cross_attention_dim"])
        self.ip_adapter = processor_layouts(unet_config, processor_names, rank=0)


def check_instantid_state_dict(unet, state, resampler: dict | None = None) -> None:
    """Strict key and shape check of ``ip-adapter.bin`` for ``unet``. ``resampler`` defaults to
    the release's; its width is read from the file's ``latents`` otherwise."""
    if not isinstance(state, dict) or set(state) != {"image_proj", "ip_adapter"}:
        found = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise WeightsNotFoundError(
            f"InstantID's ip-adapter.bin holds exactly 'image_proj' and 'ip_adapter', not {found}"
        )
    with torch.device("meta"):
        layout = ReleasedInstantIDLayout(unet.config, list(unet.attn_processors), resampler)
    flat = {f"{part}.{key}": value for part in ("image_proj", "ip_adapter") for key, value in state[part].items()}
    checkpoints.check_state_dict(
        layout,
        flat,
        "the file does not match InstantID's ip-adapter.bin for this base model",
        hint="InstantID needs an SDXL base model and InstantX/InstantID's ip-adapter.bin.",
    )


def load_instantid_adapter(pipeline, state, scale: float = IP_ADAPTER_SCALE, resampler: dict | None = None) -> None:
    """Check ``ip-adapter.bin`` strictly, then load it with diffusers' ``load_ip_adapter``."""
    check_instantid_state_dict(pipeline.unet, state, resampler)
    pipeline.load_ip_adapter(
        {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])},
        subfolder="",
        weight_name=ADAPTER_FILE,
        image_encoder_folder=None,
    )
    pipeline.set_ip_adapter_scale(scale)


#: What to do when IdentityNet cannot be used.
IDENTITYNET_HINT = (
    f"Pass --instantid-controlnet FOLDER ({REPO_ID}'s {CONTROLNET_FOLDER}: config.json and "
    "diffusion_pytorch_model.safetensors), or run with --tiny."
)


def load_identitynet(source: str | os.PathLike | None = None, dtype=None):
    """IdentityNet (a diffusers ``ControlNetModel``) from a local folder, or from the Hub's
    ``InstantX/InstantID/ControlNetModel`` when ``source`` is None, loaded strictly
    (:func:`freecure.checkpoints.load_diffusers_model`): a missing, unexpected or reshaped key is
    refused, named, before anything is loaded (diffusers alone only warns).

    Raises:
        WeightsNotFoundError: the folder or its files are missing or do not match.
    """
    from pathlib import Path

    from diffusers import ControlNetModel

    if source is not None and str(source) != "":
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise WeightsNotFoundError(f"IdentityNet folder not found: {folder} is not a folder. {IDENTITYNET_HINT}")
    else:
        root = checkpoints.hub_snapshot(
            REPO_ID,
            [f"{CONTROLNET_FOLDER}/*.json", f"{CONTROLNET_FOLDER}/*.safetensors"],
            f"IdentityNet ({REPO_ID}/{CONTROLNET_FOLDER}, {CONTROLNET_SIZE})",
            IDENTITYNET_HINT,
        )
        folder = root / CONTROLNET_FOLDER
    return checkpoints.load_diffusers_model(ControlNetModel, folder, "IdentityNet", IDENTITYNET_HINT, dtype)


def keypoint_tensor(face, image_size: tuple[int, int], device, dtype) -> torch.Tensor:
    """IdentityNet's control image for an (height, width) output: the keypoints scaled from the
    reference photo to the output, drawn, as (1, 3, H, W) in [0, 1] (diffusers' control-image
    preprocessing: no normalisation)."""
    height, width = image_size
    points = scale_keypoints(face.keypoints, face.image_size, (width, height))
    image = np.asarray(draw_keypoints((width, height), points), dtype=np.float32) / 255.0
    if not image.any():  # every keypoint outside the output: IdentityNet would see a black image
        pairs = ", ".join(f"({x:g}, {y:g})" for x, y in points.tolist())
        raise InputError(
            f"InstantID's face keypoints draw nothing inside the {width}×{height} output (scaled: {pairs}); "
            "keypoints are pixel (x, y) in the reference photo: check --face-keypoints and the file's image_size"
        )
    return torch.from_numpy(image).permute(2, 0, 1)[None].to(device=device, dtype=dtype)


class InstantIDBackend(Backend):
    """InstantID on SDXL: FD = zero identity through the Resampler for the UNet and IdentityNet
    (or IdentityNet off for FD, ``fd_identitynet=False``); PD = the real identity.

    Args:
        pipeline: an SDXL pipeline with ``ip-adapter.bin`` loaded (:func:`load_instantid_adapter`).
        controlnet: IdentityNet (a diffusers ``ControlNetModel``).
        analyzer: image → face embedding and keypoints (insightface ``antelopev2``), or None.
        controlnet_scale: IdentityNet's conditioning scale (0.8).
        fd_identitynet: FD's rows run IdentityNet with the zero identity (default), or not at all.
        inject_step: first step with the real identity (default 0).
        face_embedding, face_keypoints: ``--face-embedding`` / ``--face-keypoints`` files.
    """

    name = "instantid"
    identity_mechanism = "IP-Adapter image tokens and IdentityNet's ControlNet residuals"
    families = ("sdxl",)
    rows_in_one_call = True  # predict_noise adds the adapter's inputs to the engine's one call
    license = LICENSE
    default_guidance_scale = 5.0  # the released infer.py
    #: ``--face-embedding``: antelopev2's raw 512-d embedding (the Resampler's input width), and
    #: optionally the 5 keypoints and the photo's size; ``--face-keypoints`` the keypoints alone.
    identity_schema = face_file_schema(
        name,
        "docs/backends/instantid.md",
        "insightface antelopev2's raw ArcFace embedding (embedding, norm ≈ 20–30)",
        clip=False,
    )

    def __init__(
        self,
        pipeline,
        controlnet,
        analyzer=None,
        controlnet_scale: float = CONTROLNET_SCALE,
        fd_identitynet: bool = True,
        inject_step: int = 0,
        face_embedding=None,
        face_keypoints=None,
    ):
        super().__init__(pipeline)
        if not self.is_sdxl:
            raise InputError("InstantID needs an SDXL pipeline (two text encoders)")
        if getattr(pipeline.unet, "encoder_hid_proj", None) is None:
            raise InputError("the pipeline has no IP-Adapter loaded; use load_instantid_adapter or from_pretrained")
        if not 0 <= controlnet_scale < float("inf") or inject_step < 0:
            raise InputError("InstantID: the IdentityNet scale must be finite and ≥ 0, the injection step ≥ 0")
        self.controlnet = controlnet.eval().requires_grad_(False)
        self.analyzer = analyzer
        self.controlnet_scale = controlnet_scale
        self.fd_identitynet = fd_identitynet
        self.inject_step = inject_step
        self.face_embedding = face_embedding
        self.face_keypoints = face_keypoints
        self._kps: dict = {}

    def unets(self):
        """The UNet and IdentityNet (both counted by ``freecure cost``)."""
        return [self.pipeline.unet, self.controlnet]

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_model: str = DEFAULT_BASE_MODEL,
        weights: str | os.PathLike | None = None,
        controlnet: str | os.PathLike | None = None,
        device=None,
        dtype=None,
        ip_adapter_scale: float = IP_ADAPTER_SCALE,
        **kwargs,
    ) -> InstantIDBackend:
        """Load the base model, ``ip-adapter.bin`` and IdentityNet (local paths or the Hub)."""
        from ...core.runtime import load_base_pipeline, resolve_device, resolve_dtype

        device = resolve_device(str(device) if device is not None else None)
        dtype = dtype or resolve_dtype(None, device)
        analyzer = None
        if kwargs.get("face_embedding") is None:
            analyzer = InsightFaceAnalyzer("antelopev2", normed=False, device=device)  # warns about the licence
        else:
            logger.warning("%s; an embedding computed with them carries that licence", INSIGHTFACE_LICENCE)
        state = read_adapter_file(resolve_file(REPO_ID, ADAPTER_FILE, ADAPTER_SIZE, weights, "--instantid-weights"))
        identitynet = load_identitynet(controlnet, dtype)  # strict: a bad key is named before any load
        pipeline = load_base_pipeline(base_model, device, dtype, sdxl=True)
        load_instantid_adapter(pipeline, state, ip_adapter_scale)
        return cls(pipeline, identitynet.to(device), analyzer, **kwargs)

    @classmethod
    def build_tiny(cls, seed: int = 0, **kwargs) -> InstantIDBackend:

        pipeline, controlnet = tiny_instantid(seed=seed)
        return cls(pipeline, controlnet, RandomFaceAnalyzer(seed=seed), **kwargs)

    options = (
        Option("--instantid-weights", metavar="PATH", help="instantid: local ip-adapter.bin (or its folder)"),
        Option("--instantid-controlnet", metavar="FOLDER", help="instantid: local IdentityNet folder"),
        Option(
            "--instantid-ip-scale",
            type=finite_float(),
            default=IP_ADAPTER_SCALE,
            help="instantid: identity scale (0.8)",
        ),
        Option(
            "--instantid-controlnet-scale",
            type=finite_float(),
            default=CONTROLNET_SCALE,
            help="instantid: IdentityNet scale (0.8)",
        ),
        Option(
            "--instantid-fd",
            choices=("zero-identity", "no-identitynet"),
            default="zero-identity",
            help="instantid: FD = zero identity through the Resampler for UNet and IdentityNet (default, "
            "FreeCure's released example) or IdentityNet switched off for FD's rows",
        ),
        FACE_EMBEDDING_OPTION,
        FACE_KEYPOINTS_OPTION,
    )

    @classmethod
    def from_options(cls, args) -> InstantIDBackend:
        for name in ("instantid_ip_scale", "instantid_controlnet_scale"):
            value = getattr(args, name)
            if not (value == value and abs(value) < float("inf")) or value < 0:
                raise InputError(f"--{name.replace('_', '-')} must be a finite number ≥ 0, got {value}")
        kwargs = dict(
            controlnet_scale=args.instantid_controlnet_scale,
            fd_identitynet=args.instantid_fd == "zero-identity",
            inject_step=args.inject_step if args.inject_step is not None else 0,
            face_embedding=args.face_embedding,
            face_keypoints=args.face_keypoints,
        )
        if args.tiny:
            backend = cls.build_tiny(**kwargs)
            backend.pipeline.set_ip_adapter_scale(args.instantid_ip_scale)
            backend.pipeline.to(args.device)
            backend.controlnet.to(args.device)
            return backend
        args.base_model = args.base_model or DEFAULT_BASE_MODEL
        return cls.from_pretrained(
            args.base_model,
            args.instantid_weights,
            args.instantid_controlnet,
            args.device,
            args.dtype,
            args.instantid_ip_scale,
            **kwargs,
        )

    @classmethod
    def check_identity_files(cls, args) -> None:
        """``--face-embedding`` and ``--face-keypoints`` against :attr:`identity_schema` (keypoints
        inside the photo: the file's ``image_size``, else the first ``--ref``), and keypoints from
        one of them when an embedding file is given; before any model loads."""
        embedding, keypoints = getattr(args, "face_embedding", None), getattr(args, "face_keypoints", None)
        photo = reference_size(args)
        face = None
        if embedding is not None:
            face = load_face_embedding(embedding, cls.identity_schema, cls.identity_dims(args), size=photo)
        if keypoints is not None:
            load_face_keypoints(keypoints, size=(face.image_size if face is not None else None) or photo)
        elif face is not None and face.keypoints is None:
            raise InputError(
                f"--face-embedding {embedding} holds no keypoints and InstantID needs the face's 5: pass "
                "--face-keypoints FILE.json (5 [x, y] pairs in the photo's pixels), or put 'keypoints' (5, 2) "
                "and 'image_size' into the file (docs/backends/instantid.md)"
            )

    @classmethod
    def identity_dims(cls, args) -> dict[str, int]:
        """The embedding width of the released (and the tiny) Resampler: 512."""
        return {"id_width": RESAMPLER["embedding_dim"]}

    def model_dims(self) -> dict[str, int]:
        """The embedding width of the loaded Resampler (its ``proj_in`` input)."""
        return {"id_width": self.unet.encoder_hid_proj.image_projection_layers[0].proj_in.in_features}

    # -- conditioning -----------------------------------------------------------------
    def identity_conditions(self, parsed, references, fd, num_inference_steps):
        face = reference_face(
            references,
            self.face_embedding,
            self.face_keypoints,
            self.analyzer,
            "InstantID",
            need_keypoints=True,
            schema=self.identity_schema,
            dims=self.model_dims(),
        )
        self._face, self._kps = face, {}
        pd = IdentityConditioning(fd.prompt_embeds, fd.pooled_prompt_embeds, face.id_embedding[None])
        return pd, self.inject_step

    def conditions(self, parsed, references, num_inference_steps, negative_prompt=None) -> Conditions:
        """With IdentityNet off for FD, PD's negative branch (zero identity *with* IdentityNet)
        differs from FD's (without): it becomes a row of its own."""
        conditions = super().conditions(parsed, references, num_inference_steps, negative_prompt)
        if self.fd_identitynet:
            return conditions
        return replace(conditions, pd_uncond=replace(conditions.uncond))

    def keypoint_image(self, image_size, device, dtype) -> torch.Tensor:
        key = (tuple(image_size), device, dtype)
        if key not in self._kps:
            self._kps[key] = keypoint_tensor(self._face, image_size, device, dtype)
        return self._kps[key]

    # -- noise prediction ---------------------------------------------------------------
    def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size):
        """IdentityNet on the rows that use it (identity tokens as its text stream), then one UNet
        call with every row's identity tokens and IdentityNet residuals."""
        unet, controlnet = self.unet, self.controlnet
        personal = identity_rows(row_keys)
        embeds = torch.cat([row.prompt_embeds for row in rows])
        faces = []
        for row, key, carries in zip(rows, row_keys, personal):
            if key == PD and not isinstance(row, IdentityConditioning):
                raise TypeError("instantid: PD rows need the IdentityConditioning of conditions()")
            real = carries and isinstance(row, IdentityConditioning)  # PD's negative row: the zero embedding
            faces.append(row.face_embeds if real else embeds.new_zeros(1, FACE_EMBEDDING_DIM))
        face_embeds = torch.cat(faces).to(embeds.dtype)[:, None, None]  # (rows, images, 1, 512)
        added = self.added_cond_kwargs(rows, *image_size)
        use_net = [carries or self.fd_identitynet for carries in personal]
        index = [i for i, used in enumerate(use_net) if used]
        down = mid = None
        if index:
            tokens = unet.encoder_hid_proj([face_embeds[index]])[0][:, 0]  # (n, 16, D)
            cond = self.keypoint_image(image_size, latents.device, controlnet.dtype)
            down, mid = controlnet(
                latents[index].to(controlnet.dtype),
                timestep,
                encoder_hidden_states=tokens.to(controlnet.dtype),
                controlnet_cond=cond.expand(len(index), -1, -1, -1),
                conditioning_scale=self.controlnet_scale,
                added_cond_kwargs={name: value[index] for name, value in added.items()},
                return_dict=False,
            )
            if len(index) < len(rows):  # IdentityNet off for FD's rows: zero residuals there
                down = [_scatter(r, index, len(rows)) for r in down]
                mid = _scatter(mid, index, len(rows))
        return unet(
            latents,
            timestep,
            encoder_hidden_states=embeds,
            added_cond_kwargs={**added, "image_embeds": [face_embeds]},
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


def _scatter(values: torch.Tensor, index: list[int], rows: int) -> torch.Tensor:
    out = values.new_zeros((rows, *values.shape[1:]))
    out[index] = values
    return out


__all__ = ["INSIGHTFACE_LICENCE", "InstantIDBackend", "ReleasedInstantIDLayout", "load_instantid_adapter"]


#: The tiny InstantID Resampler: width 64 so that diffusers' loader (heads = width / 64) reads it.
TINY_RESAMPLER = dict(dim=64, depth=4, dim_head=64, heads=1, num_queries=16, embedding_dim=512, ff_mult=4)


def instantid_state_dict(unet, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A random InstantID ``ip-adapter.bin`` for ``unet`` with the tiny Resampler."""

    layout = ReleasedInstantIDLayout(unet.config, list(unet.attn_processors), TINY_RESAMPLER)
    _randomize(layout, seed)
    return split_adapter_state(layout.state_dict())


def tiny_identitynet(unet, seed: int = 0):
    """A ControlNet shaped like the tiny SDXL UNet, with random (non-zero) output convolutions so
    that its residuals matter."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(0.05 * torch.randn(conv.weight.shape, generator=generator))
            conv.bias.copy_(0.01 * torch.randn(conv.bias.shape, generator=generator))
    return controlnet.eval()


def tiny_instantid(seed: int = 0, scale: float = 0.8):
    """The tiny SDXL pipeline with a random ``ip-adapter.bin`` and a tiny IdentityNet."""
    from ...families.tiny import tiny_sdxl_pipeline

    pipeline = tiny_sdxl_pipeline(seed=seed)
    pipeline.set_progress_bar_config(disable=True)
    controlnet = tiny_identitynet(pipeline.unet, seed)
    load_instantid_adapter(pipeline, instantid_state_dict(pipeline.unet, seed), scale, TINY_RESAMPLER)
    return pipeline, controlnet
