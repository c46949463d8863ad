"""PuLID's IDFormer: an identity embedding and EVA-CLIP features → identity tokens.

Shared by PuLID SDXL v1.1 (``id_adapter.*`` in ``pulid_v1.1.safetensors``, 32 tokens of 2048
for SDXL's cross-attention) and PuLID-FLUX (``pulid_encoder.*`` in
``pulid_flux_v0.9.1.safetensors``, 32 tokens of 2048 read by the perceiver CA modules).

Written from the original's description (ToTheBeginning/PuLID @ 1aa2fc7,
``pulid/encoders_transformer.py``), a perceiver resampler:

* ``id_cond`` (the antelopev2 ArcFace embedding, 512, concatenated with EVA02-CLIP-L-14-336's
  normalised image embedding, 768: 1280 in all) is mapped by an MLP to ``num_id_token`` = 5
  tokens of ``dim``;
* 32 learned query latents are concatenated with those 5 tokens; the combined latents attend to
  [the 5 id tokens; one mapped EVA-CLIP hidden state] in five rounds (one hidden state per
  round: the ViT's blocks 4, 8, 12, 16 and 20, each through its own MLP ``mapping_<i>``), each
  round ``depth / 5`` perceiver layers (attention + feed-forward, both residual);
* the first 32 latents are projected by ``proj_out`` (dim × output_dim) to the identity tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..common.layers import PerceiverAttention, feed_forward

#: Number of EVA-CLIP hidden states the IDFormer reads (one per round).
VIT_ROUNDS = 5


@dataclass(frozen=True)
class IDFormerConfig:
    """IDFormer sizes; the defaults are the released ones (both PuLID SDXL v1.1 and FLUX).

    Attributes:
        id_dim: width of ``id_cond``: ArcFace 512 + EVA-CLIP embedding 768.
        vit_dim: width of EVA02-CLIP-L's hidden states (1024).
        mapping_dim: hidden width of the mapping MLPs (1024 in the original, hard-coded).
    """

    dim: int = 1024
    depth: int = 10
    dim_head: int = 64
    heads: int = 16
    num_id_token: int = 5
    num_queries: int = 32
    output_dim: int = 2048
    ff_mult: int = 4
    id_dim: int = 1280
    vit_dim: int = 1024
    mapping_dim: int = 1024

    def __post_init__(self):
        if self.depth % VIT_ROUNDS:
            raise ValueError(f"IDFormer depth must be a multiple of {VIT_ROUNDS}, got {self.depth}")


def _mapping(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear → LN → LeakyReLU → Linear → LN → LeakyReLU → Linear (keys 0, 1, 3, 4, 6)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, out_dim),
    )


class IDFormer(nn.Module):
    """Identity tokens from ``id_cond`` (b, id_dim) or (b, refs, id_dim) and five EVA-CLIP
    hidden states (b, patches, vit_dim)."""

    def __init__(self, config: IDFormerConfig = IDFormerConfig()):
        super().__init__()
        c = self.config = config
        scale = c.dim**-0.5
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) * scale)
        self.proj_out = nn.Parameter(scale * torch.randn(c.dim, c.output_dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.dim_head, c.heads), feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth)
        )
        for i in range(VIT_ROUNDS):
            setattr(self, f"mapping_{i}", _mapping(c.vit_dim, c.mapping_dim, c.dim))
        self.id_embedding_mapping = _mapping(c.id_dim, c.mapping_dim, c.dim * c.num_id_token)

    def forward(self, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """(b, num_queries, output_dim) identity tokens."""
        c = self.config
        if len(vit_hidden) != VIT_ROUNDS:
            raise ValueError(f"the IDFormer needs {VIT_ROUNDS} EVA-CLIP hidden states, got {len(vit_hidden)}")
        refs = id_cond.shape[1] if id_cond.ndim == 3 else 1
        id_tokens = self.id_embedding_mapping(id_cond).reshape(-1, c.num_id_token * refs, c.dim)
        latents = torch.cat([self.latents.repeat(id_tokens.shape[0], 1, 1), id_tokens], dim=1)
        per_round = c.depth // VIT_ROUNDS
        for i in range(VIT_ROUNDS):
            context = torch.cat([id_tokens, getattr(self, f"mapping_{i}")(vit_hidden[i])], dim=1)
            for attn, ff in self.layers[i * per_round : (i + 1) * per_round]:
                latents = attn(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, : c.num_queries] @ self.proj_out


def tiny_idformer_config(output_dim: int) -> IDFormerConfig:
    """A small IDFormer for tiny runs and tests (same structure, one layer per round)."""
    return IDFormerConfig(
        dim=32,
        depth=5,
        dim_head=8,
        heads=4,
        num_queries=4,
        output_dim=output_dim,
        id_dim=24,
        vit_dim=16,
        mapping_dim=24,
    )
