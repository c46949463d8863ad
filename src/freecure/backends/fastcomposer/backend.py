"""FastComposer (Xiao et al., IJCV 2024) as a FreeCure backend, on Stable Diffusion 1.5.

FastComposer augments the text embedding with an image embedding of the subject:

1. the prompt carries ``<|image|>`` right after the subject noun ("a man <|image|> with black
   hair"); the marker is removed from the token ids and the noun's last token is flagged;
2. the (fine-tuned) CLIP text encoder encodes the clean ids, CLIP ViT-L/14 encodes the
   reference photo (pooled output → visual projection, 768-d);
3. at each flagged token the post-fuse MLP replaces the text embedding e by
   ``LN(MLP₂(MLP₁([e; o]) + e))`` with o the image embedding (:class:`PostfuseModule`);
4. *delayed subject conditioning*: denoising steps ``i ≤ start_merge_step`` use the text-only
   prompt, later steps the fused one (the original ``start_merge_step``, 10 of 50 steps).

In FreeCure terms the fused embedding is PD's τ(c̃) and the injection step is
``start_merge_step + 1``. FD is the *same* fine-tuned UNet and text encoder on the text-only
prompt: that is exactly what the original runs before ``start_merge_step`` (its
``prompt_embeds_text_only`` come from the fine-tuned text encoder and its first steps from the
fine-tuned UNet), and it is the paper's FD, "the same model without identity" (§3.1), so FD
and PD share z_t up to the injection step.

The released checkpoint (Hub ``mit-han-lab/fastcomposer``, ``pytorch_model.bin``) is the
``state_dict()`` of the original ``FastComposerModel`` under diffusers 0.16 / transformers
4.25: ``text_encoder.*`` (CLIP text transformer without the ``text_model.`` prefix),
``image_encoder.vision_model.*`` and ``image_encoder.visual_projection.weight`` (CLIP
ViT-L/14), ``vae.*`` (diffusers 0.16 attention names ``query/key/value/proj_attn``),
``unet.*`` and ``postfuse_module.*``. :class:`ReleasedModel` renames the two legacy naming
differences, drops the two legacy ``position_ids`` buffers and loads the rest with strict key
and shape matching. Face-diffuser's subject-augmented model uses the same architecture and
checkpoint layout (its ``model.py`` is FastComposer's), so :mod:`.face_diffuser` reuses
everything here.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ...core import checkpoints
from ...core.attributes import ParsedPrompt
from ...core.conditioning import TextConditioning
from ...core.configs import SD15_TEXT as SD15_TEXT_CONFIG
from ...core.configs import SD15_UNET as SD15_UNET_CONFIG
from ...core.configs import SD15_VAE as SD15_VAE_CONFIG
from ...core.configs import SD_SCHEDULER
from ...core.configs import VIT_L14_VISION as VIT_L14_VISION_CONFIG
from ...core.errors import InputError, WeightsNotFoundError, shorten
from ...core.options import Option, non_negative_int, positive_int
from ..base import Backend
from ..common.layers import FuseModule

logger = logging.getLogger(__name__)

#: FastComposer's marker placed after the subject noun.
IMAGE_TOKEN = "<|image|>"
HUB_REPO_ID = "mit-han-lab/fastcomposer"
HUB_FILENAME = "pytorch_model.bin"
#: Where the tokenizer comes from when open-clip-torch is not installed.
SD15_REPO_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LICENSE = (
    "FastComposer code and checkpoint: MIT License (MIT HAN Lab, "
    "github.com/mit-han-lab/fastcomposer); the weights are fine-tuned from Stable Diffusion "
    "v1.5 and CLIP ViT-L/14, whose licences (CreativeML OpenRAIL-M use restrictions, OpenAI "
    "CLIP MIT) also apply"
)

# CLIP's image normalisation (OpenAI CLIP; FastComposer's `vision_processor`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ----------------------------------------------------------------------------- architectures
# Stable Diffusion v1.5 and CLIP ViT-L/14, as published (`unet/config.json`,
# `vae/config.json`, `text_encoder/config.json`, openai/clip-vit-large-patch14).
#: A tiny CLIP vision tower for offline runs: 2×2 patches of 14 pixels, 32-d like the tiny text encoder.
TINY_VISION_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    image_size=28,
    patch_size=14,
    hidden_act="quick_gelu",
    projection_dim=32,
)


def sd15_scheduler():
    """DDIM with Stable Diffusion v1.5's published noise schedule (the CLI may replace it)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULER)


def clip_vision_model(config: Mapping, device: str | torch.device | None = None):
    """CLIP vision tower + visual projection (``transformers.CLIPVisionModelWithProjection``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device(device or "cpu"):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).eval()


# ----------------------------------------------------------------------------- post-fuse MLP
class PostfuseModule(FuseModule):
    """FastComposer's post-fuse module: merges an image embedding into a text token embedding.

    ``e' = LN(MLP₂(MLP₁([e; o]) + e))`` with MLP₁: 2d → d (no residual), MLP₂: d → d (residual).

    Args:
        embed_dim: d, the text encoder's hidden size (768 for SD1.5); the image embedding has
            the same size (CLIP's visual projection).
    """

    def fuse(
        self, prompt_embeds: torch.Tensor, image_token_mask: torch.Tensor, object_embeds: torch.Tensor
    ) -> torch.Tensor:
        """``prompt_embeds`` (1, L, d) with the flagged tokens replaced by their fused embedding.

        Args:
            prompt_embeds: text encoder output for the clean token ids.
            image_token_mask: (1, L) booleans, one True per subject, in prompt order.
            object_embeds: (subjects, d) image embeddings, in the same order.
        """
        columns = image_token_mask[0].nonzero().flatten()
        if len(columns) != len(object_embeds):
            raise InputError(
                f"the prompt marks {len(columns)} subject(s) with {IMAGE_TOKEN} but "
                f"{len(object_embeds)} reference image embedding(s) were given"
            )
        fused = prompt_embeds.clone()
        fused[0, columns] = self(prompt_embeds[0, columns], object_embeds.to(prompt_embeds.dtype))
        return fused


# ----------------------------------------------------------------------------- <|image|> tokens
def tokenize_with_image_tokens(tokenizer, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``caption`` without its ``<|image|>`` markers, and the subject mask.

    As FastComposer's ``_tokenize_and_mask_noun_phrases_ends``: the marker is not a token the
    text encoder sees; the token right before each marker (the subject noun's last token) is
    flagged. Ids are padded to the tokenizer's context length with its pad token (truncated
    without a closing EOS when longer, like the original).

    Returns:
        ``input_ids`` (1, L) long and ``image_token_mask`` (1, L) bool.
    """
    chunks = caption.split(IMAGE_TOKEN)
    ids = [tokenizer.bos_token_id]
    flagged: list[int] = []
    for k, chunk in enumerate(chunks):
        ids += tokenizer(chunk, add_special_tokens=False)["input_ids"]
        if k < len(chunks) - 1:
            if len(ids) == 1 or (flagged and flagged[-1] == len(ids) - 1):
                raise InputError(
                    f"{IMAGE_TOKEN} must follow the subject's word, e.g. 'a man {IMAGE_TOKEN} "
                    f"with black hair'; in {caption!r} it follows no new word"
                )
            flagged.append(len(ids) - 1)
    ids.append(tokenizer.eos_token_id)
    length = tokenizer.model_max_length
    ids = (ids + [tokenizer.pad_token_id] * length)[:length]
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, [column for column in flagged if column < length]] = True
    return torch.tensor([ids], dtype=torch.long), mask


def subject_caption(parsed: ParsedPrompt, tokenizer) -> str:
    """The foundation prompt with ``<|image|>`` inserted after the subject's class word."""
    prompt = parsed.foundation_prompt
    if not parsed.class_token_indices:
        raise InputError("the prompt was parsed without a tokenizer: the class word's tokens are unknown")
    last = parsed.class_token_indices[-1]
    words = re.escape(parsed.class_word).replace(r"\ ", r"\s+")
    for match in re.finditer(rf"(?<![^\W_]){words}(?![^\W_])", prompt, flags=re.IGNORECASE):
        # BOS is column 0, so the class word's last token is column len(tokens up to it).
        if len(tokenizer(prompt[: match.end()], add_special_tokens=False)["input_ids"]) == last:
            return f"{prompt[: match.end()]} {IMAGE_TOKEN}{prompt[match.end() :]}"
    raise InputError(f"cannot locate the class word {parsed.class_word!r} at token {last} of {shorten(prompt)!r}")


# ----------------------------------------------------------------------------- reference images
def reference_pixels(image: Image.Image, object_resolution: int = 224, image_size: int = 224) -> torch.Tensor:
    """A reference photo as FastComposer's CLIP image encoder sees it, shape (3, S, S).

    The original's test-time object transform, then its encoder's own resize and normalise:
    pad to square with black (``PadToSquare``), resize to ``object_resolution`` (bilinear,
    antialiased, rounded back to 8 bits as torchvision does for uint8 images), scale to
    [0, 1], resize to the encoder's ``image_size`` if different, normalise with CLIP's
    mean and std.
    """
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)
    _, h, w = x.shape
    if h > w:
        pad = (h - w) // 2
        x = F.pad(x, (pad, pad, 0, 0))
    elif w > h:
        pad = (w - h) // 2
        x = F.pad(x, (0, 0, pad, pad))
    size = (object_resolution, object_resolution)
    x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    x = x.round().clamp(0, 255) / 255.0
    if object_resolution != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


# ----------------------------------------------------------------------------- checkpoints
_VAE_ATTENTION = re.compile(r"^(vae\.(?:encoder|decoder)\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_VAE_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_CURRENT = re.compile(r"^(vae\.(?:encoder|decoder)\.mid_block\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\.")
_VAE_LEGACY = {new: old for old, new in _VAE_RENAMES.items()}
#: Buffers that transformers 4.25 saved and current versions no longer do.
LEGACY_BUFFERS = ("text_encoder.embeddings.position_ids", "image_encoder.vision_model.embeddings.position_ids")


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(size) for size in tensor.shape)


class ReleasedModel(nn.Module):
    """Modules named as in an original training script's model, loadable from its checkpoint.

    Children are whichever of ``text_encoder``, ``image_encoder``, ``vae``, ``unet`` and
    ``postfuse_module`` the original model had. The checkpoint's names map onto them with two
    renames only: the text encoder's keys gain ``text_model.`` where transformers keeps that
    prefix, and the VAE's diffusers-0.16 attention names become the current ones.
    """

    @property
    def _text_prefix(self) -> str:
        return "text_model." if hasattr(self.text_encoder, "text_model") else ""

    def released_name(self, name: str) -> str:
        """The checkpoint's name of one of this module's state-dict keys."""
        prefix = "text_encoder." + self._text_prefix
        if name.startswith(prefix):
            name = "text_encoder." + name[len(prefix) :]
        return _VAE_CURRENT.sub(lambda m: m.group(1) + _VAE_LEGACY[m.group(2)] + ".", name)

    def module_name(self, name: str) -> str:
        """This module's name of one checkpoint key (the inverse of :meth:`released_name`)."""
        if name.startswith("text_encoder.") and self._text_prefix and not name.startswith("text_encoder.text_model."):
            name = "text_encoder." + self._text_prefix + name[len("text_encoder.") :]
        return _VAE_ATTENTION.sub(lambda m: m.group(1) + _VAE_RENAMES[m.group(2)] + ".", name)

    def released_layout(self) -> dict[str, tuple[int, ...]]:
        """The checkpoint keys and shapes this module expects (legacy buffers excluded)."""
        return {self.released_name(name): _shape(value) for name, value in self.state_dict().items()}

    def load_released(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load an original checkpoint with strict key and shape matching.

        Works on a model built on the meta device too (parameters are assigned, not copied).

        Raises:
            WeightsNotFoundError: keys are missing or unexpected, or shapes differ; the message
                names them as the checkpoint does.
        """
        state = dict(state_dict)
        for name in LEGACY_BUFFERS:
            buffer = state.pop(name, None)
            if buffer is not None and not buffer.is_meta:
                expected = torch.arange(buffer.shape[-1]).expand(buffer.shape)
                if not torch.equal(buffer.long(), expected):
                    raise WeightsNotFoundError(
                        f"{source}: {name} is not 0, 1, 2, …: is it a FastComposer-style checkpoint?"
                    )
        converted = {self.module_name(name): value for name, value in state.items()}
        checkpoints.check_state_dict(
            self,
            converted,
            f"{source} does not match {type(self).__name__}",
            hint="Is it the released checkpoint of this backend (see docs/backends/)?",
            display=self.released_name,
        )
        self.load_state_dict(converted, strict=True, assign=True)
        _materialize_position_ids(self)
        self.eval()


def _materialize_position_ids(model: nn.Module) -> None:
    """Create CLIP's non-persistent ``position_ids`` buffers left on the meta device."""
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is None or not buffer.is_meta:
                continue
            if name != "position_ids":
                raise RuntimeError(f"buffer {name!r} of {type(module).__name__} was not loaded")
            device = next((p.device for p in module.parameters() if not p.is_meta), torch.device("cpu"))
            value = torch.arange(buffer.shape[-1], device=device).expand(buffer.shape)
            module.register_buffer(name, value, persistent=False)


class FastComposerModel(ReleasedModel):
    """The modules of FastComposer's checkpoint (the original ``FastComposerModel``).

    Args:
        text_encoder: ``transformers.CLIPTextModel`` (fine-tuned).
        image_encoder: ``transformers.CLIPVisionModelWithProjection`` (CLIP ViT-L/14).
        vae: ``diffusers.AutoencoderKL``.
        unet: ``diffusers.UNet2DConditionModel`` (fine-tuned).
        postfuse_module: :class:`PostfuseModule`.
    """

    def __init__(self, text_encoder, image_encoder, vae, unet, postfuse_module: PostfuseModule):
        super().__init__()
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.vae = vae
        self.unet = unet
        self.postfuse_module = postfuse_module

    @classmethod
    def sd15(cls, device: str | torch.device = "meta") -> FastComposerModel:
        """The full-size architecture (SD1.5 + CLIP ViT-L/14), on the meta device by default."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device(device):
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
            vae = AutoencoderKL(**SD15_VAE_CONFIG)
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
            postfuse = PostfuseModule(SD15_TEXT_CONFIG["hidden_size"])
        return cls(text_encoder, clip_vision_model(VIT_L14_VISION_CONFIG, device), vae, unet, postfuse)

    @classmethod
    def tiny(cls, seed: int = 0) -> FastComposerModel:
        """Tiny random components (``freecure.tiny`` sizes plus :data:`TINY_VISION_CONFIG`)."""
        from ...families.tiny import build_tiny_sd15_components

        parts = build_tiny_sd15_components(seed)
        torch.manual_seed(seed)
        image_encoder = clip_vision_model(TINY_VISION_CONFIG)
        postfuse = PostfuseModule(parts["text_encoder"].config.hidden_size)
        return cls(parts["text_encoder"], image_encoder, parts["vae"], parts["unet"], postfuse)

    def to_pipeline(self, tokenizer, scheduler=None, unet=None):
        """A diffusers SD1.5 pipeline of this model's text encoder, VAE and UNet (or ``unet``)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=tokenizer,
            unet=self.unet if unet is None else unet,
            scheduler=scheduler or sd15_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: ``.safetensors``, or a ``torch.save`` file read with
    ``weights_only=True`` (see :func:`freecure.checkpoints.read_tensors`).

    Raises:
        WeightsNotFoundError: the file cannot be read as a state dict of tensors.
    """
    return checkpoints.read_tensors(path, "a PyTorch checkpoint")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_checkpoint(given: str | os.PathLike | None, repo_id: str, filename: str, what: str, option: str) -> Path:
    """The checkpoint file: ``given`` (a file, or a folder holding ``filename`` or its base
    name), else the Hub file ``repo_id/filename`` (from the local cache when HF_HUB_OFFLINE=1).

    Raises:
        WeightsNotFoundError: the file is not there; the message says how to supply it.
    """
    how = (
        f"Pass a local copy with {option} PATH (the file or its folder), allow the download from "
        f"the Hugging Face Hub ({repo_id}, unset HF_HUB_OFFLINE), or run offline with --tiny."
    )
    if given is not None:
        path = Path(given).expanduser()
        if path.is_dir():
            for candidate in (path / filename, path / Path(filename).name):
                if candidate.is_file():
                    return candidate
            raise WeightsNotFoundError(f"{what}: no {filename} in the folder {path}. {how}")
        if not path.is_file():
            raise WeightsNotFoundError(f"{what}: {path} does not exist. {how}")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError  # .errors only from 0.25

    offline = _hub_offline()
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else str(error).splitlines()[0]
        raise WeightsNotFoundError(
            f"{what} checkpoint {repo_id}/{filename} is not available ({reason}). {how}"
        ) from None


def sd15_tokenizer(base_model: str | None = None):
    """SD1.5's CLIP tokenizer: built offline from open-clip-torch when installed, else the
    ``tokenizer`` folder of ``base_model`` (default :data:`SD15_REPO_ID`)."""
    from ...core.tokenization import load_clip_tokenizer

    try:
        return load_clip_tokenizer()
    except WeightsNotFoundError as offline_error:
        from transformers import CLIPTokenizer

        source = base_model or SD15_REPO_ID
        try:
            return CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        except (OSError, ValueError) as error:
            raise WeightsNotFoundError(
                f"no CLIP tokenizer: {offline_error}; and {source}/tokenizer could not be loaded "
                f"({str(error).splitlines()[0]}). Install open-clip-torch or allow the download."
            ) from None


def tiny_tokenizer():
    """The offline CLIP tokenizer of the tiny pipelines."""
    from ...core.tokenization import load_clip_tokenizer

    return load_clip_tokenizer()


# ----------------------------------------------------------------------------- backends
def scaled_step(step_at_50: int, num_inference_steps: int) -> int:
    """A step index given for the originals' 50 steps, scaled to T steps (round half up)."""
    return (step_at_50 * num_inference_steps + 25) // 50


class ImageAugmentedBackend(Backend):
    """Shared by FastComposer and Face-diffuser: PD's text embedding augmented with the image
    embedding of one reference photo at the subject's class word.

    Args:
        pipeline: an SD1.5 pipeline whose text encoder is the personalized model's.
        image_encoder: ``CLIPVisionModelWithProjection``.
        postfuse: :class:`PostfuseModule`.
        object_resolution: size the reference is resized to before the encoder's own resize.
    """

    def __init__(self, pipeline, image_encoder, postfuse: PostfuseModule, object_resolution: int = 224):
        super().__init__(pipeline)
        self.image_encoder = image_encoder
        self.postfuse = postfuse
        self.object_resolution = object_resolution

    @torch.no_grad()
    def object_embeddings(self, references: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP image embeddings of the references, shape (n, d)."""
        parameter = next(self.image_encoder.parameters())
        size = self.image_encoder.config.image_size
        pixels = torch.stack([reference_pixels(image, self.object_resolution, size) for image in references])
        return self.image_encoder(pixel_values=pixels.to(parameter)).image_embeds

    @torch.no_grad()
    def encode_augmented(self, caption: str, references: Sequence[Image.Image]) -> TextConditioning:
        """The image-augmented text embedding of a caption with one ``<|image|>`` per reference."""
        input_ids, mask = tokenize_with_image_tokens(self.tokenizer, caption)
        if int(mask.sum()) != len(references):
            raise InputError(
                f"{caption!r} marks {int(mask.sum())} subject(s) with {IMAGE_TOKEN}, but "
                f"{len(references)} reference image(s) were given"
            )
        text_encoder = self.pipeline.text_encoder
        embeds = text_encoder(input_ids.to(self.device))[0]
        objects = self.object_embeddings(references).to(embeds)
        return TextConditioning(self.postfuse.fuse(embeds, mask.to(self.device), objects))

    def augmented_conditioning(self, parsed: ParsedPrompt, references: Sequence[Image.Image]) -> TextConditioning:
        """PD's embedding: ``<|image|>`` after the class word, one reference photo."""
        if len(references) != 1:
            raise InputError(
                f"the {self.name} backend takes exactly one reference photo of the subject "
                f"(--ref), got {len(references)}"
            )
        caption = subject_caption(parsed, self.tokenizer)
        logger.info("%s caption: %s", self.name, caption)
        return self.encode_augmented(caption, references)


class FastComposerBackend(ImageAugmentedBackend):
    """FastComposer on SD1.5: FD = text-only prompt, PD = image-augmented prompt from
    ``start_merge_step + 1`` on (delayed subject conditioning), one fine-tuned UNet for both.

    Args:
        pipeline: SD1.5 pipeline holding FastComposer's fine-tuned text encoder and UNet.
        image_encoder, postfuse: FastComposer's image encoder and post-fuse module.
        start_merge_step: last text-only step; None scales the original's 10 of 50 steps to
            the run's step count (round half up).
        object_resolution: reference resize before the encoder (the original's 224).
    """

    name = "fastcomposer"
    prompt_identity = "last"
    families = ("sd15",)
    license = LICENSE
    default_guidance_scale = 5.0  # the original's default

    def __init__(
        self, pipeline, image_encoder, postfuse, start_merge_step: int | None = None, object_resolution: int = 224
    ):
        super().__init__(pipeline, image_encoder, postfuse, object_resolution)
        self.start_merge_step = start_merge_step

    options = (
        Option(
            "--fastcomposer-checkpoint",
            metavar="PATH",
            help="fastcomposer: pytorch_model.bin of mit-han-lab/fastcomposer (file or folder); "
            "default: download from the Hub. With --tiny: a checkpoint of the tiny architecture",
        ),
        Option(
            "--fastcomposer-start-merge-step",
            type=non_negative_int,
            metavar="N",
            help="fastcomposer: last text-only step (default: 10 at 50 steps, scaled to --steps)",
        ),
        Option(
            "--fastcomposer-object-resolution",
            type=positive_int,
            default=224,
            metavar="PIXELS",
            help="fastcomposer: reference resize before the image encoder (default 224)",
        ),
    )

    @classmethod
    def from_options(cls, args) -> FastComposerBackend:
        return cls.from_pretrained(
            args.fastcomposer_checkpoint,
            device=args.device,
            dtype=args.dtype,
            tiny=args.tiny,
            base_model=args.base_model,
            start_merge_step=args.fastcomposer_start_merge_step,
            object_resolution=args.fastcomposer_object_resolution,
        )

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        tiny: bool = False,
        base_model: str | None = None,
        start_merge_step: int | None = None,
        object_resolution: int = 224,
    ) -> FastComposerBackend:
        """FastComposer with its released weights.

        Args:
            checkpoint: ``pytorch_model.bin`` (or its folder); None downloads it from
                :data:`HUB_REPO_ID` (only the local cache is read when HF_HUB_OFFLINE=1).
            device, dtype: default CUDA + float16 when available, else CPU + float32.
            tiny: tiny random components instead (offline); with ``checkpoint``, a checkpoint
                of the tiny architecture is loaded into them.
            base_model: where the tokenizer comes from when open-clip-torch is not installed.
            start_merge_step, object_resolution: see the class.
        """
        from ...core.runtime import resolve_device, resolve_dtype

        device = resolve_device(device if device is None else str(device))
        dtype = torch.float32 if tiny else (dtype or resolve_dtype(None, device))
        model = FastComposerModel.tiny() if tiny else FastComposerModel.sd15(device="meta")
        if checkpoint is not None or not tiny:
            option = "--fastcomposer-checkpoint"
            path = resolve_checkpoint(checkpoint, HUB_REPO_ID, HUB_FILENAME, "FastComposer", option)
            model.load_released(read_checkpoint(path), source=str(path))
        model.to(device=device, dtype=dtype)
        pipeline = model.to_pipeline(tiny_tokenizer() if tiny else sd15_tokenizer(base_model))
        return cls(
            pipeline,
            model.image_encoder,
            model.postfuse_module,
            start_merge_step=start_merge_step,
            object_resolution=object_resolution,
        )

    def injection_step(self, num_inference_steps: int) -> int:
        """First fused step: ``start_merge_step + 1`` (the original's ``i <= start_merge_step``)."""
        last_text_only = (
            scaled_step(10, num_inference_steps) if self.start_merge_step is None else self.start_merge_step
        )
        if not 0 <= last_text_only <= num_inference_steps - 2:
            raise InputError(
                f"fastcomposer: start_merge_step {last_text_only} must lie in 0..{num_inference_steps - 2} "
                f"for {num_inference_steps} steps"
            )
        return last_text_only + 1

    def identity_conditions(self, parsed, references, fd, num_inference_steps):
        return self.augmented_conditioning(parsed, references), self.injection_step(num_inference_steps)
