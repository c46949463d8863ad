"""Queries, keys and values of one batch row, as an attention layer computes them: the one
place the analyses, the SAME pass's FLUX capture and FASA on FLUX project a row (Stable Diffusion's
cross-attention, FLUX's joint attention).

UNet cross-attention: image queries against the text keys. FLUX joint attention: image
queries against the joint key set [text; image] (text first), RMS-normed and rotary-embedded
exactly as diffusers' ``FluxAttnProcessor`` does (composed from diffusers' ``apply_rotary_emb``
and the layer's own projections and norms). Everything is returned in float32, per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.embeddings import apply_rotary_emb


def cross_query_key(attn, hidden_states: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) of one row of a UNet cross-attention layer, (heads, tokens, d) each."""
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        text = attn.norm_encoder_hidden_states(text)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states)).float()
    key = attn.head_to_batch_dim(attn.to_k(text)).float()
    return query, key


def cross_value(attn, text: torch.Tensor) -> torch.Tensor:
    """Values of one row of a UNet cross-attention layer, (heads, keys, d)."""
    if attn.norm_cross:
        text = attn.norm_encoder_hidden_states(text)
    return attn.head_to_batch_dim(attn.to_v(text)).float()


def cross_attention_logits(attn, hidden_states: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """QKᵀ·scale of one row, (heads, queries, keys), as the layer computes it."""
    query, key = cross_query_key(attn, hidden_states, text)
    return query @ key.transpose(-1, -2) * attn.scale


@dataclass(frozen=True)
class JointProjection:
    """One row of a FLUX joint attention, per head (float32).

    Attributes:
        query: the image tokens' queries, (heads, image tokens, d).
        key: the joint keys [text; image], (heads, text + image tokens, d).
        value: the joint values, same layout as ``key``.
        text_tokens: how many of the joint keys are text (they come first).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor | None
    text_tokens: int

    @property
    def scale(self) -> float:
        return self.query.shape[-1] ** -0.5  # SDPA's default, which FLUX's processor uses

    def logits(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """QKᵀ/√d for image queries ``start:stop``, (heads, queries, joint keys)."""
        return self.query[:, start:stop] @ self.key.transpose(1, 2) * self.scale


def is_parallel(attn) -> bool:
    """Whether ``attn`` is FLUX.2's single-stream attention, whose one projection
    ``to_qkv_mlp_proj`` gives queries, keys, values and the MLP's input together and whose
    processor projects [attention; MLP] out with one ``to_out``."""
    return hasattr(attn, "to_qkv_mlp_proj")


def single_stream_qkv(attn, hidden_states: torch.Tensor):
    """Queries, keys and values of FLUX.2's single-stream attention over its whole [text; image]
    sequence: the first three ``inner_dim`` slices of ``to_qkv_mlp_proj``, as
    ``Flux2ParallelSelfAttnProcessor`` splits them."""
    qkv = attn.to_qkv_mlp_proj(hidden_states)[..., : 3 * attn.inner_dim]
    return qkv.chunk(3, dim=-1)


def joint_projection(
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    rotary,
    text_tokens: int | None,
    values: bool = True,
) -> JointProjection:
    """:class:`JointProjection` of one row (``hidden_states`` (1, tokens, channels)); with
    ``values=False`` its ``value`` is None (the maps need queries and keys only).

    Double-stream blocks pass text (``encoder_hidden_states``) and image separately, text with
    its own projections; single-stream blocks pass [text; image] concatenated, and
    ``text_tokens`` (the transformer call's text length) says where the image starts.
    """

    def heads(x):
        return x.unflatten(-1, (-1, attn.head_dim))  # (1, tokens, heads, d)

    if encoder_hidden_states is not None:
        text_tokens = encoder_hidden_states.shape[1]
        image = hidden_states
        key = torch.cat(
            [
                attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))),
                attn.norm_k(heads(attn.to_k(image))),
            ],
            dim=1,
        )
        value = (
            torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), heads(attn.to_v(image))], dim=1)
            if values
            else None
        )
        query = attn.norm_q(heads(attn.to_q(image)))
    else:
        if text_tokens is None:
            raise RuntimeError(
                "the text length of the FLUX call is unknown: install the processors with "
                "freecure.attention.installed_joint_processors"
            )
        if is_parallel(attn):
            q, k, v = single_stream_qkv(attn, hidden_states)
            q = q[:, text_tokens:]
        else:  # FLUX.1: the image's queries projected alone, as before
            q, k, v = attn.to_q(hidden_states[:, text_tokens:]), attn.to_k(hidden_states), attn.to_v(hidden_states)
        key = attn.norm_k(heads(k))
        value = heads(v) if values else None
        query = attn.norm_q(heads(q))
    if rotary is not None:
        cos, sin = rotary
        key = apply_rotary_emb(key, (cos, sin), sequence_dim=1)
        query = apply_rotary_emb(query, (cos[text_tokens:], sin[text_tokens:]), sequence_dim=1)

    def per_head(x):
        return x[0].transpose(0, 1).float()  # (heads, tokens, d)

    value = None if value is None else per_head(value)
    return JointProjection(per_head(query), per_head(key), value, int(text_tokens))
