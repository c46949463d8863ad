"""Tiny, randomly initialised SD1.5-shaped, SDXL-shaped and FLUX-shaped pipelines.

They follow the dummy component sizes of diffusers' own pipeline tests, use the real CLIP
BPE tokenizer (converted offline from open-clip-torch's vocabulary, see
:mod:`freecure.tokenization`) and are always saved with ``save_pretrained`` and loaded back
with ``from_pretrained`` so that the real loading path runs. Their weights are random:
their images are noise, and they exist to run and test the machinery offline, never to
judge image quality.

The FLUX pipeline's T5 tokenizer is built locally (:func:`tiny_t5_tokenizer`): a SentencePiece
Unigram model over the words of FreeCure's attribute vocabulary and Table 3 prompts, with
single characters as fallback pieces, wrapped as ``T5TokenizerFast`` (no download).
"""

from __future__ import annotations

import logging
import os

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..core.configs import FLUX_SCHEDULER, FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR, SD_SCHEDULER
from ..core.tokenization import load_clip_tokenizer

# the scratch folders moved to .scratch (tiny_flux2 needs them without importing this module);
# these names stay importable from here
from .scratch import (  # noqa: F401
    _TINY_SCRATCH,
    TINY_SCRATCH_PREFIX,
    _removed_on_sigterm,
    _save_and_reload,
    remove_stale_tiny_folders,
    tiny_scratch,
)

logger = logging.getLogger(__name__)

TINY_WARNING = "tiny random-weight components: the images are noise and show only the machinery"

# CLIP's real vocabulary size: the tiny text encoders must accept real token ids.
CLIP_VOCAB_SIZE = 49408


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD_SCHEDULER)  # Stable Diffusion's published schedule


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
        norm_num_groups=32,
    )


def _text_config(projection_dim: int | None = None) -> CLIPTextConfig:
    kwargs = dict(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def build_tiny_sd15_components(seed: int = 0) -> dict:
    """SD1.5-shaped components: a 2-level UNet with cross-attention in the up path."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = _vae()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": load_clip_tokenizer(),
        "scheduler": _scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def build_tiny_sdxl_components(seed: int = 0) -> dict:
    """SDXL-shaped components: two text encoders, ``text_time`` added conditioning."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,  # 32 + 32 from the two text encoders
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = _vae()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=32))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": load_clip_tokenizer(),
        "tokenizer_2": load_clip_tokenizer(pad_token="!"),
        "scheduler": _scheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd15_pipeline(directory: str | os.PathLike | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD1.5-shaped pipeline, saved to ``directory`` (a temp dir if None) and reloaded."""
    pipeline = StableDiffusionPipeline(**build_tiny_sd15_components(seed), requires_safety_checker=False)
    return _save_and_reload(pipeline, StableDiffusionPipeline, directory)


def tiny_sdxl_pipeline(directory: str | os.PathLike | None = None, seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny SDXL-shaped pipeline, saved to ``directory`` (a temp dir if None) and reloaded."""
    pipeline = StableDiffusionXLPipeline(**build_tiny_sdxl_components(seed))
    return _save_and_reload(pipeline, StableDiffusionXLPipeline, directory)


def tiny_t5_tokenizer(model_max_length: int = 32):
    """A T5-style SentencePiece Unigram tokenizer built in code: pieces "▁word" for every word of
    the attribute vocabulary and the Table 3 prompts, single characters as fallback, ``</s>``
    appended, no BOS (like T5). Token offsets are exact, so attribute columns resolve."""
    import re
    import string
    from importlib.resources import files

    from transformers import T5TokenizerFast

    data = files("freecure") / "data"
    sources = ("attribute_vocabulary.csv", "prompts_table3.csv")
    text = " ".join((data / name).read_text(encoding="utf-8") for name in sources)
    words = sorted(set(re.findall(r"[a-z]+", text.lower())) | {"a", "an", "the", "man", "woman", "img", "photo"})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + word, -5.0) for word in words]
    pieces += [("▁", -8.0)] + [(char, -10.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def build_tiny_flux_components(seed: int = 0) -> dict:
    """FLUX-shaped components: 2 double-stream and 2 single-stream blocks, guidance-distilled,
    CLIP + T5 text encoders, a VAE with FLUX's latent shift and scale, FLUX.1-dev's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × a 2×2 patch
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=FLUX_VAE_SCALING_FACTOR,
        shift_factor=FLUX_VAE_SHIFT_FACTOR,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(seed)
    t5 = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    text_encoder_2 = T5EncoderModel(t5)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": load_clip_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        "image_encoder": None,
        "feature_extractor": None,
    }


#: Default tiny FLUX image side: 64 px → a 32×32 latent → 16×16 = 256 image tokens.
TINY_FLUX_SAMPLE_SIZE = 32


def tiny_flux_pipeline(directory: str | os.PathLike | None = None, seed: int = 0):
    """A tiny FLUX-shaped pipeline, saved to ``directory`` (a temp dir if None) and reloaded.

    ``default_sample_size`` is lowered so that the default image is 64 px (FLUX's 1024 px
    default would make a tiny run slow for nothing)."""
    from diffusers import FluxPipeline

    pipeline = _save_and_reload(FluxPipeline(**build_tiny_flux_components(seed)), FluxPipeline, directory)
    pipeline.default_sample_size = TINY_FLUX_SAMPLE_SIZE
    return pipeline


#: The tiny model families (``--tiny-family``; ``Backend.families`` names them).
TINY_FAMILIES = ("sd15", "sdxl", "flux", "flux2-klein", "flux2")


def tiny_pipeline(family: str, directory: str | os.PathLike | None = None, seed: int = 0):
    """The tiny pipeline of ``family``: ``"sd15"``, ``"sdxl"``, ``"flux"``, ``"flux2-klein"`` or
    ``"flux2"`` (FLUX.2 [dev]; both FLUX.2 ones from :mod:`freecure.families.tiny_flux2`)."""
    builders = {
        "sd15": tiny_sd15_pipeline,
        "sdxl": tiny_sdxl_pipeline,
        "flux": tiny_flux_pipeline,
        "flux2-klein": None,
        "flux2": None,
    }
    if family not in builders:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(builders)}")
    if family.startswith("flux2"):
        from .tiny_flux2 import tiny_flux2_klein_pipeline, tiny_flux2_pipeline  # tiny_flux2 imports this module

        return (tiny_flux2_klein_pipeline if family == "flux2-klein" else tiny_flux2_pipeline)(directory, seed)
    return builders[family](directory, seed)


class LayoutFaceParser:
    """A synthetic face parser for tiny runs: it labels a fixed portrait layout (hair on top,
    a face oval with eyes, brows, nose and lips, ears with earrings, neck and cloth below)
    whatever the image shows, so every FreeCure stage has regions to work with on
    random-weight images. It is not a face parser; real runs use BiSeNet.
    """

    def __call__(self, image):
        from ..core.images import load_image

        return self._parse(load_image(image))

    def parse_batch(self, images):
        return [self(image) for image in images]

    def _parse(self, image):
        import numpy as np

        from ..core.labels import CLASS_TO_ID as ID
        from ..parsing import ParseResult

        width, height = image.size
        y, x = np.mgrid[0:height, 0:width]
        u, v = x / width, y / height  # normalised coordinates
        labels = np.zeros((height, width), np.uint8)
        face = ((u - 0.5) / 0.25) ** 2 + ((v - 0.52) / 0.3) ** 2 <= 1
        labels[(v > 0.8)] = ID["cloth"]
        labels[(v > 0.7) & (np.abs(u - 0.5) < 0.12)] = ID["neck"]
        labels[((u - 0.5) / 0.34) ** 2 + ((v - 0.42) / 0.36) ** 2 <= 1] = ID["hair"]
        labels[face] = ID["skin"]
        for side, ear, ring in ((0.23, "l_ear", "ear_r"), (0.77, "r_ear", "ear_r")):
            labels[(np.abs(u - side) < 0.03) & (np.abs(v - 0.52) < 0.06)] = ID[ear]
            labels[(np.abs(u - side) < 0.02) & (np.abs(v - 0.61) < 0.02)] = ID[ring]
        for cx, eye, brow in ((0.4, "l_eye", "l_brow"), (0.6, "r_eye", "r_brow")):
            labels[(np.abs(u - cx) < 0.05) & (np.abs(v - 0.45) < 0.025)] = ID[eye]
            labels[(np.abs(u - cx) < 0.06) & (np.abs(v - 0.39) < 0.015)] = ID[brow]
        labels[(np.abs(u - 0.5) < 0.035) & (v > 0.47) & (v < 0.6)] = ID["nose"]
        labels[(np.abs(u - 0.5) < 0.08) & (np.abs(v - 0.66) < 0.015)] = ID["u_lip"]
        labels[(np.abs(u - 0.5) < 0.08) & (np.abs(v - 0.69) < 0.015)] = ID["l_lip"]
        box = (int(0.25 * width), int(0.22 * height), int(0.75 * width), int(0.82 * height))
        return ParseResult(
            labels=labels,
            face_box=box,
            crop_box=(0, 0, width, height),
            face_found=True,
            note="synthetic portrait layout (tiny mode): regions are fixed, not parsed from the image",
        )
