"""Per-token cross-attention maps of FD and PD by block group (paper §3.2, Figure 3).

A recorder processor wraps an attention layer's own processor (which still computes the
output) and, for FD's and PD's conditional rows, adds the attention probabilities of the
image queries on *every* key column, averaged over the chosen heads, to a
:class:`TokenMapStore`. The store averages over the chosen steps and over the layers of a
block group (UNet: down, mid, up; FLUX: double, single), on the latent grid.

- UNet (:class:`TokenMapRecorder`, on ``attn2``): softmax(QKᵀ/√d) over the text keys; at each
  pixel the maps of all key columns sum to 1.
- FLUX (:class:`JointTokenMapRecorder`, on every joint attention): the image queries'
  softmax over the *joint* keys [text; image], exactly as the layer computes it; a text
  token's map is the joint-softmax mass on its key, *not* renormalised over the text keys —
  the quantity SAME's :class:`freecure.attention.JointAttentionCapture` aggregates into ℳ. One
  extra last column holds the mass on all image keys together, so at each pixel the text
  columns plus that column sum to 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attention.capture import JointContext, _grid_for, installed_joint_processors, installed_processors
from ..attention.projections import cross_attention_logits, joint_projection
from ..core.conditioning import FD, PD
from ..core.guidance import PD_LANE
from ..stages.sampling import same_layout

LANES = ("fd", "pd")
#: Block groups in the order the model runs them (UNet, then FLUX).
GROUP_ORDER = ("down", "mid", "up", "double", "single")


def block_group(name: str) -> str | None:
    """The block group of an attention-processor name: down, mid, up (UNet); double, single (FLUX)."""
    for prefix, group in (
        ("down_blocks.", "down"),
        ("mid_block.", "mid"),
        ("up_blocks.", "up"),
        ("single_transformer_blocks.", "single"),
        ("transformer_blocks.", "double"),
    ):
        if name.startswith(prefix):
            return group
    return None


#: The block groups of the FLUX transformer, where every attention is joint (text ↔ image).
JOINT_GROUPS = ("double", "single")


def cross_attention_groups(model) -> dict[str, list[str]]:
    """The processor names where image queries attend to text keys, by block group, in model
    order: a UNet's cross-attention (``attn2``); every joint attention of a FLUX transformer."""
    groups: dict[str, list[str]] = {group: [] for group in GROUP_ORDER}
    for name in model.attn_processors:
        group = block_group(name)
        if group in JOINT_GROUPS or (group is not None and ".attn2." in name):
            groups[group].append(name)
    return {group: names for group, names in groups.items() if names}


@dataclass
class TokenMapStore:
    """Running sums of FD's and PD's attention over every key column, per layer.

    Args:
        conditions: the run's conditions (to know PD's row at each step).
        latent_size: (h, w) of the latent grid.
        steps: step indices to record; None = every step.
        heads: head indices to average; None = every head.
        approximate_shared_uncond: the SAME layout option of the run.
        guided: whether a lane takes [uncond, cond] rows (CFG) or one row (distilled FLUX).
    """

    conditions: object
    latent_size: tuple[int, int]
    steps: frozenset[int] | None = None
    heads: tuple[int, ...] | None = None
    approximate_shared_uncond: bool = False
    guided: bool = True
    sums: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def set_context(self, step: int, row: int | Sequence[int] | None) -> None:
        """Called by the SAME loop before each UNet call (``row``: FD's conditional row, or
        one per image of a batch: the analyses run one image)."""
        self.rows = {}
        row = single_row(row)
        if row is None or (self.steps is not None and step not in self.steps):
            return
        layout = same_layout(step, self.conditions, self.approximate_shared_uncond, guided=self.guided)
        self.rows = {"fd": row, "pd": pd_row(layout.rows, fallback=row)}

    @contextlib.contextmanager
    def in_call(self, origin: Sequence[int], pd_maps: bool, identity: bool = False) -> Iterator[None]:
        """For a backend that splits the engine's rows over calls of its own models
        (Face-diffuser): during one of its calls, address FD's and PD's rows by their index in
        that call. ``origin``: the engine row of each row of the call; FD's map is the row from
        FD's engine row (only FD's model sees it); PD's the row from PD's engine row in the
        call the backend marks ``pd_maps``. ``identity`` (the call sees c̃) is not needed here."""
        engine = self.rows
        self.rows = {
            lane: origin.index(row)
            for lane, row in engine.items()
            if row in origin and (lane == "fd" or pd_maps)
        }
        try:
            yield
        finally:
            self.rows = engine

    def add(self, lane: str, layer: str, probs: torch.Tensor) -> None:
        key = (lane, layer)
        probs = probs.detach().float()
        if key in self.sums:
            self.sums[key] += probs
            self.counts[key] += 1
        else:
            self.sums[key], self.counts[key] = probs.clone(), 1

    def group_map(self, lane: str, layers: Sequence[str]) -> torch.Tensor:
        """Mean over steps and the given layers at latent resolution: (keys, h, w) (FLUX: text
        keys and the image-key column)."""
        maps = []
        for layer in layers:
            if (lane, layer) not in self.sums:
                continue
            mean = self.sums[lane, layer] / self.counts[lane, layer]
            h, w = _grid_for(mean.shape[0], self.latent_size)
            grid = mean.T.reshape(1, -1, h, w)
            maps.append(F.interpolate(grid, size=self.latent_size, mode="bilinear", align_corners=False)[0])
        if not maps:
            raise RuntimeError(f"no {lane.upper()} cross-attention was recorded in layers {list(layers)[:3]}…")
        return torch.stack(maps).mean(dim=0)


def single_row(row: int | Sequence[int] | None) -> int | None:
    """The capture row of a one-image pass (the loop names one row per image)."""
    if row is None or isinstance(row, int):
        return row
    if len(row) != 1:
        raise ValueError(f"the attention analyses run one image at a time, got capture rows {tuple(row)}")
    return row[0]


def pd_row(rows: Sequence[tuple[int, str]], fallback: int) -> int:
    """PD's conditional row of a layout; before injection with a shared batch, FD's row."""
    for index, (lane, key) in enumerate(rows):
        if lane == PD_LANE and key in (PD, FD):
            return index
    return fallback


class TokenMapRecorder:
    """Attention processor: delegate the output to ``inner``; record FD's and PD's maps."""

    def __init__(self, inner, store: TokenMapStore, name: str):
        self.inner, self.store, self.name = inner, store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.store.rows and encoder_hidden_states is not None:
            self._record(attn, hidden_states, encoder_hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    @torch.no_grad()
    def _record(self, attn, hidden_states, encoder_hidden_states) -> None:
        text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
        for lane, row in self.store.rows.items():
            probs = attention_probs(attn, hidden_states[row : row + 1], text[row : row + 1])
            heads = self.store.heads
            if heads is not None:
                probs = probs[list(heads)]
            self.store.add(lane, self.name, probs.mean(dim=0))


def attention_probs(attn, hidden_states: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ·scale) of one row over the keys, (heads, queries, keys)."""
    return cross_attention_logits(attn, hidden_states, text).softmax(dim=-1)


@contextlib.contextmanager
def record_token_maps(model, store: TokenMapStore, layers: Sequence[str]) -> Iterator[TokenMapStore]:
    """Install :class:`TokenMapRecorder` (UNet) or :class:`JointTokenMapRecorder` (FLUX) on
    ``layers``; originals restored in ``finally``."""
    if is_joint(model):
        with record_joint_token_maps(model, store, layers):
            yield store
        return
    with installed_processors(model, layers, lambda name, inner: TokenMapRecorder(inner, store, name)):
        yield store


# --- FLUX: joint attention over [text; image] ---------------------------------------------
class JointTokenMapRecorder:
    """FLUX attention processor: delegate the output to ``inner``; record FD's and PD's image
    queries' joint softmax on each text key, plus their total mass on the image keys.

    Probabilities are computed ``chunk_size`` queries at a time (a 1024² image has 4096
    image queries × 4608 joint keys × 24 heads).
    """

    def __init__(self, inner, store: TokenMapStore, name: str, text: JointContext, chunk_size: int = 256):
        self.inner, self.store, self.name, self.text, self.chunk_size = inner, store, name, text, chunk_size

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        ip_hidden_states=None,
    ):
        if self.store.rows:
            self._record(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        extra = {} if ip_hidden_states is None else {"ip_hidden_states": ip_hidden_states}
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **extra)

    @torch.no_grad()
    def _record(self, attn, hidden_states, encoder_hidden_states, rotary) -> None:
        for lane, row in self.store.rows.items():
            text = None if encoder_hidden_states is None else encoder_hidden_states[row : row + 1]
            joint = joint_projection(attn, hidden_states[row : row + 1], text, rotary, self.text.text_tokens)
            maps = joint_text_maps(joint, self.store.heads, self.chunk_size, self.text.image_tokens)
            self.store.add(lane, self.name, maps)


def joint_text_maps(
    joint, heads: Sequence[int] | None = None, chunk_size: int = 256, image_tokens: int | None = None
) -> torch.Tensor:
    """(target image queries, text keys + 1, + 1 with references): each text key's joint-softmax
    probability, then the summed probability of the target image's keys and, where the row reads
    reference images in context (keys after the first ``image_tokens`` image keys), of the
    reference keys; averaged over ``heads`` (None: all). Only the target image's queries count."""
    t = joint.text_tokens
    n = joint.query.shape[1] if image_tokens is None else image_tokens
    references = joint.key.shape[1] > t + n
    maps = []
    for start in range(0, n, chunk_size):
        probs = joint.logits(start, min(start + chunk_size, n)).softmax(dim=-1)  # (heads, chunk, joint keys)
        if heads is not None:
            probs = probs[list(heads)]
        probs = probs.mean(dim=0)
        parts = [probs[:, :t], probs[:, t : t + n].sum(dim=-1, keepdim=True)]
        if references:
            parts.append(probs[:, t + n :].sum(dim=-1, keepdim=True))
        maps.append(torch.cat(parts, dim=-1))
    return torch.cat(maps)


def is_joint(model) -> bool:
    """Whether ``model`` is a FLUX transformer (joint attention) rather than a UNet."""
    return any(block_group(name) in JOINT_GROUPS for name in model.attn_processors)


@contextlib.contextmanager
def record_joint_token_maps(transformer, store: TokenMapStore, layers: Sequence[str]) -> Iterator[TokenMapStore]:
    """Install :class:`JointTokenMapRecorder` on ``layers`` of a FLUX transformer."""

    def make(name, inner, text):
        return JointTokenMapRecorder(inner, store, name, text)

    with installed_joint_processors(transformer, layers, make):
        yield store
