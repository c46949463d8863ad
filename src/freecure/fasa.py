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

from .attention import _grid_for, installed_processors
from .backends.base import FD, PD, PD_UNCOND, UNCOND, Backend, Conditions
from .errors import InputError
from .masks import to_latent_resolution
from .sampling import FD_LANE, PD_LANE, BatchLayout, Guidance, SamePassResult, predict_guided

#: Mask sources: the FD image's face-parse region of the attributes (the authors'), or SAME's ℳ.
MASK_SOURCES = ("fd-parse", "same")

#: Named layer selections (fnmatch patterns over the UNet's attention-processor names).
LAYER_PRESETS: dict[str, tuple[str, ...]] = {
    # every self-attention layer of the up path (both SD1.5 and SDXL; the default)
    "up": ("up_blocks.*.attn1.processor",),
    # the authors' SDXL scripts: the last 20 of SDXL's 70 transformer blocks in execution
    # order (their layer_idx 50..69), which by name are these
    "authors-sdxl": (
        "up_blocks.0.attentions.1.transformer_blocks.[6-9].attn1.processor",
        "up_blocks.0.attentions.2.transformer_blocks.*.attn1.processor",
        "up_blocks.1.attentions.*.transformer_blocks.*.attn1.processor",
    ),
}


@dataclass(frozen=True)
class FasaConfig:
    """Settings of the FASA method (``FreeCureConfig.method == "fasa"``).

    Attributes:
        layers: a preset name of :data:`LAYER_PRESETS` or fnmatch patterns over the UNet's
            attention-processor names; only self-attention (``attn1``) layers are used.
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


def fasa_layers(unet, layers: str | Sequence[str] = "up") -> list[str]:
    """Names of the self-attention (``attn1``) processors FASA replaces, chosen by name."""
    patterns = LAYER_PRESETS[layers] if isinstance(layers, str) else tuple(layers)
    names = [name for name in unet.attn_processors if ".attn1." in name]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise InputError(f"no self-attention layer of this UNet matches the FASA layers {layers!r}")
    return chosen


def check_one_batch(backend, what: str = "FASA") -> None:
    """Refuse backends whose PD rows are not rows of the engine's one UNet call.

    FASA (and the attention studies) address FD's and PD's rows by their index in the batch
    the engine builds; a backend that overrides :meth:`Backend.predict_noise` to evaluate PD
    with its own models in separate calls (Face-diffuser's TDM/SDM) breaks that mapping.
    """
    from .backends.base import Backend as _Base

    if type(backend).predict_noise is not _Base.predict_noise:
        raise InputError(
            f"{what} needs FD's and PD's rows in one UNet call, but the {backend.name} backend evaluates PD "
            "with its own models in separate calls; use --method rofa / another backend"
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
        latent_size: (h, w) of the latent grid (for laying each layer's tokens out).
    """

    mask: torch.Tensor
    weight: float
    latent_size: tuple[int, int]
    pairs: tuple[tuple[int, int, int], ...] = ()
    _bias: dict[int, torch.Tensor] = field(default_factory=dict)

    def set_pairs(self, pairs: Sequence[tuple[int, ...]]) -> None:
        """Declare ``(query row, key row[, image])`` pairs for the next UNet call (empty: plain
        attention); ``image`` picks the mask of a batch of seeds (default 0, the only one)."""
        self.pairs = tuple((q, k, image[0] if image else 0) for q, k, *image in pairs)

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
        if self.state.pairs and encoder_hidden_states is None:
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
    """M on the latent grid, (h, w), or None when there is nothing to attend to.

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
        state.set_pairs(step.pairs)
        eps_p = predict_guided(backend, scheduler, step.layout, z, t, i, conditions.get, guidance, image_size)
        z_p = scheduler.step(eps_p, t, z_p, return_dict=False)[0]
        if on_step is not None:
            on_step(i)
    state.set_pairs(())
    return z_p


def fresh_scheduler(scheduler, device=None):
    """A copy of ``scheduler`` reset to step 0 of the same timesteps."""
    fresh = copy.deepcopy(scheduler)
    fresh.set_timesteps(len(scheduler.timesteps), device=device)
    return fresh


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
    factor = pipeline.vae_scale_factor
    latent_size = (image_size[0] // factor, image_size[1] // factor)
    masks: dict[int, torch.Tensor] = {}
    for k, output in enumerate(outputs):
        fd_regions = []
        if output.parse_fd is not None:
            for attribute in output.parsed.localized:
                region = torch.from_numpy(output.parse_fd.mask(attribute.parse_classes))
                if region.any():
                    fd_regions.append(region)
        mask = fasa_mask(config.mask_source, fd_regions, output.mask, latent_size)
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
    layers = fasa_layers(pipeline.unet, config.layers)
    device = freecure.backend.device
    state = FasaState(torch.stack([masks[k] for k in corrected]).to(device), config.mask_weight, latent_size)
    scheduler = fresh_scheduler(pipeline.scheduler, device)
    steps = len(scheduler.timesteps)
    with stages.run("fasa"), freecure._bar(steps, "FASA: PD again") as bar:
        with foundation_aware_self_attention(pipeline.unet, state, layers):
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
    rows = {k: j for j, k in enumerate(corrected)}
    z_out = torch.cat([z_fasa[rows[k]][None] if k in rows else same.pd[k : k + 1] for k in range(len(outputs))])
    for k, image in zip(corrected, decode_latents(pipeline, z_fasa, image_size)):
        outputs[k].images["blended"] = outputs[k].images["freecure"] = image
        outputs[k].latents["blended"] = z_out[k : k + 1]
    return z_out, corrected, reason
