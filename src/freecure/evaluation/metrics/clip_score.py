"""Prompt consistency PC (CLIP-T, paper §5.1 and §8.2).

PC(I, c) = 100 · cos(E_img(I), E_txt(c)): the cosine between CLIP's projected image
embedding of a generated image and CLIP's projected text embedding of its prompt, times 100
(the paper's "%"). The prompt is the *foundation* prompt: the identity trigger word (for
example PhotoMaker's "img") is removed, the class word stays ("a woman with blonde hair").
Nothing is clamped: the value lies in [-100, 100] (torchmetrics' ``clip_score`` clamps at 0,
Hessel et al.'s CLIPScore rescales by 2.5; the paper does neither).

Images are pre-processed as OpenAI's ``clip.load`` does: bicubic resize of the shorter
side to the model's input size, centre crop, CLIP's mean and standard deviation. Texts are
tokenized to at most the model's context length (77) and truncated beyond it.

The default model is OpenAI's ViT-B/32 (``openai/clip-vit-base-patch32`` in transformers):
the paper uses "the official implementation of the vision transformer provided by OpenAI"
without naming the size, and ViT-B/32 is the model of the CLIP-T evaluator that the
personalization literature reuses (Textual Inversion's and DreamBooth's ``CLIPEvaluator``).
Any transformers CLIP checkpoint (Hub id or folder) or an open_clip model
(``open_clip:ARCH/PRETRAINED``, e.g. ``open_clip:ViT-B-32/openai``) can be named instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...core.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
OPEN_CLIP_PREFIX = "open_clip:"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """OpenAI CLIP's image transform: resize shorter side (bicubic), centre crop, normalise."""
    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    image = image.resize(new_size, Image.BICUBIC)
    left = int(round((new_size[0] - size) / 2.0))
    top = int(round((new_size[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (tensor - mean) / std


def _features(output) -> torch.Tensor:
    """transformers ≥ 5 returns a model output whose pooler_output is the projection."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class PromptConsistency:
    """PC (CLIP-T) scorer; see the module docstring for the definition.

    Args:
        encode_image: batch of pre-processed images (N, 3, S, S) → (N, D) embeddings.
        encode_text: list of strings → (M, D) embeddings.
        preprocess: PIL image → (3, S, S) tensor.
        name: the model's name, recorded with every result.
        device: where the model runs.
        batch_size: images per forward pass.

    Example:
        >>> pc = PromptConsistency.from_pretrained()  # openai/clip-vit-base-patch32
        >>> pc([image], "a woman with blonde curly hair")  # tensor([27.1])
    """

    def __init__(self, encode_image, encode_text, preprocess, name: str, device="cpu", batch_size: int = 16):
        self.encode_image = encode_image
        self.encode_text = encode_text
        self.preprocess = preprocess
        self.name = name
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_CLIP_MODEL, device="cpu", batch_size: int = 16) -> PromptConsistency:
        """Load a transformers CLIP (Hub id or folder) or ``open_clip:ARCH/PRETRAINED``."""
        if name.startswith(OPEN_CLIP_PREFIX):
            return cls._open_clip(name[len(OPEN_CLIP_PREFIX) :], device, batch_size)
        return cls._transformers(name, device, batch_size)

    @classmethod
    def _transformers(cls, name: str, device, batch_size: int) -> PromptConsistency:
        from transformers import CLIPModel, CLIPTokenizer

        try:
            model = CLIPModel.from_pretrained(name).to(device).eval()
            tokenizer = CLIPTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise InputError(
                f"could not load the CLIP model {name!r} for prompt consistency: {error}\n"
                "Give a Hugging Face Hub id (needs network the first time; then it is cached), a "
                "local folder saved with save_pretrained, or open_clip:ARCH/PRETRAINED."
            ) from None
        size = model.config.vision_config.image_size
        max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

        def encode_image(pixels: torch.Tensor) -> torch.Tensor:
            return _features(model.get_image_features(pixel_values=pixels.to(device, model.dtype)))

        def encode_text(texts: list[str]) -> torch.Tensor:
            tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            return _features(
                model.get_text_features(
                    input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
                )
            )

        return cls(encode_image, encode_text, lambda image: clip_preprocess(image, size), name, device, batch_size)

    @classmethod
    def _open_clip(cls, spec: str, device, batch_size: int) -> PromptConsistency:
        try:
            import open_clip
        except ImportError as error:
            raise InputError(f"open_clip models need open-clip-torch ({error}); pip install open-clip-torch") from None
        arch, _, pretrained = spec.partition("/")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        except (RuntimeError, OSError, ValueError) as error:
            raise InputError(f"could not load the open_clip model {spec!r}: {error}") from None
        model = model.to(device).eval()
        tokenizer = open_clip.get_tokenizer(arch)
        return cls(
            lambda pixels: model.encode_image(pixels.to(device)),
            lambda texts: model.encode_text(tokenizer(texts).to(device)),
            preprocess,
            OPEN_CLIP_PREFIX + spec,
            device,
            batch_size,
        )

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length image embeddings, shape (N, D), in batches of ``batch_size``."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(image) for image in images[start : start + self.batch_size]])
            chunks.append(self.encode_image(pixels).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings, shape (M, D)."""
        return torch.nn.functional.normalize(self.encode_text(list(texts)).float(), dim=-1).cpu()

    def __call__(self, images: Sequence[Image.Image], texts: str | Sequence[str]) -> torch.Tensor:
        """PC of each image with its text (one text for all, or one per image); shape (N,)."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) not in (1, len(images)):
            raise ValueError(f"give one text or one per image; got {len(texts)} texts for {len(images)} images")
        if not images:
            return torch.zeros(0)
        unique = list(dict.fromkeys(texts))
        text = self.text_embeddings(unique)
        rows = torch.tensor([unique.index(t) for t in texts]).expand(len(images))
        return 100.0 * (self.image_embeddings(images) * text[rows]).sum(dim=-1)


def build_tiny_clip(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random transformers CLIP (and the real offline CLIP tokenizer) to ``directory``.

    For tests and ``--tiny`` runs only: its embeddings are random and its scores meaningless.
    Load it with ``PromptConsistency.from_pretrained(directory)``.
    """
    from transformers import CLIPConfig, CLIPModel

    from ...core.tokenization import load_clip_tokenizer

    directory = Path(directory)
    text = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(directory)
    load_clip_tokenizer().save_pretrained(directory)
    return directory
