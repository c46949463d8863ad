"""Small modules shared by the identity encoders of PhotoMaker and FastComposer.

PhotoMaker's fuse module descends from FastComposer's post-fuse module: both merge one image
embedding into one text-token embedding as LN(MLP₂(MLP₁([t; i]) + t)), with the same
parameter names (``mlp1``, ``mlp2``, ``layer_norm``; each MLP ``layernorm``, ``fc1``, ``fc2``).
"""

from __future__ import annotations

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
