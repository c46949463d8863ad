"""PhotoMaker (Li et al., CVPR 2024) on SDXL: the stacked-ID-embedding backend of Tables 1–2.

PhotoMaker personalizes SDXL by rewriting the prompt's text embedding. The user writes the
trigger word right after the class word ("a man img with black curly hair"); PhotoMaker

1. removes the trigger and repeats the class token once per reference image
   ("a man man man with …" for three photos) before the two CLIP text encoders run;
2. encodes each reference photo with a CLIP ViT-L/14 vision tower and two projections
   (768 + 1280 = 2048, the width of SDXL's concatenated text embedding);
3. fuses each class-token embedding with one image embedding through a small MLP module and
   writes the result back into the class-token positions (the *stacked ID embedding*);
4. denoises with the trigger-free prompt up to ``start_merge_step`` and with the fused
   prompt afterwards, on an SDXL UNet carrying PhotoMaker's LoRA.

This module re-implements the released v1 model (``photomaker-v1.bin`` of the Hub
repository ``TencentARC/PhotoMaker``) so that the released checkpoint loads with strict key
matching, and maps the original pipeline onto FreeCure's backend protocol:

* FD is exactly what the original pipeline denoises with before ``start_merge_step``: the
  prompt with the trigger word removed, the class token *not* repeated, no identity, on the
  same LoRA-carrying UNet;
* PD is the fused prompt, used from step ``start_merge_step + 1`` on (the original switches
  with ``if i <= start_merge_step: text-only``), which is the backend's injection step;
* ``start_merge_step = min(int(style_strength / 100 × T), 30)``, style strength 20 % by
  default, as in the released demo and notebook.

PhotoMaker v2 (:mod:`freecure.backends.photomaker_v2`) keeps this prompt handling with two
class tokens per image and adds ArcFace embeddings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from ...core import checkpoints
from ...core.attributes import ParsedPrompt
from ...core.conditioning import TextConditioning
from ...core.errors import InputError, WeightsNotFoundError, shorten
from ...core.options import Option, finite_float
from ..base import Backend
from .id_encoder import (
    SDXL_TEXT_DIMS,
    PhotoMakerIDEncoder,
    clip_image_processor,
    tiny_vision_config,
    vit_l14_config,
)
from .v2 import ArcFaceEmbedder, PhotoMakerV2IDEncoder, RandomFaceEmbedder

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_STYLE_STRENGTH = 20.0
#: The released demo caps ``start_merge_step`` at 30 whatever the step count.
MAX_START_MERGE_STEP = 30
TRIGGER_WORD = "img"
LORA_ADAPTER_NAME = "photomaker"


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """Where a released PhotoMaker checkpoint lives on the Hugging Face Hub."""

    repo_id: str
    filename: str
    size: str
    license: str


CHECKPOINTS = {
    "v1": ReleasedCheckpoint("TencentARC/PhotoMaker", "photomaker-v1.bin", "≈0.93 GB", "Apache-2.0"),
    "v2": ReleasedCheckpoint("TencentARC/PhotoMaker-V2", "photomaker-v2.bin", "≈1.4 GB (estimated)", "Apache-2.0"),
}

# --------------------------------------------------------------------------- configuration

#: CLIP ViT-L/14 at 224 px (OpenAI CLIP), the vision tower of PhotoMaker's ID encoder.
#: Every value is written out so that the config never has to be downloaded.

# The ID encoder and its configs live in photomaker_id (shared with photomaker_v2).


# --------------------------------------------------------------------------- checkpoints

HOW_TO_SUPPLY = (
    "Allow the download from the Hugging Face Hub (network access, HF_HUB_OFFLINE unset), or "
    "download the file yourself and pass it with --photomaker-weights PATH "
    "(PhotoMakerBackend.from_pretrained(weights=PATH)). To try the machinery offline, run with --tiny."
)


def resolve_checkpoint(weights: str | os.PathLike | None = None, version: str = "v1") -> Path:
    """The local path of the PhotoMaker checkpoint: ``weights`` if given (a file, or a folder
    holding the released file name), else the released file from the Hub (cached by
    ``huggingface_hub``; with ``HF_HUB_OFFLINE=1`` only the cache is read, and a miss fails
    at once).

    Raises:
        WeightsNotFoundError: the file is missing or cannot be downloaded.
    """
    release = _release(version)
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            path = path / release.filename
        if not path.is_file():
            raise WeightsNotFoundError(f"PhotoMaker {version} checkpoint {path} does not exist. {HOW_TO_SUPPLY}")
        return path
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=release.repo_id, filename=release.filename))
    except Exception as error:  # offline, no network, gated, disk full …: one clear message
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set and the file is not in the local Hugging Face cache"
        else:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise WeightsNotFoundError(
            f"could not get {release.filename} from the Hub repository {release.repo_id} "
            f"({release.size}): {reason}. {HOW_TO_SUPPLY}"
        ) from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read a PhotoMaker checkpoint into ``{"id_encoder": {...}, "lora_weights": {...}}``.

    ``.bin``/``.pt`` files are read with ``torch.load(weights_only=True)``; ``.safetensors``
    files hold the same tensors under the prefixes ``id_encoder.`` and ``lora_weights.``.
    """
    path = Path(path)
    state = checkpoints.read_tensors(path, "the PhotoMaker checkpoint", hint=HOW_TO_SUPPLY, nested=True)
    if path.suffix == ".safetensors":
        flat, state = state, {"id_encoder": {}, "lora_weights": {}}
        for key, tensor in flat.items():
            part, _, name = key.partition(".")
            if part in state:
                state[part][name] = tensor
    if not isinstance(state, Mapping) or set(state) != {"id_encoder", "lora_weights"}:
        found = ", ".join(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
        raise WeightsNotFoundError(
            f"{path} is not a PhotoMaker checkpoint: it must hold exactly 'id_encoder' and "
            f"'lora_weights', but holds {found or 'nothing'}"
        )
    return {"id_encoder": dict(state["id_encoder"]), "lora_weights": dict(state["lora_weights"])}


#: A buffer that transformers < 4.31 saved with CLIP; it is arange(257), not a weight.
_LEGACY_BUFFERS = ("vision_model.embeddings.position_ids",)


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict key and shape matching, with a message naming what differs.

    Raises:
        WeightsNotFoundError: a key is missing or unexpected, or a shape differs.
    """
    given = {key: value for key, value in state_dict.items() if key not in _LEGACY_BUFFERS}
    checkpoints.check_state_dict(
        module,
        given,
        f"the checkpoint does not match {what}",
        hint="Is it the right PhotoMaker version (--photomaker-version v1 or v2)?",
    )


def load_id_encoder_weights(encoder: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load ``state_dict`` into ``encoder`` with strict key and shape matching. An encoder on
    the meta device takes the checkpoint's tensors as they are (``assign=True``)."""
    check_state_dict(encoder, state_dict, f"the {type(encoder).__name__}")
    state_dict = {key: value for key, value in state_dict.items() if key not in _LEGACY_BUFFERS}
    on_meta = any(p.is_meta for p in encoder.parameters())
    encoder.load_state_dict(state_dict, strict=True, assign=on_meta)
    if on_meta:
        _materialize_buffers(encoder)
    return encoder


def _materialize_buffers(module: nn.Module) -> None:
    """Rebuild the non-persistent buffers a meta-device module still holds on ``meta``
    (CLIP's ``position_ids = arange(positions)``); they are not in any checkpoint."""
    for owner in module.modules():
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if name != "position_ids":
                raise RuntimeError(f"cannot rebuild the meta buffer {name!r} of {type(owner).__name__}")
            positions = torch.arange(buffer.shape[-1]).expand(buffer.shape)
            owner.register_buffer(name, positions, persistent=False)


def load_lora(pipeline, lora_weights: Mapping[str, torch.Tensor], fuse: bool = True) -> int:
    """Load PhotoMaker's LoRA into the pipeline with diffusers' ``load_lora_weights``
    (adapter ``"photomaker"``, needs ``peft``), then fuse it as the released demo does
    (``pipe.fuse_lora()``) or keep it as a switchable adapter.

    Returns:
        The number of layers that received a LoRA.

    Raises:
        WeightsNotFoundError: the LoRA does not fit the pipeline's UNet.
    """
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise InputError("loading PhotoMaker's LoRA needs peft (and transformers): `pip install peft`")
    if not lora_weights:
        raise WeightsNotFoundError("the PhotoMaker checkpoint's 'lora_weights' part is empty")
    try:
        pipeline.load_lora_weights(dict(lora_weights), adapter_name=LORA_ADAPTER_NAME)
    except (ValueError, KeyError, RuntimeError) as error:
        raise WeightsNotFoundError(
            f"PhotoMaker's LoRA does not fit this base model ({error}); PhotoMaker needs an SDXL UNet"
        ) from None
    layers = sum(1 for module in pipeline.unet.modules() if LORA_ADAPTER_NAME in getattr(module, "lora_A", {}))
    pairs = sum(1 for key in lora_weights if key.endswith(("down.weight", "lora_A.weight")))
    unet_pairs = sum(
        1 for key in lora_weights if key.startswith("unet.") and key.endswith(("down.weight", "lora_A.weight"))
    )
    if layers == 0 or (unet_pairs == pairs and layers != pairs):
        raise WeightsNotFoundError(
            f"PhotoMaker's LoRA has {pairs} layers but {layers} UNet layers received one; "
            "the base model must be an SDXL UNet"
        )
    if fuse:
        pipeline.fuse_lora(adapter_names=[LORA_ADAPTER_NAME])
    return layers


def photomaker_lora_state_dict(unet, rank: int = 4, std: float = 0.02, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA for ``unet`` in the released checkpoint's key format
    (``unet.<attention>.processor.to_q_lora.down.weight`` … for q, k, v and out of every
    attention layer): what ``--tiny`` loads to exercise the real LoRA path."""
    from diffusers.models.attention_processor import Attention

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        for proj, linear in (
            ("to_q", module.to_q),
            ("to_k", module.to_k),
            ("to_v", module.to_v),
            ("to_out", module.to_out[0]),
        ):
            prefix = f"unet.{name}.processor.{proj}_lora"
            state[f"{prefix}.down.weight"] = torch.randn(rank, linear.in_features, generator=generator) * std
            state[f"{prefix}.up.weight"] = torch.randn(linear.out_features, rank, generator=generator) * std
    return state


def _release(version: str) -> ReleasedCheckpoint:
    if version not in CHECKPOINTS:
        raise InputError(f"unknown PhotoMaker version {version!r}; choose one of {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[version]


# --------------------------------------------------------------------------- prompt handling


def start_merge_step(style_strength: float, num_inference_steps: int) -> int:
    """PhotoMaker's delayed identity merge: ``min(int(style_strength / 100 × T), 30)``.

    The original pipeline denoises with the trigger-free prompt while ``i <= start_merge_step``
    and with the fused prompt afterwards.
    """
    if not 0.0 <= style_strength <= 100.0:
        raise InputError(f"style strength is a percentage in [0, 100], got {style_strength}")
    return min(int(float(style_strength) / 100 * num_inference_steps), MAX_START_MERGE_STEP)


def expand_class_token(
    ids: Sequence[int], class_column: int, copies: int, max_length: int, pad_id: int
) -> tuple[list[int], list[bool]]:
    """PhotoMaker's prompt expansion on token ids (trigger already removed).

    The class token at ``class_column`` is repeated ``copies`` times in place, the ids are cut
    or padded to ``max_length``, and the mask marks the copies.

    Returns:
        The expanded ids and the class-token mask, both of length ``max_length``.
    """
    if not 0 <= class_column < len(ids):
        raise ValueError(f"class token column {class_column} is outside the {len(ids)} prompt tokens")
    if class_column + copies > max_length:
        raise InputError(
            f"the class word sits at token {class_column}: its {copies} copies do not fit the "
            f"text encoder's {max_length} tokens; shorten the prompt before the class word"
        )
    expanded = list(ids[:class_column]) + [ids[class_column]] * copies + list(ids[class_column + 1 :])
    expanded = expanded[:max_length] + [pad_id] * (max_length - len(expanded))
    mask = [class_column <= i < class_column + copies for i in range(max_length)]
    return expanded, mask


# --------------------------------------------------------------------------- the backend


class PhotoMakerBackend(Backend):
    """PhotoMaker on an SDXL pipeline: FD = trigger-free prompt, PD = stacked ID embedding
    from step ``start_merge_step + 1`` on.

    Args:
        pipeline: a diffusers SDXL pipeline; PhotoMaker's LoRA must already be in its UNet
            (:meth:`from_pretrained` does all loading).
        id_encoder: a :class:`PhotoMakerIDEncoder` (or the v2 encoder) with loaded weights.
        style_strength: PhotoMaker's style strength in percent (default 20).
        face_embedder: v2 only: images → ArcFace embeddings (n, 512), one per image with a
            face (:class:`freecure.backends.photomaker_v2.ArcFaceEmbedder`).
        version: ``"v1"`` or ``"v2"`` (reported in the run's settings).
        offload: keep the ID encoder on the CPU between uses (with
            ``pipeline.enable_model_cpu_offload()``).
    """

    name = "photomaker"
    prompt_identity = "last"
    default_trigger = TRIGGER_WORD
    families = ("sdxl",)
    license = (
        "PhotoMaker v1 weights: Apache-2.0 (TencentARC/PhotoMaker model card); the base model's "
        "licence applies too (SDXL base 1.0: CreativeML Open RAIL++-M)"
    )
    default_guidance_scale = 5.0  # the original's default

    def __init__(
        self,
        pipeline,
        id_encoder: PhotoMakerIDEncoder,
        style_strength: float = DEFAULT_STYLE_STRENGTH,
        face_embedder=None,
        version: str = "v1",
        offload: bool = False,
    ):
        super().__init__(pipeline)
        if getattr(pipeline, "text_encoder_2", None) is None:
            raise InputError("PhotoMaker needs an SDXL pipeline (two text encoders)")
        dims = (pipeline.text_encoder.config.hidden_size, pipeline.text_encoder_2.config.hidden_size)
        if tuple(id_encoder.text_dims) != dims:
            raise InputError(
                f"the ID encoder was built for text widths {id_encoder.text_dims}, the pipeline has {dims}"
            )
        start_merge_step(style_strength, 1)  # validates the percentage
        if id_encoder.needs_face_embeddings and face_embedder is None:
            raise InputError("PhotoMaker v2 needs a face embedder (ArcFace) for its ID encoder")
        self.id_encoder = id_encoder.eval().requires_grad_(False)
        if version == "v2":
            self.license = V2_LICENSE
        self.style_strength = style_strength
        self.face_embedder = face_embedder
        self.version = version
        self.offload = offload
        self.image_processor = clip_image_processor(id_encoder.vision_config.image_size)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_model: str = DEFAULT_BASE_MODEL,
        weights: str | os.PathLike | None = None,
        version: str = "v1",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        style_strength: float = DEFAULT_STYLE_STRENGTH,
        fuse_lora: bool = True,
        cpu_offload: bool = False,
        **pipeline_kwargs,
    ) -> PhotoMakerBackend:
        """Load an SDXL base model and the released PhotoMaker checkpoint.

        Args:
            base_model: Hub id or folder of any SDXL-family pipeline.
            weights: the checkpoint file or folder; None downloads it from the Hub.
            version: ``"v1"`` (``TencentARC/PhotoMaker``) or ``"v2"`` (``TencentARC/PhotoMaker-V2``,
                needs insightface, whose models are for non-commercial research only).
            device, dtype: default CUDA + float16 when available, else CPU + float32.
            fuse_lora: fuse the LoRA into the UNet (as the released demo) or keep it switchable.
            cpu_offload: ``enable_model_cpu_offload`` on the pipeline.
            pipeline_kwargs: passed to the pipeline's ``from_pretrained`` (``variant``, ``revision`` …).
        """
        from ...core.runtime import load_base_pipeline, resolve_device, resolve_dtype

        device = resolve_device(str(device) if device is not None else None)
        dtype = dtype or resolve_dtype(None, device)
        if device.type == "cpu":
            logger.warning(
                "PhotoMaker runs SDXL (a 2.6 B-parameter UNet) on the CPU in float32: expect a long run per image. "
                "Use a CUDA GPU, or --tiny to try the machinery offline."
            )
        face_embedder = _face_embedder(version, device)
        state = load_checkpoint(resolve_checkpoint(weights, version))
        encoder = build_id_encoder(version, meta=True)
        load_id_encoder_weights(encoder, state["id_encoder"])
        if base_model == DEFAULT_BASE_MODEL and dtype != torch.float32:
            pipeline_kwargs.setdefault("variant", "fp16")  # the half-size files of the release
        load_device = torch.device("cpu") if cpu_offload else device
        pipeline = load_base_pipeline(base_model, load_device, dtype, sdxl=True, **pipeline_kwargs)
        load_lora(pipeline, state["lora_weights"], fuse=fuse_lora)
        del state
        encoder.to(device="cpu" if cpu_offload else device, dtype=dtype)
        if cpu_offload:
            pipeline.enable_model_cpu_offload(device=device)
        return cls(pipeline, encoder, style_strength, face_embedder, version, offload=cpu_offload)

    @classmethod
    def build_tiny(
        cls,
        version: str = "v1",
        style_strength: float = DEFAULT_STYLE_STRENGTH,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> PhotoMakerBackend:
        """Tiny random components, offline: the tiny SDXL pipeline with a random LoRA in the
        released key format, and a tiny-config ID encoder with random weights."""
        from ...families.tiny import tiny_sdxl_pipeline

        pipeline = tiny_sdxl_pipeline(seed=seed)
        load_lora(pipeline, photomaker_lora_state_dict(pipeline.unet, seed=seed), fuse=True)
        dims = (pipeline.text_encoder.config.hidden_size, pipeline.text_encoder_2.config.hidden_size)
        torch.manual_seed(seed)
        encoder = build_id_encoder(version, text_dims=dims, tiny=True)
        face_embedder = None
        if version == "v2":
            logger.warning(_V2_LICENCE_NOTE + " (--tiny uses a random stand-in instead)")
            face_embedder = RandomFaceEmbedder()
        pipeline.to(device)
        encoder.to(device)
        return cls(pipeline, encoder, style_strength, face_embedder, version)

    options = (
        Option(
            "--photomaker-version",
            choices=tuple(sorted(CHECKPOINTS)),
            default="v1",
            help="photomaker: v1 (TencentARC/PhotoMaker, the paper's baseline) or v2 "
            "(TencentARC/PhotoMaker-V2; needs insightface, whose face models are licensed for "
            "NON-COMMERCIAL research only)",
        ),
        Option(
            "--photomaker-weights",
            metavar="PATH",
            help="photomaker: local photomaker-v1.bin / photomaker-v2.bin (or its folder); "
            "default: download from the Hub",
            unread=lambda args: "--tiny builds random PhotoMaker weights" if args.tiny else None,
        ),
        Option(
            "--photomaker-style-strength",
            type=finite_float(0.0, 100.0),
            default=DEFAULT_STYLE_STRENGTH,
            metavar="PERCENT",
            help="photomaker: style strength; identity is merged after step "
            "min(int(PERCENT/100 × steps), 30) (default 20)",
        ),
        Option(
            "--photomaker-lora",
            choices=("fused", "adapter"),
            default="fused",
            help="photomaker: fuse the LoRA into the UNet (default, as the released demo) or keep "
            "it as a switchable diffusers adapter named 'photomaker'",
        ),
        Option(
            "--photomaker-cpu-offload",
            flag_only=True,
            help="photomaker: enable_model_cpu_offload (less GPU memory, slower)",
        ),
    )

    @classmethod
    def from_options(cls, args) -> PhotoMakerBackend:
        if args.tiny:
            return cls.build_tiny(args.photomaker_version, args.photomaker_style_strength, device=args.device)
        args.base_model = args.base_model or DEFAULT_BASE_MODEL  # recorded in the run's manifest
        return cls.from_pretrained(
            args.base_model,
            weights=args.photomaker_weights,
            version=args.photomaker_version,
            device=args.device,
            dtype=args.dtype,
            style_strength=args.photomaker_style_strength,
            fuse_lora=args.photomaker_lora == "fused",
            cpu_offload=args.photomaker_cpu_offload,
        )

    # -- conditioning ---------------------------------------------------------------
    def injection_step(self, num_inference_steps: int) -> int:
        """The first step that uses the fused prompt: ``start_merge_step + 1``."""
        step = start_merge_step(self.style_strength, num_inference_steps) + 1
        if step >= num_inference_steps:
            raise InputError(
                f"with style strength {self.style_strength:g}% and {num_inference_steps} steps PhotoMaker "
                f"merges the identity after step {step - 1}, i.e. never; lower the style strength or "
                "use more steps"
            )
        return step

    def encode_expanded_prompt(
        self, prompt: str, class_column: int, copies: int
    ) -> tuple[TextConditioning, torch.Tensor]:
        """Encode ``prompt`` (trigger removed) with its class token repeated ``copies`` times,
        as the original's ``encode_prompt_with_trigger_word``: both CLIP encoders'
        penultimate hidden states, concatenated; the pooled embedding of the second.

        Returns:
            The conditioning (1, L, D) and the class-token mask (1, L).
        """
        pipeline, device = self.pipeline, self.device
        truncate = getattr(self.id_encoder, "truncate_before_expanding", False)
        hidden, pooled, mask, class_id = [], None, None, None
        for tokenizer, text_encoder in (
            (pipeline.tokenizer, pipeline.text_encoder),
            (pipeline.tokenizer_2, pipeline.text_encoder_2),
        ):
            max_length = tokenizer.model_max_length
            ids = tokenizer(prompt, truncation=truncate, max_length=max_length if truncate else None).input_ids
            if class_id is None:
                class_id = ids[class_column]
            elif ids[class_column] != class_id:
                raise InputError(f"the two SDXL tokenizers disagree on the class token of {shorten(prompt)!r}")
            ids, mask = expand_class_token(ids, class_column, copies, max_length, tokenizer.pad_token_id)
            output = text_encoder(torch.tensor([ids], device=device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]
        embeds = torch.cat(hidden, dim=-1)
        return TextConditioning(embeds, pooled), torch.tensor([mask], device=device)

    def pixel_values(self, references: Sequence[Image.Image]) -> torch.Tensor:
        """The reference photos in CLIP's preprocessing, (n, 3, 224, 224)."""
        return self.image_processor([image.convert("RGB") for image in references], return_tensors="pt").pixel_values

    def identity_conditions(
        self,
        parsed: ParsedPrompt,
        references: Sequence[Image.Image],
        fd: TextConditioning,
        num_inference_steps: int,
    ) -> tuple[TextConditioning, int]:
        if parsed.trigger is None:
            raise InputError(
                f"PhotoMaker needs its trigger word right after the class word, e.g. "
                f"'a {parsed.class_word} {TRIGGER_WORD} with black hair' with --trigger {TRIGGER_WORD}"
            )
        if not references:
            raise InputError("PhotoMaker needs at least one reference photo of the identity (--ref)")
        if not parsed.class_token_indices:
            raise InputError("the prompt was parsed without the pipeline's tokenizer; no class-token column")
        inject_step = self.injection_step(num_inference_steps)
        references = list(references)
        face_embeds = None
        if self.id_encoder.needs_face_embeddings:
            references, face_embeds = self.face_embedder.embed(references)
        copies = self.id_encoder.tokens_per_image * len(references)
        # The original repeats the token right before the trigger: the class word's last token.
        expanded, mask = self.encode_expanded_prompt(parsed.foundation_prompt, parsed.class_token_indices[-1], copies)
        encoder = self.id_encoder
        if self.offload:
            encoder.to(self.device)
        try:
            extra = () if face_embeds is None else (face_embeds,)
            fused = encoder(self.pixel_values(references), expanded.prompt_embeds, mask, *extra)
        finally:
            if self.offload:
                encoder.to("cpu")
        return TextConditioning(fused, expanded.pooled_prompt_embeds), inject_step


def build_id_encoder(
    version: str = "v1", text_dims: tuple[int, int] = SDXL_TEXT_DIMS, tiny: bool = False, meta: bool = False
) -> nn.Module:
    """An ID encoder of ``version`` with the release's config (or a tiny one), random
    weights; on the meta device (no memory) when ``meta`` — load weights with
    :func:`load_id_encoder_weights`."""
    _release(version)
    config = tiny_vision_config(text_dims[0]) if tiny else vit_l14_config()
    if version == "v2":
        encoder_cls = PhotoMakerV2IDEncoder
    else:
        encoder_cls = PhotoMakerIDEncoder
    if meta:
        with torch.device("meta"):
            return encoder_cls(config, text_dims)
    return encoder_cls(config, text_dims)


V2_LICENSE = (
    "PhotoMaker v2 weights: Apache-2.0 (TencentARC/PhotoMaker-V2 model card); its ArcFace embeddings come "
    "from insightface's buffalo_l models, licensed for NON-COMMERCIAL research only; the base model's "
    "licence applies too (SDXL base 1.0: CreativeML Open RAIL++-M)"
)

_V2_LICENCE_NOTE = (
    "PhotoMaker v2 uses insightface's face detection and ArcFace recognition models (buffalo_l); "
    "insightface's pretrained models are available for NON-COMMERCIAL research purposes only"
)


def _face_embedder(version: str, device: torch.device):
    if version != "v2":
        return None
    logger.warning(_V2_LICENCE_NOTE)
    return ArcFaceEmbedder(device=device)
