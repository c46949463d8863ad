"""FASA: foundation-aware self-attention, the correction of the authors' released code.

The public FreeCure repository does not ship the paper's noise blending (ROFA, eq. 6); it
ships this variant. In chosen self-attention layers, PD's queries attend to PD's own keys
*and* to FD's keys, in one softmax over both sets (a joint softmax):

    S_own = Q_p K_pᵀ/√d,   S_fd = Q_p K_fᵀ/√d + b,   b_j = w·M_j if M_j > 0 else −∞,
    out   = softmax([S_own, S_fd]) · [V_p; V_f],

where M is the attribute mask laid on FD's key positions and w the mask weight (1.5 in
their scripts): FD's keys inside the mask have their logits raised by w·M_j, those outside
are blocked. FD's own rows keep plain self-attention, so FD's trajectory is unchanged and
is replayed from the SAME pass instead of being run again (see docs/engine.md, "FASA").

Exactness: the joint softmax is computed as a convex combination of the two partial
softmaxes, out = (1 − λ)·out_own + λ·out_fd with λ = σ(lse(S_fd) − lse(S_own)), and out_own
is the very SDPA call of diffusers' ``AttnProcessor2_0``. When every FD key is blocked
λ = 0 exactly and the layer's output equals plain self-attention bit for bit.

The processor is installed with :func:`foundation_aware_self_attention`, which restores the
original processors in ``finally``; ``Attention.forward`` is never replaced. The loop says
which rows are PD (queries) and which are FD (keys) with :meth:`FasaState.set_pairs` before
each UNet call; nothing is inferred by counting calls.

FLUX (:class:`FoundationAwareJointAttention`): FLUX has no separate self-attention; its image
tokens attend jointly to [text; image] keys. PD's *image-token* queries attend to
[PD's own text and image keys; FD's image keys], with the same b on FD's keys (M laid on the
packed 2×2 token grid), the same convex-combination form and the same exactness when every
FD key is blocked; text queries and FD's rows are left to the layer's own processor.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .attention import _grid_for, installed_joint_processors, installed_processors
from .backends.base import FD, PD, PD_UNCOND, UNCOND, Backend, Conditions
from .errors import InputError
from .masks import to_latent_resolution
from .projections import joint_projection
from .sampling import FD_LANE, PD_LANE, BatchLayout, Guidance, SamePassResult, predict_guided

#: Mask sources: the FD image's face-parse region of the attributes (the authors'), or SAME's ℳ.
MASK_SOURCES = ("fd-parse", "same")

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


@dataclass(frozen=True)
class FasaConfig:
    """Settings of the FASA method (``FreeCureConfig.method == "fasa"``).

    Attributes:
        layers: a preset name of :data:`LAYER_PRESETS` (each defined per model family; the
            default ``"up"`` for both) or fnmatch patterns over the denoiser's
            attention-processor names: on a UNet only self-attention (``attn1``) layers are
            used, on FLUX the joint attention of double- and single-stream blocks.
        mask_source: ``"fd-parse"`` (the authors': the attributes' region in the FD image,
            binary) or ``"same"`` (SAME's ℳ of eq. 5, soft).
        mask_weight: w, added to FD's logits inside the mask (the authors' 1.5).
        uncond: also let PD's unconditional row attend to FD's unconditional row (the
            authors' ``style_fidelity = 1`` leaves the unconditional rows plain; so does the
            default). Costs one more batch row.
    """

    layers: str | tuple[str, ...] = "up"
    mask_source: str = "fd-parse"
    mask_weight: float = 1.5
    uncond: bool = False

    def __post_init__(self):
        if self.mask_source not in MASK_SOURCES:
            raise InputError(f"FASA mask source must be one of {', '.join(MASK_SOURCES)}, got {self.mask_source!r}")
        if not math.isfinite(self.mask_weight) or not 0.0 <= self.mask_weight <= 100.0:
            raise InputError(f"FASA mask weight must be a finite number in [0, 100], got {self.mask_weight}")
        if isinstance(self.layers, str) and self.layers not in LAYER_PRESETS:
            raise InputError(
                f"unknown FASA layer preset {self.layers!r}: use one of {', '.join(LAYER_PRESETS)} "
                "or give processor-name patterns"
            )


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


def rows_in_one_call(backend) -> bool:
    """Whether every row of the backend's ``predict_noise`` calls goes through one denoiser
    call: what the backend says with ``rows_in_one_call`` (an attribute or property: True for
    the adapters that only add their inputs to that call, False for Face-diffuser's TDM/SDM and
    for IP-Adapter-FaceID with FD's LoRA off); left unsaid, true only for the default
    ``predict_noise``."""
    from .backends.base import Backend

    declared = getattr(backend, "rows_in_one_call", None)
    if declared is not None:
        return bool(declared)
    return type(backend).predict_noise is Backend.predict_noise


def check_one_batch(backend, what: str = "FASA") -> None:
    """Refuse backends whose PD rows are not rows of the engine's one denoiser call.

    FASA addresses FD's and PD's rows by their index in the batch the engine builds; a
    backend that evaluates PD with its own models in separate calls breaks that mapping
    (:func:`rows_in_one_call`). (FASA also accepts a backend that maps the pairs onto its own
    calls, :attr:`Backend.fasa_across_calls`: Face-diffuser.)
    """
    if not rows_in_one_call(backend):
        raise InputError(
            f"{what} needs FD's and PD's rows in one denoiser call, but the {backend.name} backend splits them "
            "over separate calls of its own models; use --method rofa / another backend"
        )


def key_bias(mask: torch.Tensor, weight: float) -> torch.Tensor:
    """b_j = w·M_j where M_j > 0, −∞ where M_j = 0: the logit offset of FD's keys."""
    mask = mask.float()
    return torch.where(mask > 0, weight * mask, torch.full_like(mask, float("-inf")))


def joint_attention(
    query: torch.Tensor,
    out_own: torch.Tensor,
    key_own: torch.Tensor,
    key_ref: torch.Tensor,
    value_ref: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """softmax([Q K_ownᵀ·s, Q K_refᵀ·s + b])·[V_own; V_ref], from out_own = softmax(Q K_ownᵀ·s)·V_own.

    Shapes: query/keys/values (heads, tokens, d); bias (ref tokens,). The joint softmax is
    (1 − λ)·out_own + λ·out_ref with λ = Z_ref / (Z_own + Z_ref) = σ(lse_ref − lse_own).
    """
    q = query.float()
    lse_own = torch.logsumexp(q @ key_own.float().transpose(-1, -2) * scale, dim=-1, keepdim=True)
    logits_ref = q @ key_ref.float().transpose(-1, -2) * scale + bias.to(q.device)
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
        weight: w of :func:`key_bias`.
        latent_size: (h, w) of the denoiser's image tokens at full resolution (for laying
            each layer's tokens out): the latent grid for a UNet, the packed 2×2 token grid
            for FLUX (:meth:`~freecure.families.ModelFamily.attention_grid`).
    """

    mask: torch.Tensor
    weight: float
    latent_size: tuple[int, int]
    pairs: tuple[tuple[int, int, int], ...] = ()
    batch: int | None = None
    record: dict[int, int] = field(default_factory=dict)
    attend: dict[int, tuple[int, int]] = field(default_factory=dict)
    cache: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    _bias: dict[int, torch.Tensor] = field(default_factory=dict)

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

    def bias(self, tokens: int) -> torch.Tensor:
        """b for a layer with ``tokens`` query positions, (images, tokens): each M resized
        (nearest) to the layer's grid."""
        if tokens not in self._bias:
            grid = _grid_for(tokens, self.latent_size)
            masks = self.mask.float() if self.mask.ndim == 3 else self.mask.float()[None]
            resized = F.interpolate(masks[:, None], size=grid, mode="nearest")[:, 0]
            self._bias[tokens] = key_bias(resized.flatten(1), self.weight)
        return self._bias[tokens]


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
            bias = self.state.bias(query.shape[2])
            recorded = self.state.cache.setdefault(self.name, {})
            for row, fd_row in self.state.record.items():
                recorded[fd_row] = (key[row].clone(), value[row].clone())
            out = out.clone()
            for row, (fd_row, image) in self.state.attend.items():
                key_ref, value_ref = recorded[fd_row]
                out[row] = joint_attention(query[row], out[row], key[row], key_ref, value_ref, bias[image], attn.scale)
        elif self.state.pairs and encoder_hidden_states is None:
            self.state.check_batch(batch)
            bias = self.state.bias(query.shape[2])
            out = out.clone()
            for q_row, k_row, image in self.state.pairs:  # each PD row: its own image's FD keys and mask
                out[q_row] = joint_attention(
                    query[q_row], out[q_row], key[q_row], key[k_row], value[k_row], bias[image], attn.scale
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
        if not self.state.pairs:
            return out
        self.state.check_batch(hidden_states.shape[0])
        if attention_mask is not None:
            raise RuntimeError("FASA on FLUX does not take an attention mask (FluxPipeline passes none)")
        double = encoder_hidden_states is not None
        text_tokens = encoder_hidden_states.shape[1] if double else self.context.text_tokens
        if text_tokens is None:
            raise RuntimeError(
                "the text length of the FLUX call is unknown: install FASA with foundation_aware_joint_attention"
            )
        image = out[0] if double else out[:, text_tokens:]
        bias = self.state.bias(image.shape[1])
        # a pair whose FD keys are all blocked keeps plain attention: nothing to compute
        pairs = [pair for pair in self.state.pairs if not torch.isinf(bias[pair[2]]).all()]
        if not pairs:
            return out
        rows = sorted({row for q_row, k_row, _ in pairs for row in (q_row, k_row)})
        at = {row: i for i, row in enumerate(rows)}
        text = encoder_hidden_states[rows] if double else None
        query, key, value = self._projections(attn, hidden_states[rows], text, image_rotary_emb, text_tokens)
        image = image.clone()
        for q_row, k_row, index in pairs:
            q = query[at[q_row]]  # (heads, image queries, d)
            k_own, v_own = key[at[q_row]], value[at[q_row]]  # (heads, text + image keys, d)
            k_ref, v_ref = key[at[k_row], :, text_tokens:], value[at[k_row], :, text_tokens:]
            if double:
                own = F.scaled_dot_product_attention(q[None], k_own[None], v_own[None])[0]
            else:
                own = image[q_row].unflatten(-1, (-1, attn.head_dim)).transpose(0, 1)
            scale = attn.head_dim**-0.5
            mixed = torch.cat(
                [
                    joint_attention(qc, oc, k_own, k_ref, v_ref, bias[index], scale)
                    for qc, oc in zip(q.split(self.chunk_size, dim=1), own.split(self.chunk_size, dim=1))
                ],
                dim=1,
            )
            if double:  # to_out[0] is affine: add W·(joint − own); exactly 0 where nothing changed
                change = (mixed - own).transpose(0, 1).flatten(1)
                image[q_row] = image[q_row] + F.linear(change.to(image.dtype), attn.to_out[0].weight)
            else:
                image[q_row] = mixed.transpose(0, 1).flatten(1).to(image.dtype)
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


@dataclass(frozen=True)
class FasaLayout:
    """The rows of one FASA step and which rows attend to which: ``(query, key)`` pairs for one
    image, ``(query, key, image)`` for a batch of seeds."""

    layout: BatchLayout
    pairs: tuple[tuple[int, ...], ...]


def fasa_layout(step: int, conditions: Conditions, guided: bool, uncond: bool = False, images: int = 1) -> FasaLayout:
    """Rows of the FASA pass at ``step``: PD's lane (guided), and FD's rows that lend keys.

    Guided: [pd_uncond@PD, pd@PD, fd@FD] (+ [uncond@FD] when ``uncond``); PD's conditional row
    attends to FD's conditional row (and PD's unconditional row to FD's). Before injection
    PD's conditional row carries FD's conditioning, as in the SAME pass.

    ``images`` > 1: the rows of :meth:`BatchLayout.for_images` (row r of image k is r·n + k),
    and each pair repeated per image, ``(q·n + k, key·n + k, k)``: PD's row of image k attends
    to FD's row of the same image only, with that image's mask.
    """
    key = PD if step >= conditions.inject_step else FD
    if not guided:
        one = FasaLayout(BatchLayout(rows=((PD_LANE, key), (FD_LANE, FD)), lanes=((None, 0),)), ((0, 1),))
    else:
        rows = [(PD_LANE, PD_UNCOND), (PD_LANE, key), (FD_LANE, FD)]
        pairs = [(1, 2)]
        if uncond:
            rows.append((FD_LANE, UNCOND))
            pairs.append((0, 3))
        one = FasaLayout(BatchLayout(rows=tuple(rows), lanes=((0, 1),)), tuple(pairs))
    if images == 1:
        return one
    pairs = tuple((q * images + k, r * images + k, k) for q, r in one.pairs for k in range(images))
    return FasaLayout(one.layout.for_images(images), pairs)


def fasa_mask(
    source: str,
    fd_regions: Sequence[torch.Tensor],
    same_mask: torch.Tensor | None,
    latent_size: tuple[int, int],
) -> torch.Tensor | None:
    """M on the grid ``latent_size`` (the family's attention grid), (h, w), or None when there
    is nothing to attend to.

    ``"fd-parse"``: the union of the attributes' regions in the FD image, area-averaged to the
    latent grid and kept where the latent cell lies wholly inside (the authors resize their
    binary mask bilinearly and keep the pixels still at full value). ``"same"``: SAME's ℳ
    (eq. 5) area-averaged to the latent grid, soft.
    """
    if source == "same":
        return None if same_mask is None else to_latent_resolution(same_mask, latent_size)[0, 0]
    if not fd_regions:
        return None
    union = torch.stack([region.float() for region in fd_regions]).amax(dim=0)
    cells = to_latent_resolution(union, latent_size)[0, 0]
    binary = (cells >= 1.0 - 1e-6).float()
    return binary if binary.any() else None


@torch.no_grad()
def fasa_pass(
    backend: Backend,
    scheduler,
    same: SamePassResult,
    conditions: Conditions,
    state: FasaState,
    guidance: Guidance,
    image_size: tuple[int, int],
    uncond: bool = False,
    on_step: Callable[[int], None] | None = None,
    images: Sequence[int] | None = None,
) -> torch.Tensor:
    """The authors' second generation, with FD replayed: PD denoises again from z_T with FASA
    on; FD's latents come from the SAME pass (FASA leaves FD's rows plain, so its trajectory is
    unchanged) and only FD's conditional row is run again, to lend its keys and values.

    Args:
        scheduler: a scheduler set to the SAME pass's timesteps, at step 0 (PD's lanes alone).
        state: the installed processors' state (its masks, one per image run, and weight).
        images: which images of the SAME pass to run (indices into its n images; default all).
            They share every UNet call; ``state``'s j-th mask belongs to ``images[j]``.

    Returns:
        PD's latents z_0 after FASA, shape (len(images), C, H, W).
    """
    if len(same.fd_latents) != len(scheduler.timesteps):
        raise RuntimeError("the SAME pass did not keep FD's latents of every step; FASA needs them")
    index = list(range(same.images)) if images is None else list(images)
    m = len(index)
    z_p = same.fd_latents[0][index].clone()  # PD starts from the same z_T as FD
    guided = guidance.scale != 1.0
    for i, t in enumerate(scheduler.timesteps):
        step = fasa_layout(i, conditions, guided, uncond, images=m)
        z = torch.cat([same.fd_latents[i][index], z_p])  # lanes [FD_0…FD_{m−1} (replayed), PD_0…PD_{m−1}]
        state.set_pairs(step.pairs, batch=len(step.layout.rows))
        eps_p = predict_guided(backend, scheduler, step.layout, z, t, i, conditions.get, guidance, image_size)
        z_p = scheduler.step(eps_p, t, z_p, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    state.set_pairs(())
    return z_p


def fresh_scheduler(scheduler, device=None, family=None, latent_size: tuple[int, int] | None = None):
    """A copy of ``scheduler`` reset to step 0 of the same timesteps (with ``family``: set as the
    family sets them, e.g. FLUX's shifted σ for ``latent_size``)."""
    fresh = copy.deepcopy(scheduler)
    if family is None:
        fresh.set_timesteps(len(scheduler.timesteps), device=device)
    else:
        family.set_timesteps(fresh, len(scheduler.timesteps), device, latent_size)
    return fresh


@contextlib.contextmanager
def _handed_to(backend, state: FasaState) -> Iterator[None]:
    """Let a backend that maps FASA onto its own calls read ``state`` for the block."""
    if not backend.fasa_across_calls:
        yield
        return
    backend.fasa_state = state
    try:
        yield
    finally:
        backend.fasa_state = None


def fasa_stage(
    freecure, outputs, same: SamePassResult, conditions: Conditions, guidance: Guidance, image_size, stages
) -> tuple[torch.Tensor, list[int], str]:
    """Stage 3 of ``method="fasa"``: each image's mask (FD-parse or SAME), then one
    :func:`fasa_pass` for every image that has one, sharing its UNet calls, with the processors
    installed on the chosen layers. Records the ``fasa`` stage in ``stages``.

    Returns:
        PD's latents after FASA, (n, …) (an image with nothing to correct keeps its PD latent
        as is, not re-run), the indices of the corrected images, and why the others were not.
    """
    from .pipeline import decode_latents

    config: FasaConfig = freecure.config.fasa
    pipeline = freecure.pipeline
    family = freecure.backend.family
    latent_size = family.latent_size(pipeline, *image_size)
    grid = family.attention_grid(latent_size)  # UNet: the latent grid; FLUX: its 2×2 token grid
    masks: dict[int, torch.Tensor] = {}
    for k, output in enumerate(outputs):
        fd_regions = []
        if output.parse_fd is not None:
            for attribute in output.parsed.localized:
                region = torch.from_numpy(output.parse_fd.mask(attribute.parse_classes))
                if region.any():
                    fd_regions.append(region)
        mask = fasa_mask(config.mask_source, fd_regions, output.mask, grid)
        if mask is not None:
            masks[k] = output.fasa_mask = mask
    reason = (
        "the prompt names no localized attribute"
        if not outputs[0].parsed.localized
        else f"the {config.mask_source} mask is empty: no attribute region to attend to"
    )
    if not masks:
        stages.skip("fasa", reason)
        return same.pd, [], reason
    corrected = sorted(masks)
    backend = freecure.backend
    device = backend.device
    state = FasaState(torch.stack([masks[k] for k in corrected]).to(device), config.mask_weight, grid)
    scheduler = fresh_scheduler(pipeline.scheduler, device, family, latent_size)
    steps = len(scheduler.timesteps)
    with stages.run("fasa") as record, freecure._bar(steps, "FASA: PD again") as bar:
        with contextlib.ExitStack() as installed:
            for denoiser in backend.fasa_denoisers():
                layers = family.fasa_layers(denoiser, config.layers)
                installed.enter_context(family.foundation_aware_attention(denoiser, state, layers))
            installed.enter_context(_handed_to(backend, state))
            z_fasa = fasa_pass(
                freecure.backend,
                scheduler,
                same,
                conditions,
                state,
                guidance,
                image_size,
                uncond=config.uncond,
                on_step=lambda i: bar.update(),
                images=corrected,
            )
        record.freecure_bytes = state.cached_bytes()  # keys handed across calls (Face-diffuser), else 0
    rows = {k: j for j, k in enumerate(corrected)}
    z_out = torch.cat([z_fasa[rows[k]][None] if k in rows else same.pd[k : k + 1] for k in range(len(outputs))])
    for k, image in zip(corrected, decode_latents(pipeline, z_fasa, image_size)):
        outputs[k].images["blended"] = outputs[k].images["freecure"] = image
        outputs[k].latents["blended"] = z_out[k : k + 1]
    return z_out, corrected, reason
