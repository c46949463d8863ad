"""Small modules shared by the identity encoders of PhotoMaker and FastComposer.

PhotoMaker's fuse module descends from FastComposer's post-fuse module: both merge one image
embedding into one text-token embedding as LN(MLP₂(MLP₁([t; i]) + t)), with the same
parameter names (``mlp1``, ``mlp2``, ``layer_norm``; each MLP ``layernorm``, ``fc1``, ``fc2``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """LayerNorm → Linear → GELU → Linear, plus the input when ``use_residual``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool = True):
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.gelu(self.fc1(self.layernorm(x))))
        return x + y if self.use_residual else y


class FuseModule(nn.Module):
    """t' = LN(MLP₂(MLP₁([t; i]) + t)): a text-token embedding t (width D) absorbs an image
    embedding i of the same width; MLP₁ (2D → D) has no residual, MLP₂ (D → D) has one."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.mlp1 = MLP(2 * embed_dim, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, token_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Rows of ``token_embeds`` and ``image_embeds`` (both (n, D)) pair up one to one."""
        fused = self.mlp1(torch.cat([token_embeds, image_embeds], dim=-1)) + token_embeds
        return self.layer_norm(self.mlp2(fused))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm → Linear → GELU → Linear, no biases in the linears (keys ``0``, ``1``, ``3``)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latent queries attend to [image features; latents] (Flamingo's perceiver attention)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.dim_head, self.heads = dim_head, heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.heads, -1).transpose(1, 2)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        b, length, _ = latents.shape
        q = self._heads(self.to_q(latents))
        k, v = (self._heads(t) for t in self.to_kv(torch.cat([features, latents], dim=-2)).chunk(2, dim=-1))
        # softmax(q·kᵀ/√d), the scale split over q and k and the softmax in float32 (fp16-safe).
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = (weight @ v).transpose(1, 2).reshape(b, length, -1)
        return self.to_out(out)


class FacePerceiverResampler(nn.Module):
    """Refine latent tokens by attending to image features: ``depth`` × (attention + FFN),
    both residual, then a projection and a LayerNorm."""

    def __init__(
        self, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int, output_dim: int, ff_mult: int = 4
    ):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features)
        for attention, ff in self.layers:
            latents = attention(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
