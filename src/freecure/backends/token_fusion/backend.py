"""Token fusion: the identity mechanism of PhotoMaker and FastComposer, without their encoders.

PD's conditioning is FD's text-encoder output with the class word's token embedding(s)
replaced by an identity embedding (S → S* in the paper's Figure 2). The identity embedding
comes from an *identity encoder*: any callable mapping reference images to a tensor of shape
(dim,) or (tokens, dim) in the text encoder's output space, or a fixed tensor (for example a
learned embedding loaded from a file). :class:`RandomProjectionIdentityEncoder` is a tiny,
checkpoint-free encoder for offline runs and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from ...core.attributes import ParsedPrompt
from ...core.conditioning import TextConditioning
from ...core.errors import InputError
from ...core.options import Option, finite_float
from ..base import Backend
from ..common.identity_files import IdentitySchema, TensorField, read_identity_file
from ..common.random_identity import RandomProjectionIdentityEncoder, text_dim

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

IdentitySource = torch.Tensor | Callable[[Sequence[Image.Image]], torch.Tensor]


#: ``--identity-embedding``: one vector (or one per class-word token) of the text states' width.
IDENTITY_SCHEMA = IdentitySchema(
    "token-fusion",
    "--identity-embedding",
    (
        TensorField(
            "identity",
            (("text_dim",), ("tokens", "text_dim")),
            "the identity embedding in the text encoder's output space (text_dim: 768 SD1.5, 2048 SDXL, "
            "4096 FLUX's T5; tokens: the class word's)",
        ),
    ),
    "README.md (token-fusion)",
    allow_unknown=True,  # a state dict may carry other tensors; only 'identity' is read
)


class TokenFusionBackend(Backend):
    """PD = FD's text embedding with the class token(s) replaced by the identity embedding.

    Args:
        pipeline: a diffusers SD1.5-family or SDXL-family text-to-image pipeline.
        identity: an identity encoder (callable on reference images) or a fixed embedding of
            shape (dim,) or (tokens, dim); ``dim`` is the text encoder output size (768 for
            SD1.5, 2048 for SDXL's two encoders concatenated).
        inject_fraction: identity is injected from step ``int(inject_fraction × steps)``
            (PhotoMaker's style strength; 0 injects from the first step).
    """

    name = "token-fusion"
    prompt_identity = "all"
    families = ("sd15", "sdxl", "flux")
    license = "no checkpoint of its own; the base model's licence applies"
    identity_schema = IDENTITY_SCHEMA

    def __init__(self, pipeline, identity: IdentitySource, inject_fraction: float = 0.2):
        super().__init__(pipeline)
        if not 0.0 <= inject_fraction < 1.0:
            raise ValueError(f"inject_fraction must lie in [0, 1), got {inject_fraction}")
        self.identity = identity
        self.inject_fraction = inject_fraction

    options = (
        Option(
            "--identity-embedding",
            metavar="FILE",
            help="token-fusion: safetensors file whose tensor 'identity' (dim or tokens×dim) "
            "replaces the class token(s); with --tiny a random projection of --ref is used",
        ),
        Option(
            "--inject-fraction",
            type=finite_float(0.0, 0.999),
            default=0.2,
            help="token-fusion: identity is injected from step int(fraction × steps) (default 0.2)",
        ),
    )

    @classmethod
    def from_options(cls, args) -> TokenFusionBackend:
        from ...core.runtime import load_base_pipeline
        from ...families.tiny import tiny_pipeline

        if args.tiny:
            pipeline = tiny_pipeline(args.tiny_family)
            pipeline.to(args.device)
            identity = RandomProjectionIdentityEncoder(text_dim(pipeline)) if args.identity_embedding is None else None
        else:
            pipeline = load_base_pipeline(args.base_model or DEFAULT_BASE_MODEL, args.device, args.dtype)
            identity = None
        if identity is None:  # the width is the built pipeline's
            identity = load_identity_embedding(args.identity_embedding, {"text_dim": text_dim(pipeline)})
        return cls(pipeline, identity, inject_fraction=args.inject_fraction)

    @classmethod
    def check_identity_files(cls, args) -> None:
        """``--identity-embedding`` against :attr:`identity_schema` before any model loads (its
        width is checked against the text encoder's once the base model is loaded)."""
        if getattr(args, "identity_embedding", None) is not None:
            load_identity_embedding(args.identity_embedding)

    def identity_embedding(self, references: Sequence[Image.Image]) -> torch.Tensor:
        if isinstance(self.identity, torch.Tensor):
            return self.identity
        if not references:
            raise InputError("the token-fusion backend needs at least one reference image (--ref)")
        return self.identity(references)

    def identity_conditions(
        self,
        parsed: ParsedPrompt,
        references: Sequence[Image.Image],
        fd: TextConditioning,
        num_inference_steps: int,
    ) -> tuple[TextConditioning, int]:
        columns = list(parsed.class_token_indices)
        embedding = self.identity_embedding(references).to(fd.prompt_embeds)
        if embedding.ndim == 1:
            embedding = embedding[None].expand(len(columns), -1)
        dim = fd.prompt_embeds.shape[-1]
        if embedding.shape != (len(columns), dim):
            raise InputError(
                f"identity embedding has shape {tuple(embedding.shape)}; expected ({dim},) or "
                f"({len(columns)}, {dim}) for the class word's {len(columns)} token(s)"
            )
        fused = fd.prompt_embeds.clone()
        fused[0, columns] = embedding
        inject_step = int(self.inject_fraction * num_inference_steps)
        return TextConditioning(fused, fd.pooled_prompt_embeds), inject_step


def load_identity_embedding(path, dims: dict[str, int] | None = None) -> torch.Tensor:
    """Read the tensor ``identity`` from a safetensors file (or a ``torch.save`` file), checked
    against :data:`IDENTITY_SCHEMA`; ``dims`` may fix ``text_dim`` (the pipeline's)."""
    if path is None:
        raise InputError(
            "the token-fusion backend needs an identity embedding: pass --identity-embedding FILE "
            "(a safetensors file with a tensor named 'identity'), or run offline with --tiny"
        )
    return read_identity_file(path, IDENTITY_SCHEMA, dims)["identity"].float()
