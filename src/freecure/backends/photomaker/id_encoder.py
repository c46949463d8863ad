"""PhotoMaker's ID encoder and its shared pieces, used by both PhotoMaker versions.

:mod:`freecure.backends.photomaker` (the backend, v1 and v2) and
:mod:`freecure.backends.photomaker_v2` (v2's encoder, subclassing :class:`PhotoMakerIDEncoder`)
both import from here, so neither imports the other's module at load time.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from ...core.configs import VIT_L14_VISION as VIT_L14
from ..common.layers import FuseModule

#: Widths of SDXL's two text encoders; their concatenation (2048) is the fused width.
SDXL_TEXT_DIMS = (768, 1280)

#: OpenAI CLIP's normalisation (what ``CLIPImageProcessor()`` uses by default).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vit_l14_config():
    """The ``CLIPVisionConfig`` of PhotoMaker's vision tower, built offline."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**VIT_L14)


def tiny_vision_config(projection_dim: int = 32):
    """A tiny CLIP vision config (same 224 px input, 49 patches) for offline runs and tests."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        **{
            **VIT_L14,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "patch_size": 32,
            "projection_dim": projection_dim,
        }
    )


def clip_image_processor(size: int = 224):
    """CLIP's preprocessing as the original uses it (``CLIPImageProcessor()``): RGB, resize
    the short side to ``size`` (PIL bicubic), centre-crop ``size``², scale to [0, 1],
    normalise with OpenAI CLIP's mean and std.

    transformers ≥ 5 makes ``CLIPImageProcessor`` a torchvision backend whose resize differs
    slightly from PIL's; the PIL backend (``CLIPImageProcessorPil``) is the one that matches
    the processor the released pipeline ran with (transformers 4.36), so it is preferred.
    """
    import transformers

    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return processor_cls(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": size},
        resample=Image.BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


# --------------------------------------------------------------------------- modules


def fuse_class_tokens(
    fuse: FuseModule, prompt_embeds: torch.Tensor, id_embeds: torch.Tensor, class_mask: torch.Tensor
) -> torch.Tensor:
    """Write the stacked ID embeddings into the class-token positions.

    Args:
        fuse: the fuse module.
        prompt_embeds: the expanded prompt's text embedding, (1, L, D).
        id_embeds: one row per class-token copy, in prompt order, (n, D).
        class_mask: (1, L) booleans, True at the n class-token copies.

    Returns:
        A new (1, L, D) tensor; rows outside the mask are unchanged.
    """
    if prompt_embeds.shape[0] != 1 or class_mask.shape != prompt_embeds.shape[:2]:
        raise ValueError(
            f"expected one prompt and a (1, L) mask, got {tuple(prompt_embeds.shape)} and {tuple(class_mask.shape)}"
        )
    count = int(class_mask.sum())
    if count != id_embeds.shape[0]:
        raise ValueError(f"{count} class-token positions but {id_embeds.shape[0]} ID embeddings")
    dtype = fuse.layer_norm.weight.dtype
    class_embeds = prompt_embeds[class_mask].to(dtype)
    fused = fuse(class_embeds, id_embeds.to(dtype))
    out = prompt_embeds.clone()
    out[class_mask] = fused.to(out.dtype)
    return out


class PhotoMakerIDEncoder(nn.Module):
    """PhotoMaker v1's ID encoder: a CLIP vision tower with two projections and the fuse
    module. Its ``state_dict`` keys are those of the released checkpoint's ``id_encoder``
    part (``vision_model.*``, ``visual_projection.weight``, ``visual_projection_2.weight``,
    ``fuse_module.*``).

    Args:
        vision_config: a ``CLIPVisionConfig``; :func:`vit_l14_config` for the release.
        text_dims: widths of the base model's two text encoders (768, 1280 for SDXL); the
            first must equal ``vision_config.projection_dim``.
    """

    #: class-token copies per reference image.
    tokens_per_image = 1
    #: whether :meth:`forward` needs ArcFace embeddings (v2).
    needs_face_embeddings = False

    def __init__(self, vision_config=None, text_dims: tuple[int, int] = SDXL_TEXT_DIMS):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        vision_config = vision_config if vision_config is not None else vit_l14_config()
        if vision_config.projection_dim != text_dims[0]:
            raise ValueError(
                f"visual projection width {vision_config.projection_dim} must equal the first "
                f"text encoder's width {text_dims[0]}"
            )
        clip = CLIPVisionModelWithProjection(vision_config)
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.visual_projection_2 = nn.Linear(vision_config.hidden_size, text_dims[1], bias=False)
        self.fuse_module = FuseModule(sum(text_dims))
        self.vision_config = vision_config
        self.text_dims = tuple(text_dims)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection_2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual_projection_2.weight.device

    def id_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One (D,) embedding per image: [W₁·p; W₂·p] with p CLIP's pooled CLS feature."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)

    def forward(
        self, pixel_values: torch.Tensor, prompt_embeds: torch.Tensor, class_mask: torch.Tensor
    ) -> torch.Tensor:
        """The fused prompt embedding.

        Args:
            pixel_values: the reference images, (n, 3, 224, 224), preprocessed.
            prompt_embeds: the expanded prompt's text embedding, (1, L, D).
            class_mask: (1, L), True at the n class-token copies.
        """
        id_embeds = self.id_embeddings(pixel_values.to(self.device, self.dtype))
        return fuse_class_tokens(self.fuse_module, prompt_embeds, id_embeds, class_mask)
