"""Tiny, randomly initialised FLUX.2-shaped pipelines: ``Flux2KleinPipeline`` (a Qwen3 text
encoder, real CFG) and ``Flux2Pipeline`` ([dev]: a Mistral-3 text encoder, embedded guidance).

Like the pipelines of :mod:`freecure.families.tiny` they are built in code from tiny random
components, saved with ``save_pretrained`` and loaded back with ``from_pretrained`` (so the real
loading path runs) and lower ``default_sample_size`` so that the default image is 64 px. Their
images are noise: they exist to run and test the machinery offline.

The tokenizers are built locally (no download): a byte-level BPE trained in code on the words of
FreeCure's attribute vocabulary and Table 3 prompts (every other text falls back to bytes), with
Qwen2's pre-tokenizer (:func:`tiny_qwen_tokenizer`, wrapped as ``Qwen2TokenizerFast`` with a
Qwen3-style chat template) or wrapped in a ``PixtralProcessor`` with a Mistral-Small-3-style chat
template (:func:`tiny_mistral_processor`).

The tiny text encoders have 3 layers, so the pipelines' default ``text_encoder_out_layers``
((9, 18, 27) for klein, (10, 20, 30) for dev) do not exist in them: each tiny pipeline carries
:data:`TINY_TEXT_ENCODER_OUT_LAYERS` as its attribute ``text_encoder_out_layers`` (set after
loading, like ``default_sample_size``), which :class:`~freecure.families.flux2.Flux2Family`
reads (:meth:`~freecure.families.flux2.Flux2Family.for_pipeline`). Calling the diffusers pipeline
itself on them needs ``text_encoder_out_layers=pipe.text_encoder_out_layers``.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache

import torch

from .scratch import _save_and_reload

#: Default tiny FLUX.2 image side: 64 px → a 32×32 latent → a 16×16 grid of 256 image tokens.
TINY_FLUX2_SAMPLE_SIZE = 32
#: hidden-state indices of the tiny 3-layer text encoders stacked into the prompt embedding
#: (index 0 is the embedding layer's output, as in ``output_hidden_states``).
TINY_TEXT_ENCODER_OUT_LAYERS = (1, 2, 3)
TINY_TEXT_WIDTH = 16
#: the pipelines' ``max_sequence_length`` default (both pad every prompt to it)
MAX_SEQUENCE_LENGTH = 512

#: Qwen3's chat template reduced to what ``Flux2KleinPipeline`` renders: user turns, the generation
#: prompt, and the empty thinking block that ``enable_thinking=False`` inserts.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

#: Mistral-Small-3's chat template reduced to what ``Flux2Pipeline`` renders (``format_input``'s
#: system and user turns with text content): ``<s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]``.
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
MISTRAL_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]",
)  # fmt: skip


@lru_cache(maxsize=2)
def _byte_level_bpe(special_tokens: tuple[str, ...]) -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE trained on the words of FreeCure's data files, each
    word with and without a leading space, under Qwen2's pre-tokenizer; ``special_tokens``
    first. Deterministic (the trainer breaks ties by order)."""
    from importlib.resources import files

    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    data = files("freecure") / "data"
    sources = ("attribute_vocabulary.csv", "prompts_table3.csv")
    text = " ".join((data / name).read_text(encoding="utf-8") for name in sources)
    words = sorted(set(re.findall(r"[a-z]+", text.lower())) | {"a", "an", "the", "man", "woman", "img", "photo"})
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # more than enough: every word becomes one token
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(special_tokens),
    )
    tokenizer.train_from_iterator([" " + " ".join(words), " ".join(words)], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


#: text tokens of the tiny pipelines' prompts (the family caps the pipelines' 512 by it): room for
#: [dev]'s system message and a long prompt, a quarter of the real length
TINY_SEQUENCE_LENGTH = 128


def tiny_qwen_tokenizer(model_max_length: int = TINY_SEQUENCE_LENGTH):
    """A Qwen2-style byte-level BPE tokenizer built in code (see the module docstring), with
    Qwen3's special tokens and :data:`QWEN3_CHAT_TEMPLATE`."""
    from transformers import Qwen2TokenizerFast

    vocab, merges = _byte_level_bpe(QWEN_SPECIAL_TOKENS)
    tokenizer = Qwen2TokenizerFast(
        vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length, chat_template=QWEN3_CHAT_TEMPLATE
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer


def tiny_mistral_processor(model_max_length: int = TINY_SEQUENCE_LENGTH):
    """A ``PixtralProcessor`` (Mistral-3's processor class) around a byte-level BPE tokenizer
    built in code, with Mistral's special tokens and :data:`MISTRAL3_CHAT_TEMPLATE`; the image
    processor is Pixtral's default (no images are ever passed: ``Flux2Pipeline`` encodes text)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab, merges = _byte_level_bpe(MISTRAL_SPECIAL_TOKENS)
    backend = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        additional_special_tokens=list(MISTRAL_SPECIAL_TOKENS[4:]),
    )
    return PixtralProcessor(
        image_processor=PixtralImageProcessor(),
        tokenizer=tokenizer,
        patch_size=4,
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )


def _transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × a 2×2 patch
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=len(TINY_TEXT_ENCODER_OUT_LAYERS) * TINY_TEXT_WIDTH,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # (t, h, w, l), summing to the head width
        guidance_embeds=guidance_embeds,
    )


def _vae(seed: int):
    """A 2-level ``AutoencoderKLFlux2`` (scale factor 2) with 4 latent channels, and non-trivial
    batch-norm statistics of its 16 patchified channels (so normalisation is exercised)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        sample_size=64,
        norm_num_groups=32,
    )
    generator = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=generator))
    return vae


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..core.configs import FLUX_SCHEDULER

    # FLUX.2's pipelines pass μ (compute_empirical_mu): dynamic shifting, as in FLUX.1's config
    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)


def build_tiny_flux2_klein_components(seed: int = 0) -> dict:
    """FLUX.2 [klein]-shaped components: 2 double- and 2 single-stream blocks without guidance
    embedding, a 3-layer Qwen3 text encoder, a tiny ``AutoencoderKLFlux2``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = _transformer(guidance_embeds=False)
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_WIDTH,
            intermediate_size=32,
            num_hidden_layers=len(TINY_TEXT_ENCODER_OUT_LAYERS),
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=MAX_SEQUENCE_LENGTH,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return {
        "transformer": transformer,
        "vae": _vae(seed),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": _scheduler(),
    }


def build_tiny_flux2_components(seed: int = 0) -> dict:
    """FLUX.2 [dev]-shaped components: 2 double- and 2 single-stream blocks with guidance
    embedding, a 3-layer ``Mistral3ForConditionalGeneration`` (tiny Pixtral vision tower, never
    used for text), a ``PixtralProcessor``, a tiny ``AutoencoderKLFlux2``."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    processor = tiny_mistral_processor()
    torch.manual_seed(seed)
    transformer = _transformer(guidance_embeds=True)
    torch.manual_seed(seed)
    tokenizer = processor.tokenizer
    config = Mistral3Config(
        text_config=MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_WIDTH,
            intermediate_size=32,
            num_hidden_layers=len(TINY_TEXT_ENCODER_OUT_LAYERS),
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=MAX_SEQUENCE_LENGTH,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=PixtralVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
            image_size=32, patch_size=4,
        ),  # fmt: skip
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
    )
    text_encoder = Mistral3ForConditionalGeneration(config)
    return {
        "transformer": transformer,
        "vae": _vae(seed),
        "text_encoder": text_encoder.eval(),
        "tokenizer": processor,
        "scheduler": _scheduler(),
    }


def _finish(pipeline):
    pipeline.default_sample_size = TINY_FLUX2_SAMPLE_SIZE
    pipeline.text_encoder_out_layers = TINY_TEXT_ENCODER_OUT_LAYERS
    return pipeline


def tiny_flux2_klein_pipeline(directory: str | os.PathLike | None = None, seed: int = 0, distilled: bool = False):
    """A tiny ``Flux2KleinPipeline`` (base: real CFG; ``distilled``: step-distilled, one row),
    saved to ``directory`` (a temp dir if None) and reloaded; 64 px default images, and the tiny
    encoder's ``text_encoder_out_layers`` as an attribute (see the module docstring)."""
    from diffusers import Flux2KleinPipeline

    pipeline = Flux2KleinPipeline(**build_tiny_flux2_klein_components(seed), is_distilled=distilled)
    return _finish(_save_and_reload(pipeline, Flux2KleinPipeline, directory))


def tiny_flux2_pipeline(directory: str | os.PathLike | None = None, seed: int = 0):
    """A tiny ``Flux2Pipeline`` (FLUX.2 [dev]: guidance embedded), saved to ``directory`` (a temp
    dir if None) and reloaded; 64 px default images, and the tiny encoder's
    ``text_encoder_out_layers`` as an attribute (see the module docstring)."""
    from diffusers import Flux2Pipeline

    pipeline = Flux2Pipeline(**build_tiny_flux2_components(seed))
    return _finish(_save_and_reload(pipeline, Flux2Pipeline, directory))
