"""FASA's attention processors: PD's queries attend to PD's own keys and to FD's keys in one softmax.

    S_own = Q_p K_pᵀ/√d,   S_fd = f ⊙ Q_p K_fᵀ/√d + b,   out = softmax([S_own, S_fd]) · [V_p; V_f]

Form ``"code"`` (the released code): f = 1, b_j = ω·M_j inside the mask and −∞ outside
(:func:`key_bias`). Form ``"paper"`` (the NeurIPS paper's Softmax(([1, ωℳ] ⊙ Q_p K̂ᵀ)/√d)·V̂):
f_j = ω·M_j, b = 0 (:func:`key_factor`), so FD's keys outside ℳ enter with logit 0.

The joint softmax is computed as (1 − λ)·out_own + λ·out_fd with λ = σ(lse(S_fd) − lse(S_own))
(:func:`joint_attention`), out_own being diffusers' own SDPA; when every FD key is blocked λ = 0
and the layer equals plain self-attention bit for bit. :class:`FoundationAwareSelfAttention`
(UNet ``attn1``) and :class:`FoundationAwareJointAttention` (FLUX's joint attention, image-token
queries) are installed by context managers that restore the original processors in ``finally``;
the loop names the (query row, key row) pairs with :meth:`FasaState.set_pairs` before each call.
The pass that drives them is :mod:`freecure.stages.fasa`.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ..core.errors import InputError
from .capture import _grid_for, installed_joint_processors, installed_processors
from .projections import is_parallel, joint_projection


@dataclass(frozen=True)
class ByName:
    """The layers whose processor names match any of the fnmatch ``patterns``."""

    patterns: tuple[str, ...]

    def select(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.patterns)]


@dataclass(frozen=True)
class LastBlocks:
    """The last ``fraction`` of the layers in execution order (at least one): a choice by
    position that fits any depth, unlike a hard-coded count."""

    fraction: float

    def select(self, names: Sequence[str]) -> list[str]:
        count = max(1, round(self.fraction * len(names)))
        return list(names[len(names) - count :])


#: Named layer selections per model family (``"unet"``: over the self-attention ``attn1``
#: processors; ``"flux"``: over the joint-attention blocks in execution order, double-stream
#: then single-stream). See docs/engine.md, "FASA".
LAYER_PRESETS: dict[str, dict[str, ByName | LastBlocks]] = {
    # UNet: every self-attention layer of the up path (SD1.5 and SDXL; the default). FLUX: the
    # later half of its blocks (FLUX.1: single-stream blocks 10–37), the decoder-side analogue
    "up": {"unet": ByName(("up_blocks.*.attn1.processor",)), "flux": LastBlocks(1 / 2)},
    # the authors' SDXL scripts: the last 20 of SDXL's 70 transformer blocks in execution
    # order (their layer_idx 50..69), which by name are these
    "authors-sdxl": {
        "unet": ByName(
            (
                "up_blocks.0.attentions.1.transformer_blocks.[6-9].attn1.processor",
                "up_blocks.0.attentions.2.transformer_blocks.*.attn1.processor",
                "up_blocks.1.attentions.*.transformer_blocks.*.attn1.processor",
            )
        )
    },
    # FLUX: the authors' share of the network, their last 20 of 70 blocks (FLUX.1: the last 16
    # of 57, single-stream blocks 22–37)
    "late": {"flux": LastBlocks(20 / 70)},
    "single": {"flux": ByName(("single_transformer_blocks.*",))},
    "double": {"flux": ByName(("transformer_blocks.*",))},
}


def fasa_layers(unet, layers: str | Sequence[str] = "up") -> list[str]:
    """Names of the self-attention (``attn1``) processors FASA replaces, chosen by name."""
    names = [name for name in unet.attn_processors if ".attn1." in name]
    return _choose(names, layers, "unet", "self-attention layer of this UNet")


def flux_blocks(transformer) -> list[str]:
    """The joint-attention processor names of a FLUX transformer in execution order:
    double-stream blocks, then single-stream blocks, each by index."""

    def index(name: str) -> int:
        return int(name.split(".")[1])

    names = list(transformer.attn_processors)
    double = sorted((n for n in names if n.startswith("transformer_blocks.")), key=index)
    single = sorted((n for n in names if n.startswith("single_transformer_blocks.")), key=index)
    return double + single


def joint_fasa_layers(transformer, layers: str | Sequence[str] = "up") -> list[str]:
    """Names of the FLUX joint-attention processors FASA wraps, chosen by preset or name."""
    return _choose(flux_blocks(transformer), layers, "flux", "joint-attention block of this FLUX transformer")


#: How ω and ℳ enter FD's logits: ``"code"``, the released code's additive bias with FD's keys
#: outside ℳ blocked; ``"paper"``, the NeurIPS paper's factor [1, ωℳ] on the logits.
FASA_FORMS = ("code", "paper")


def key_bias(mask: torch.Tensor, weight: float) -> torch.Tensor:
    """b_j = w·M_j where M_j > 0, −∞ where M_j = 0: the logit offset of FD's keys (form ``"code"``)."""
    mask = mask.float()
    return torch.where(mask > 0, weight * mask, torch.full_like(mask, float("-inf")))


def key_factor(mask: torch.Tensor, weight: float) -> torch.Tensor:
    """f_j = ω·M_j: the factor of FD's logits in the paper's Softmax(([1, ωℳ] ⊙ Q_p K̂ᵀ)/√d)·V̂
    (form ``"paper"``). A key outside ℳ gets logit 0: it is not blocked, unlike :func:`key_bias`."""
    return weight * mask.float()


def joint_attention(
    query: torch.Tensor,
    out_own: torch.Tensor,
    key_own: torch.Tensor,
    key_ref: torch.Tensor,
    value_ref: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax([Q K_ownᵀ·s, f ⊙ Q K_refᵀ·s + b])·[V_own; V_ref], from out_own = softmax(Q K_ownᵀ·s)·V_own.

    Shapes: query/keys/values (heads, tokens, d); bias and factor (ref tokens,); no factor is
    f = 1. The joint softmax is (1 − λ)·out_own + λ·out_ref with λ = Z_ref / (Z_own + Z_ref) =
    σ(lse_ref − lse_own).
    """
    q = query.float()
    lse_own = torch.logsumexp(q @ key_own.float().transpose(-1, -2) * scale, dim=-1, keepdim=True)
    logits_ref = q @ key_ref.float().transpose(-1, -2) * scale
    if factor is not None:
        logits_ref = logits_ref * factor.to(q.device)
    logits_ref = logits_ref + bias.to(q.device)
    lse_ref = torch.logsumexp(logits_ref, dim=-1, keepdim=True)
    lam = torch.sigmoid(lse_ref - lse_own)  # exactly 0 where every FD key is blocked
    out_ref = torch.softmax(logits_ref, dim=-1).nan_to_num(0.0) @ value_ref.float()
    mixed = ((1 - lam) * out_own.float() + lam * out_ref).to(out_own.dtype)
    return torch.where(lam > 0, mixed, out_own)


@dataclass
class FasaState:
    """The masks, weight and current row pairs shared by every FASA processor.

    Args:
        mask: M on any grid with the latent's aspect ratio, values in [0, 1]: (h, w) for one
            image, or (n, h, w), one per image of a batch of seeds.
        weight: ω of :func:`key_bias` (form ``"code"``) or :func:`key_factor` (``"paper"``).
        latent_size: (h, w) of the denoiser's image tokens at full resolution (for laying
            each layer's tokens out): the latent grid for a UNet, the packed 2×2 token grid
            for FLUX (:meth:`~freecure.families.ModelFamily.attention_grid`).
        form: ``"code"`` or ``"paper"`` (:data:`FASA_FORMS`).
    """

    mask: torch.Tensor
    weight: float
    latent_size: tuple[int, int]
    form: str = "code"
    pairs: tuple[tuple[int, int, int], ...] = ()
    batch: int | None = None
    record: dict[int, int] = field(default_factory=dict)
    attend: dict[int, tuple[int, int]] = field(default_factory=dict)
    cache: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    _bias: dict[int, torch.Tensor] = field(default_factory=dict)
    _factor: dict[int, torch.Tensor] = field(default_factory=dict)

    def set_pairs(self, pairs: Sequence[tuple[int, ...]], batch: int | None = None) -> None:
        """Declare ``(query row, key row[, image])`` pairs for the next denoiser call (empty:
        plain attention); ``image`` picks the mask of a batch of seeds (default 0, the only
        one); ``batch``: the rows of that call, checked by every processor."""
        self.pairs = tuple((q, k, image[0] if image else 0) for q, k, *image in pairs)
        self.batch = batch

    def set_call(self, record: dict[int, int], attend: dict[int, tuple[int, int]]) -> None:
        """For a backend that splits the engine's rows over calls of its own models
        (Face-diffuser): in the next call, record per layer the keys and values of the rows
        ``record`` (row → the engine's FD row it comes from), and let the rows ``attend``
        (row → (that FD row, image)) attend to the last ones recorded for that FD row at the
        same layer — in this call or an earlier one of the step — with the image's mask. Empty
        dicts end it."""
        self.record, self.attend = dict(record), dict(attend)

    @contextlib.contextmanager
    def mapped_call(self, origin: Sequence[int]) -> Iterator[None]:
        """During one call of a backend that splits the engine's rows over calls of its own
        (Face-diffuser's models; a reference-image model's FD and PD calls): map the engine's
        ``(PD row, FD row, image)`` pairs onto it with :meth:`set_call`. ``origin``: the engine
        row of each row of the call; rows from an FD row record their keys and values, rows from
        a PD row attend to the ones recorded (in this call, or an earlier one of the step)."""
        pairs, batch = self.pairs, self.batch
        record = {i: row for i, row in enumerate(origin) if any(row == fd for _, fd, _ in pairs)}
        attend = {i: (fd, image) for i, row in enumerate(origin) for pd, fd, image in pairs if row == pd}
        self.set_pairs(())  # the engine's row indices do not hold inside this call
        self.set_call(record, attend)
        try:
            yield
        finally:
            self.set_call({}, {})
            self.set_pairs(pairs, batch)

    def cached_bytes(self) -> int:
        """Memory held by the recorded keys and values (one step's, per layer and image)."""
        tensors = [t for by_row in self.cache.values() for kv in by_row.values() for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)

    def check_batch(self, rows: int) -> None:
        """Refuse a layer call whose batch is not the declared one (a backend that split it)."""
        if self.batch is not None and rows != self.batch:
            raise RuntimeError(
                f"FASA declared pairs for a batch of {self.batch} rows but a layer saw {rows}: the backend "
                "split the engine's rows over several denoiser calls (see freecure.fasa.rows_in_one_call)"
            )

    def _resized(self, tokens: int) -> torch.Tensor:
        """Each M resized (nearest) to the grid of a layer with ``tokens`` positions, (images, tokens)."""
        grid = _grid_for(tokens, self.latent_size)
        masks = self.mask.float() if self.mask.ndim == 3 else self.mask.float()[None]
        return F.interpolate(masks[:, None], size=grid, mode="nearest")[:, 0].flatten(1)

    def bias(self, tokens: int) -> torch.Tensor:
        """b for a layer with ``tokens`` query positions, (images, tokens): :func:`key_bias` of
        each resized M (form ``"code"``), zero (``"paper"``)."""
        if tokens not in self._bias:
            resized = self._resized(tokens)
            paper = self.form == "paper"
            self._bias[tokens] = torch.zeros_like(resized) if paper else key_bias(resized, self.weight)
        return self._bias[tokens]

    def factor(self, tokens: int) -> torch.Tensor | None:
        """f for a layer with ``tokens`` query positions, (images, tokens): :func:`key_factor` of
        each resized M (form ``"paper"``); None (a factor of 1) in the ``"code"`` form."""
        if self.form != "paper":
            return None
        if tokens not in self._factor:
            self._factor[tokens] = key_factor(self._resized(tokens), self.weight)
        return self._factor[tokens]


def _out_weight(attn) -> torch.Tensor:
    """The weight that maps the attention output to the block's: ``to_out[0]`` (FLUX.1, FLUX.2
    double-stream); FLUX.2's single-stream ``to_out`` over [attention; MLP], its attention columns."""
    if is_parallel(attn):
        return attn.to_out.weight[:, : attn.inner_dim]
    return attn.to_out[0].weight


def _at(factor: torch.Tensor | None, image: int) -> torch.Tensor | None:
    return None if factor is None else factor[image]


class FoundationAwareSelfAttention:
    """Self-attention processor: diffusers' SDPA for every row, then, for each declared
    ``(query row, key row)`` pair, the query row's output replaced by the joint softmax over
    its own keys and the key row's masked, re-weighted keys."""

    def __init__(self, state: FasaState, name: str):
        self.state = state
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # 1. as diffusers' AttnProcessor2_0 (self-attention: no encoder states, no mask)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)

        # 2. FASA: PD's rows also attend to FD's keys (eq. in the module docstring)
        if (self.state.record or self.state.attend) and encoder_hidden_states is None:  # across calls
            bias, factor = self.state.bias(query.shape[2]), self.state.factor(query.shape[2])
            recorded = self.state.cache.setdefault(self.name, {})
            for row, fd_row in self.state.record.items():
                recorded[fd_row] = (key[row].clone(), value[row].clone())
            out = out.clone()
            for row, (fd_row, image) in self.state.attend.items():
                key_ref, value_ref = recorded[fd_row]
                out[row] = joint_attention(
                    query[row], out[row], key[row], key_ref, value_ref, bias[image], attn.scale, _at(factor, image)
                )
        elif self.state.pairs and encoder_hidden_states is None:
            self.state.check_batch(batch)
            bias, factor = self.state.bias(query.shape[2]), self.state.factor(query.shape[2])
            out = out.clone()
            for q_row, k_row, image in self.state.pairs:  # each PD row: its own image's FD keys and mask
                out[q_row] = joint_attention(
                    query[q_row],
                    out[q_row],
                    key[q_row],
                    key[k_row],
                    value[k_row],
                    bias[image],
                    attn.scale,
                    _at(factor, image),
                )

        # 3. output projection, as AttnProcessor2_0
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def foundation_aware_self_attention(unet, state: FasaState, layers: Sequence[str]) -> Iterator[FasaState]:
    """Install :class:`FoundationAwareSelfAttention` on ``layers`` for the duration of the
    block; the original processors are restored in ``finally``."""
    with installed_processors(unet, layers, lambda name, inner: FoundationAwareSelfAttention(state, name)):
        yield state


class FoundationAwareJointAttention:
    """FLUX attention processor: ``inner`` (the layer's own processor) computes every row —
    FD's rows, text queries, all of it — then, for each declared ``(query row, key row)``
    pair, the query row's image-token queries are re-attended jointly over [their own text and
    image keys; the key row's image keys, masked and re-weighted by b].

    Double-stream blocks pass text and image separately and project the attention output
    (``to_out``) inside the processor: the change is added as ``W_out·(joint − own)`` (the
    output bias cancels), ``own`` being the PD row's plain joint attention recomputed here.
    Single-stream blocks pass [text; image] and return the unprojected output, which is ``own``
    itself and is replaced by the joint softmax. Queries go in chunks of ``chunk_size``, so a
    1024² image (4096 image queries × 8704 keys × 24 heads) never needs its whole logits.
    """

    def __init__(self, inner, state: FasaState, name: str, context, chunk_size: int = 256):
        self.inner = inner
        self.state = state
        self.name = name
        self.context = context
        self.chunk_size = chunk_size

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        **kwargs,
    ):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        state = self.state
        across = bool(state.record or state.attend)
        if not state.pairs and not across:
            return out
        if not across:
            state.check_batch(hidden_states.shape[0])
        if attention_mask is not None:
            raise RuntimeError("FASA on FLUX does not take an attention mask (FluxPipeline passes none)")
        double = encoder_hidden_states is not None
        projected = double or is_parallel(attn)  # the processor applies to_out itself
        text_tokens = encoder_hidden_states.shape[1] if double else self.context.text_tokens
        if text_tokens is None:
            raise RuntimeError(
                "the text length of the FLUX call is unknown: install FASA with foundation_aware_joint_attention"
            )
        image = out[0] if double else out[:, text_tokens:]
        # the target image's tokens; reference tokens read in context (after them) are never
        # masked, never lend keys and keep their own attention
        target = self.context.image_tokens or image.shape[1]
        bias, factor = state.bias(target), state.factor(target)
        if across:
            rows = sorted({*state.record, *state.attend})
        else:
            # a pair whose FD keys are all blocked keeps plain attention: nothing to compute
            pairs = [pair for pair in state.pairs if not torch.isinf(bias[pair[2]]).all()]
            if not pairs:
                return out
            rows = sorted({row for q_row, k_row, _ in pairs for row in (q_row, k_row)})
        at = {row: i for i, row in enumerate(rows)}
        text = encoder_hidden_states[rows] if double else None
        query, key, value = self._projections(attn, hidden_states[rows], text, image_rotary_emb, text_tokens)
        fd_image = slice(text_tokens, text_tokens + target)
        if across:
            recorded = state.cache.setdefault(self.name, {})
            for row, fd_row in state.record.items():
                recorded[fd_row] = (key[at[row], :, fd_image].clone(), value[at[row], :, fd_image].clone())
            attending = [(row, *recorded[fd_row], image_index) for row, (fd_row, image_index) in state.attend.items()]
        else:
            attending = [
                (q_row, key[at[k_row], :, fd_image], value[at[k_row], :, fd_image], index)
                for q_row, k_row, index in pairs
            ]
        image = image.clone()
        for q_row, k_ref, v_ref, index in attending:
            if torch.isinf(bias[index]).all():
                continue
            q = query[at[q_row], :, :target]  # (heads, target queries, d)
            k_own, v_own = key[at[q_row]], value[at[q_row]]  # (heads, text + image (+ reference) keys, d)
            if projected:
                own = F.scaled_dot_product_attention(q[None], k_own[None], v_own[None])[0]
            else:
                own = image[q_row, :target].unflatten(-1, (-1, attn.head_dim)).transpose(0, 1)
            scale = attn.head_dim**-0.5
            mixed = torch.cat(
                [
                    joint_attention(qc, oc, k_own, k_ref, v_ref, bias[index], scale, _at(factor, index))
                    for qc, oc in zip(q.split(self.chunk_size, dim=1), own.split(self.chunk_size, dim=1))
                ],
                dim=1,
            )
            if projected:  # to_out is affine: add W·(joint − own); exactly 0 where nothing changed
                change = (mixed - own).transpose(0, 1).flatten(1)
                image[q_row, :target] = image[q_row, :target] + F.linear(change.to(image.dtype), _out_weight(attn))
            else:
                image[q_row, :target] = mixed.transpose(0, 1).flatten(1).to(image.dtype)
        if double:
            return (image, *out[1:])
        return torch.cat([out[:, :text_tokens], image], dim=1)

    @staticmethod
    def _projections(attn, hidden_states, encoder_hidden_states, rotary, text_tokens: int):
        """The image tokens' queries and the [text; image] keys and values of each row, as the
        layer computes them (:func:`freecure.projections.joint_projection`, float32), each
        (rows, heads, tokens, d)."""
        rows = [
            joint_projection(
                attn,
                hidden_states[r : r + 1],
                None if encoder_hidden_states is None else encoder_hidden_states[r : r + 1],
                rotary,
                text_tokens,
            )
            for r in range(hidden_states.shape[0])
        ]
        return tuple(torch.stack([getattr(row, part) for row in rows]) for part in ("query", "key", "value"))


@contextlib.contextmanager
def foundation_aware_joint_attention(
    transformer, state: FasaState, layers: Sequence[str], chunk_size: int = 256
) -> Iterator[FasaState]:
    """Install :class:`FoundationAwareJointAttention` around the processors of ``layers`` of a
    FLUX transformer for the duration of the block (the originals are restored in
    ``finally``); a pre-hook tells single-stream blocks the text length of each call."""

    def wrap(name, inner, context):
        return FoundationAwareJointAttention(inner, state, name, context, chunk_size)

    with installed_joint_processors(transformer, layers, wrap):
        yield state


def _choose(names: list[str], layers: str | Sequence[str], family: str, what: str) -> list[str]:
    if isinstance(layers, str):
        selection = LAYER_PRESETS[layers].get(family)
        if selection is None:
            fits = [name for name, by_family in LAYER_PRESETS.items() if family in by_family]
            raise InputError(
                f"FASA layer preset {layers!r} is not defined for {family} models; use one of {', '.join(fits)} "
                "or give processor-name patterns"
            )
    else:
        selection = ByName(tuple(layers))
    chosen = selection.select(names)
    if not chosen:
        raise InputError(f"no {what} matches the FASA layers {layers!r}")
    return chosen
