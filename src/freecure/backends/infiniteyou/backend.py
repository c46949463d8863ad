"""InfiniteYou (``ByteDance/InfiniteYou``, ``infu_flux_v1.0``) on FLUX.1-dev.

InfiniteYou keeps FLUX's text path as it is and adds identity through **InfuseNet**, a
``FluxControlNetModel`` whose text stream is not the prompt but 8 *identity tokens*: a
Resampler (:class:`IdentityResampler`, ``image_proj_model.bin``) maps the 512-d ArcFace
embedding of the reference face to 8 × 4096. InfuseNet's residuals are added to the base
transformer's double- and single-stream blocks; its image input is the packed VAE latent of a
control image (black when no pose is given) and its time embedding takes the same timestep,
the prompt's pooled CLIP embedding and its own guidance value (1.0).

FreeCure reading. The user's prompt reaches the base transformer unchanged, so FD and PD have
the same text: PD is *the same transformer call with InfuseNet's residuals* from the injection
step (``infusenet_guidance_start`` × T, default 0), FD the call without them. One joint call
carries both rows; InfuseNet runs on PD's rows only and its residuals are scattered into a
zero tensor for the others, so a FD row gets ``h + 0 = h`` exactly (diffusers adds
``controlnet_block_samples`` per sample). True CFG's negative branch, like the original's,
gets no residuals.

Licences: the InfiniteYou weights are CC BY-NC 4.0 (non-commercial); FLUX.1-dev has its own
non-commercial licence; insightface's detection models are for non-commercial research only.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.utils.torch_utils import get_module_execution_device
from PIL import Image
from torch import nn

from ...core.attributes import ParsedPrompt
from ...core.checkpoints import check_state_dict, hub_snapshot, read_tensors
from ...core.conditioning import PD, TextConditioning
from ...core.errors import InputError, WeightsNotFoundError
from ...core.options import Option, finite_float
from ...families.flux import pack_latents
from ..base import Backend
from ..common.identity_files import IdentitySchema, TensorField, read_identity_file
from ..common.layers import FacePerceiverResampler
from ..photomaker.v2 import FACE_EMBEDDING_DIM

logger = logging.getLogger(__name__)

REPO_ID = "ByteDance/InfiniteYou"
VERSION = "infu_flux_v1.0"
VARIANTS = ("aes_stage2", "sim_stage1")
DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.1-dev"
LICENSE = (
    "InfiniteYou weights: CC BY-NC 4.0 (non-commercial); FLUX.1-dev: FLUX.1 [dev] Non-Commercial License; "
    "insightface face models: non-commercial research only"
)

#: The released Resampler (``InfUFluxPipeline.__init__``): 512-d ArcFace → 8 tokens × 4096.
RESAMPLER = dict(dim=1280, depth=4, dim_head=64, heads=20, num_queries=8, embedding_dim=512, output_dim=4096, ff_mult=4)
#: A tiny Resampler of the same structure, for ``--tiny`` and tests (output = tiny T5 width).
TINY_RESAMPLER = dict(dim=32, depth=2, dim_head=8, heads=4, num_queries=8, embedding_dim=512, output_dim=32, ff_mult=2)


class IdentityResampler(FacePerceiverResampler):
    """Learned queries attend to the projected face embedding (perceiver layers), then a
    projection and a LayerNorm: (b, n, 512) → (b, num_queries, output_dim)."""

    def __init__(self, dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult=4):
        super().__init__(dim, depth, dim_head, heads, embedding_dim, output_dim, ff_mult)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return super().forward(self.latents.repeat(embedding.shape[0], 1, 1), embedding)


def injection_step(guidance_start: float, num_inference_steps: int) -> int:
    """First step at which InfuseNet is on: the original's ``controlnet_keep`` is 1 from the
    first i with i/T ≥ ``infusenet_guidance_start``."""
    if not 0.0 <= guidance_start < 1.0:
        raise InputError(f"infusenet_guidance_start must lie in [0, 1), got {guidance_start}")
    return next(i for i in range(num_inference_steps) if i / num_inference_steps >= guidance_start)


#: The InfuseNet folder of a variant (``infu_flux_v1.0/<variant>/InfuseNetModel``: config.json and
#: diffusion_pytorch_model.safetensors, or shards and their index).
INFUSENET_FOLDER = "InfuseNetModel"


def load_infusenet(folder: str | os.PathLike, dtype=None):
    """InfuseNet (a diffusers ``FluxControlNetModel``) from ``folder`` (``.../InfuseNetModel``),
    strictly (:func:`freecure.checkpoints.load_diffusers_model`, every shard of a sharded folder):
    a missing, unexpected or reshaped key is refused, named, before anything is loaded
    (diffusers alone only warns).

    Raises:
        WeightsNotFoundError: the folder or its files are missing or do not match.
    """
    from diffusers import FluxControlNetModel

    from ...core.checkpoints import load_diffusers_model

    hint = (
        f"Pass --infiniteyou-weights DIR, the folder {VERSION}/<variant> of {REPO_ID} (with "
        f"{INFUSENET_FOLDER}/ and image_proj_model.bin), or run with --tiny."
    )
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WeightsNotFoundError(f"InfuseNet folder not found: {folder} is not a folder. {hint}")
    return load_diffusers_model(FluxControlNetModel, folder, "InfuseNet", hint, dtype)


def load_resampler(path: str | os.PathLike, config: dict = RESAMPLER) -> IdentityResampler:
    """``image_proj_model.bin`` (its ``image_proj`` entry) into an :class:`IdentityResampler`,
    strictly, read with ``weights_only=True``."""
    path = Path(path)
    checkpoint = read_tensors(path, "InfiniteYou's image_proj_model.bin", nested=True)
    if "image_proj" not in checkpoint:
        raise WeightsNotFoundError(f"{path} has no 'image_proj' entry; is it InfiniteYou's image_proj_model.bin?")
    with torch.device("meta"):
        resampler = IdentityResampler(**config)
    check_state_dict(resampler, checkpoint["image_proj"], f"{path.name} does not match InfiniteYou's Resampler")
    resampler.load_state_dict(checkpoint["image_proj"], strict=True, assign=True)
    return resampler.eval()


#: ``--face-embedding``: the ArcFace embedding the Resampler reads (its ``proj_in`` input, 512).
IDENTITY_SCHEMA = IdentitySchema(
    "infiniteyou",
    "--face-embedding",
    (
        TensorField(
            "embedding",
            (("id_width",), (1, "id_width")),
            "the ArcFace embedding (facexlib IR-SE50 on the aligned 112² crop, norm ≈ 20–30)",
        ),
    ),
    "docs/backends/infiniteyou.md",
)


def load_face_embedding(path, dims: dict[str, int] | None = None) -> torch.Tensor:
    """The tensor ``embedding`` ((512,) or (1, 512)) of a safetensors file: a precomputed ArcFace
    embedding, as facexlib's IR-SE50 gives it on an aligned 112² crop; checked against
    :data:`IDENTITY_SCHEMA` with the Resampler's width ``dims`` (default 512)."""
    dims = {"id_width": RESAMPLER["embedding_dim"]} if dims is None else dims
    return read_identity_file(path, IDENTITY_SCHEMA, dims)["embedding"].float().reshape(-1)


class FacexlibArcFace:
    """The original's identity embedding: insightface's ``antelopev2`` detector finds the
    largest face and its 5 landmarks (retrying at 640, 320, 160), ``face_align.norm_crop``
    aligns a 112² crop, facexlib's IR-SE50 ArcFace embeds it. Both download weights at run time;
    insightface's are for non-commercial research only. Optional: ``pip install insightface
    onnxruntime facexlib``, or pass ``--face-embedding``."""

    def __init__(self, device: torch.device | str = "cpu", root: str | None = None):
        try:
            from facexlib.recognition import init_recognition_model
            from insightface.app import FaceAnalysis
        except ImportError:
            raise InputError(
                "InfiniteYou's face embedding needs insightface, onnxruntime and facexlib "
                "(`pip install insightface onnxruntime facexlib`), or pass --face-embedding FILE.safetensors"
            ) from None
        self.device = torch.device(device)
        kwargs = {"root": root} if root else {}
        try:
            self.app = FaceAnalysis(name="antelopev2", providers=["CPUExecutionProvider"], **kwargs)
            self.app.prepare(ctx_id=-1, det_size=(640, 640))
            self.arcface = init_recognition_model("arcface", device=str(self.device))
        except Exception as error:  # both download on first use
            raise WeightsNotFoundError(
                f"could not load the face models ({error}); they download on first use"
            ) from None

    def __call__(self, references: Sequence[Image.Image]) -> torch.Tensor:
        import numpy as np
        from insightface.utils import face_align

        bgr = np.asarray(references[0].convert("RGB"))[:, :, ::-1].copy()
        faces = []
        for size in (640, 320, 160):
            self.app.det_model.input_size = (size, size)
            faces = self.app.get(bgr)
            if faces:
                break
        if not faces:
            raise InputError("no face detected in the reference photo; InfiniteYou needs one")
        face = max(faces, key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]))
        crop = face_align.norm_crop(bgr, landmark=np.asarray(face["kps"]), image_size=112)
        pixels = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1
        with torch.no_grad():
            return self.arcface(pixels.to(self.device))[0].float().cpu()


class RandomArcFace:
    """``--tiny``: a fixed random projection of the downsampled reference to 512 numbers."""

    def __init__(self, seed: int = 0):
        from ..common.random_identity import RandomProjectionIdentityEncoder

        self.projection = RandomProjectionIdentityEncoder(FACE_EMBEDDING_DIM, seed=seed)

    def __call__(self, references: Sequence[Image.Image]) -> torch.Tensor:
        return self.projection(references[:1])


class InfiniteYouBackend(Backend):
    """InfiniteYou: PD adds InfuseNet's residuals to FLUX's blocks from the injection step.

    Args:
        pipeline: a diffusers ``FluxPipeline`` (FLUX.1-dev).
        infusenet: the ``FluxControlNetModel`` of the chosen variant.
        resampler: :class:`IdentityResampler` (``image_proj_model.bin``).
        face_embedding: a fixed 512-d embedding, or a callable on the reference photos.
        conditioning_scale: ``infusenet_conditioning_scale`` (default 1.0).
        guidance_start: ``infusenet_guidance_start``: injection at the first step i with
            i/T ≥ it (default 0).
        infusenet_guidance: InfuseNet's own guidance embedding (the original: 1.0).
        control_seed: seed of the VAE sample of the (black) control image.
    """

    name = "infiniteyou"
    identity_mechanism = "InfuseNet's residuals added to the FLUX transformer blocks (the T5 prompt is untouched)"
    families = ("flux",)
    rows_in_one_call = True  # predict_noise adds the adapter's inputs to the engine's one call
    license = LICENSE
    default_guidance_scale = 3.5
    identity_schema = IDENTITY_SCHEMA

    def __init__(
        self,
        pipeline,
        infusenet,
        resampler: IdentityResampler,
        face_embedding,
        conditioning_scale: float = 1.0,
        guidance_start: float = 0.0,
        infusenet_guidance: float = 1.0,
        control_seed: int = 0,
    ):
        super().__init__(pipeline)
        injection_step(guidance_start, 2)  # validates the range
        self.infusenet = infusenet
        self.resampler = resampler
        self.face_embedding = face_embedding
        self.conditioning_scale = conditioning_scale
        self.guidance_start = guidance_start
        self.infusenet_guidance = infusenet_guidance
        self.control_seed = control_seed
        self.identity_tokens: torch.Tensor | None = None
        self._control: dict[tuple[int, int], torch.Tensor] = {}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def build_tiny(cls, seed: int = 0, pipeline=None, **kwargs) -> InfiniteYouBackend:
        """Tiny random InfuseNet and Resampler on ``pipeline`` (default: a new tiny FLUX), offline."""
        from diffusers import FluxControlNetModel

        from ...families.tiny import tiny_flux_pipeline

        pipeline = pipeline if pipeline is not None else tiny_flux_pipeline(seed=seed)
        config = dict(pipeline.transformer.config)
        torch.manual_seed(seed + 1)
        infusenet = FluxControlNetModel(
            patch_size=1,
            in_channels=config["in_channels"],
            num_layers=2,
            num_single_layers=1,
            attention_head_dim=config["attention_head_dim"],
            num_attention_heads=config["num_attention_heads"],
            joint_attention_dim=config["joint_attention_dim"],
            pooled_projection_dim=config["pooled_projection_dim"],
            guidance_embeds=True,
            axes_dims_rope=config["axes_dims_rope"],
        )
        # ControlNet blocks start at zero (no effect): give them weights so PD differs from FD.
        with torch.no_grad():
            zero_initialised = [*infusenet.controlnet_blocks, *infusenet.controlnet_single_blocks]
            for block in [*zero_initialised, infusenet.controlnet_x_embedder]:
                block.weight.normal_(0, 0.05)
        torch.manual_seed(seed + 2)
        resampler = IdentityResampler(**TINY_RESAMPLER).eval()
        return cls(pipeline, infusenet, resampler, RandomArcFace(seed), **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        base_model: str = DEFAULT_BASE_MODEL,
        weights: str | os.PathLike | None = None,
        variant: str = "aes_stage2",
        device="cuda",
        dtype=torch.bfloat16,
        face_embedding=None,
        **kwargs,
    ) -> InfiniteYouBackend:
        """FLUX.1-dev plus ``infu_flux_v1.0/<variant>`` from a local folder or the Hub."""
        from ...core.runtime import load_base_pipeline

        if variant not in VARIANTS:
            raise InputError(f"unknown InfiniteYou variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        logger.warning("InfiniteYou's weights are licensed CC BY-NC 4.0: non-commercial use only")
        folder = Path(weights) if weights else None
        if folder is None:
            root = hub_snapshot(
                REPO_ID, [f"{VERSION}/{variant}/*"], f"{REPO_ID}/{VERSION}/{variant}",
                f"Pass --infiniteyou-weights DIR (the folder {VERSION}/{variant}), or run with --tiny.",
            )
            folder = root / VERSION / variant
        infusenet = load_infusenet(folder / INFUSENET_FOLDER, dtype)  # strict: a bad key is named before any load
        resampler = load_resampler(folder / "image_proj_model.bin").to(device, dtype)
        pipeline = load_base_pipeline(base_model, device, dtype)
        if face_embedding is None:
            face_embedding = FacexlibArcFace(device)
        return cls(pipeline, infusenet.to(device), resampler, face_embedding, **kwargs)

    options = (
        Option("--infiniteyou-weights", metavar="DIR", help="infiniteyou: folder infu_flux_v1.0/<variant>"),
        Option("--infiniteyou-variant", choices=VARIANTS, default="aes_stage2", help="infiniteyou: model variant"),
        Option(
            "--face-embedding",
            metavar="FILE",
            help="infiniteyou: safetensors file with a 512-d ArcFace tensor 'embedding' (else insightface+facexlib)",
        ),
        Option(
            "--infusenet-conditioning-scale",
            type=finite_float(),
            default=1.0,
            help="infiniteyou: InfuseNet residual scale (default 1.0)",
        ),
        Option(
            "--infusenet-guidance-start",
            type=finite_float(),
            default=0.0,
            help="infiniteyou: InfuseNet (identity) from the first step i with i/T ≥ this (default 0)",
        ),
    )

    @classmethod
    def from_options(cls, args) -> InfiniteYouBackend:
        for name in ("infusenet_conditioning_scale", "infusenet_guidance_start"):
            value = getattr(args, name)
            if not math.isfinite(value):
                raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if not 0.0 <= args.infusenet_guidance_start < 1.0:
            raise InputError(f"--infusenet-guidance-start must lie in [0, 1), got {args.infusenet_guidance_start}")
        options = dict(
            conditioning_scale=args.infusenet_conditioning_scale, guidance_start=args.infusenet_guidance_start
        )
        embedding = load_face_embedding(args.face_embedding, cls.identity_dims(args)) if args.face_embedding else None
        if args.tiny:
            backend = cls.build_tiny(**options)
            if embedding is not None:
                backend.face_embedding = embedding
            backend.pipeline.to(args.device)
            backend.infusenet.to(args.device)
            backend.resampler.to(args.device)
            return backend
        return cls.from_pretrained(
            args.base_model or DEFAULT_BASE_MODEL,
            args.infiniteyou_weights,
            args.infiniteyou_variant,
            args.device,
            args.dtype,
            face_embedding=embedding,
            **options,
        )

    @classmethod
    def identity_dims(cls, args) -> dict[str, int]:
        """The Resampler's embedding width, released and tiny alike (512)."""
        return {"id_width": RESAMPLER["embedding_dim"]}

    @classmethod
    def check_identity_files(cls, args) -> None:
        """``--face-embedding`` against :attr:`identity_schema`, before any model loads."""
        if getattr(args, "face_embedding", None):
            load_face_embedding(args.face_embedding, cls.identity_dims(args))

    # -- what the engine asks --------------------------------------------------------------
    def unets(self) -> list[torch.nn.Module]:
        return [self.denoiser, self.infusenet]

    def identity_conditions(
        self, parsed: ParsedPrompt, references: Sequence[Image.Image], fd: TextConditioning, num_inference_steps: int
    ) -> tuple[TextConditioning, int]:
        """PD's text is FD's (the prompt reaches FLUX unchanged); the identity tokens are kept
        for :meth:`predict_noise`."""
        if isinstance(self.face_embedding, torch.Tensor):
            embedding = self.face_embedding
        else:
            if not references:
                raise InputError("the infiniteyou backend needs a reference photo (--ref) or --face-embedding")
            embedding = self.face_embedding(references)
        parameter = next(self.resampler.parameters())
        with torch.no_grad():
            tokens = self.resampler(embedding.reshape(1, 1, -1).to(parameter.device, parameter.dtype))
        self.identity_tokens = tokens.to(self.device, self.dtype)
        return fd, injection_step(self.guidance_start, num_inference_steps)

    def control_latents(self, image_size: tuple[int, int]) -> torch.Tensor:
        """The packed VAE latent of the black control image (no pose), as the original builds it:
        preprocessed to [-1, 1], a VAE posterior sample, shifted and scaled, packed."""
        if image_size not in self._control:
            pipeline = self.pipeline
            vae = pipeline.vae
            black = Image.new("RGB", (image_size[1], image_size[0]))
            pixels = pipeline.image_processor.preprocess(black, height=image_size[0], width=image_size[1])
            pixels = pixels.to(device=get_module_execution_device(vae), dtype=vae.dtype)
            generator = torch.Generator(pixels.device).manual_seed(self.control_seed)
            with torch.no_grad():
                latent = vae.encode(pixels).latent_dist.sample(generator)
            latent = (latent - vae.config.shift_factor) * vae.config.scaling_factor
            self._control[image_size] = pack_latents(latent).to(self.device, self.dtype)
        return self._control[image_size]

    def infuse(self, inputs: dict, rows: list[int], image_size: tuple[int, int]) -> dict:
        """InfuseNet on ``rows`` of one transformer call: its residuals, zero on the other rows."""
        index = torch.tensor(rows, device=inputs["hidden_states"].device)
        count = len(rows)
        config = self.infusenet.config
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full([count], self.infusenet_guidance, device=index.device, dtype=torch.float32)
        tokens = self.identity_tokens.expand(count, -1, -1)
        blocks, singles = self.infusenet(
            hidden_states=inputs["hidden_states"][index],
            controlnet_cond=self.control_latents(image_size).expand(count, -1, -1),
            conditioning_scale=self.conditioning_scale,
            timestep=inputs["timestep"][index],
            guidance=guidance,
            pooled_projections=inputs["pooled_projections"][index],
            encoder_hidden_states=tokens,
            txt_ids=torch.zeros(tokens.shape[1], 3, device=index.device, dtype=tokens.dtype),
            img_ids=inputs["img_ids"],
            return_dict=False,
        )
        batch = inputs["hidden_states"].shape[0]

        def scatter(samples):
            if samples is None or count == batch:
                return samples
            out = []
            for sample in samples:
                full = sample.new_zeros((batch, *sample.shape[1:]))
                full[index] = sample
                out.append(full)
            return out

        return dict(
            controlnet_block_samples=scatter(blocks),
            controlnet_single_block_samples=scatter(singles),
            controlnet_blocks_repeat=self.infusenet.input_hint_block is not None,
        )

    def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size) -> torch.Tensor:
        """One FLUX call on the rows; InfuseNet residuals on PD rows (after injection) only."""
        inputs = self.family.model_inputs(self, latents, timestep, rows, image_size)
        identity_rows = [i for i, key in enumerate(row_keys) if key == PD]
        if identity_rows:
            if self.identity_tokens is None:
                raise RuntimeError("identity tokens were not prepared: call conditions() first")
            inputs.update(self.infuse(inputs, identity_rows, image_size))
        return self.denoiser(**inputs)[0]
