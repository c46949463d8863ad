"""Tiny random adapter files and IdentityNets in the released layouts (for ``--tiny`` and tests).

Kept apart from :mod:`freecure.tiny` so that the adapter backends' tiny builders live in one place.
Their weights are random: they exercise the loading path and the FD/PD machinery, nothing else.
"""

from __future__ import annotations

import torch

from .errors import InputError

#: Width of the tiny Plus variants' stand-in CLIP states (ViT-H's is 1280).
TINY_CLIP_DIM = 32
#: The tiny InstantID Resampler: width 64 so that diffusers' loader (heads = width / 64) reads it.
TINY_RESAMPLER = dict(dim=64, depth=4, dim_head=64, heads=1, num_queries=16, embedding_dim=512, ff_mult=4)


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
    from .backends.ip_adapter_faceid import ReleasedFaceIDLayout, split_adapter_state

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
    from .backends.ip_adapter_faceid import load_faceid_adapter
    from .tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

    pipeline = tiny_sdxl_pipeline(seed=seed) if family == "sdxl" else tiny_sd15_pipeline(seed=seed)
    pipeline.set_progress_bar_config(disable=True)
    load_faceid_adapter(pipeline, faceid_state_dict(pipeline.unet, variant, seed=seed), variant, scale)
    return pipeline


def instantid_state_dict(unet, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A random InstantID ``ip-adapter.bin`` for ``unet`` with the tiny Resampler."""
    from .backends.instantid import ReleasedInstantIDLayout
    from .backends.ip_adapter_faceid import split_adapter_state

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
    from .backends.instantid import load_instantid_adapter
    from .tiny import tiny_sdxl_pipeline

    pipeline = tiny_sdxl_pipeline(seed=seed)
    pipeline.set_progress_bar_config(disable=True)
    controlnet = tiny_identitynet(pipeline.unet, seed)
    load_instantid_adapter(pipeline, instantid_state_dict(pipeline.unet, seed), scale, TINY_RESAMPLER)
    return pipeline, controlnet
