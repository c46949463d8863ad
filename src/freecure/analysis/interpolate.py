"""Eq. 3 of the paper (§3.3, Figures 4 and 10): inject a portion α of FD's cross-attention
into PD's for the identity token's column.

    A^p_{:,m} ← Softmax(α·A^f_{:,n} + (1 − α)·A^p_{:,m})                                (3)

How the softmax is read (the paper leaves it open): A denotes the cross-attention *scores*
QKᵀ/√d before the attention's softmax, and the Softmax of eq. 3 is that same softmax over
the key tokens, taken after the identity column's scores are interpolated. So PD's row of
scores S^p has its columns m replaced by α·S^f_{:,n} + (1 − α)·S^p_{:,m} and is then
normalised over the keys as usual. This reading makes α = 0 leave PD unchanged, keeps every
row a distribution over the keys, and at α = 1 gives the identity column exactly FD's
placeholder scores. (Mixing probabilities and applying a *further* softmax over the spatial
positions, the literal alternative, would flatten every map to ≈1/(h·w) and not give PD back
at α = 0.)

FLUX (joint attention, :class:`JointIdentityInterpolation`): S is the image queries' score
matrix on the joint keys [text; image]; the identity token is a text key (T5 column m), and
the same replacement is made before the joint softmax, over all joint keys. The text queries'
rows (the text stream attending to the identity) are left as they are, as in the UNet, where
only image queries attend to the text.

Exactness: the processor leaves the layer's own output untouched and adds the change,
(softmax(S') − softmax(S))·V projected by ``to_out`` (FLUX's single-stream blocks have no
``to_out`` inside the attention); at α = 0, S' = S bit for bit, so the change is exactly zero
and PD is reproduced exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..attention.capture import installed_joint_processors, installed_processors
from ..attention.projections import cross_attention_logits, cross_value, joint_projection
from ..stages.sampling import same_layout
from .maps import is_joint, pd_row, single_row


def interpolate_scores(
    scores_p: torch.Tensor, scores_f: torch.Tensor, pairs: Sequence[tuple[int, int]], alpha: float
) -> torch.Tensor:
    """S^p with S^p_{:,m} ← α·S^f_{:,n} + (1 − α)·S^p_{:,m} for each (m, n) (eq. 3 before its softmax).

    Shapes: (..., queries, keys) for both.
    """
    out = scores_p.clone()
    for m, n in pairs:
        out[..., m] = alpha * scores_f[..., n] + (1 - alpha) * scores_p[..., m]
    return out


@dataclass
class InterpolationState:
    """α, the (m, n) column pairs, and which rows are PD and FD in the current UNet call."""

    conditions: object
    alpha: float
    pairs: tuple[tuple[int, int], ...]
    approximate_shared_uncond: bool = False
    guided: bool = True  # CFG rows per lane (False: guidance-distilled FLUX, one row)
    rows: tuple[int, int] | None = None  # (PD row, FD row)
    #: across calls (Face-diffuser): (PD row, FD row) of the current call, either None when the
    #: call holds no such row; FD's scores per layer handed from FD's call to PD's
    call: tuple[int | None, int | None] | None = None
    fd_scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def set_context(self, step: int, row: int | None) -> None:
        """Called by the SAME loop: active from the injection step on (PD has no identity before)."""
        self.rows = None
        self.fd_scores = {}  # one step's hand-over
        row = single_row(row)
        if row is None or step < self.conditions.inject_step:
            return
        layout = same_layout(step, self.conditions, self.approximate_shared_uncond, guided=self.guided)
        pd = pd_row(layout.rows, fallback=row)
        if pd != row:
            self.rows = (pd, row)

    @contextlib.contextmanager
    def in_call(self, origin: Sequence[int], pd_maps: bool = False, identity: bool = False) -> Iterator[None]:
        """For a backend that splits the engine's rows over calls of its own models
        (Face-diffuser): during one of its calls, FD's row (from FD's engine row) records its
        scores, and PD's row (from PD's engine row, only in a call that sees the identity
        token, ``identity``) gets eq. 3 with the scores FD's call of this step recorded."""
        engine = self.rows
        self.rows = None  # engine indices do not hold inside this call
        if engine is not None:
            pd, fd = engine
            self.call = (
                origin.index(pd) if identity and pd in origin else None,
                origin.index(fd) if fd in origin else None,
            )
        try:
            yield
        finally:
            self.rows, self.call = engine, None


class IdentityInterpolation:
    """Cross-attention processor: the layer's own output, plus the change eq. 3 makes to PD's row."""

    def __init__(self, inner, state: InterpolationState, name: str):
        self.inner, self.state, self.name = inner, state, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if self.state.rows is None or encoder_hidden_states is None:
            return out
        if hidden_states.ndim != 3:
            raise ValueError(f"{self.name}: eq. 3 interpolation expects (batch, tokens, channels) hidden states")
        pd, fd = self.state.rows
        with torch.no_grad():
            out = out.clone()
            out[pd] = out[pd] + self.change(attn, hidden_states, encoder_hidden_states, pd, fd)
        return out

    def change(self, attn, hidden_states, text, pd: int, fd: int) -> torch.Tensor:
        """to_out-projected (softmax(S') − softmax(S))·V_p for PD's row, (queries, channels)."""
        text = text[0] if isinstance(text, tuple) else text
        scores_f = cross_attention_logits(attn, hidden_states[fd : fd + 1], text[fd : fd + 1])
        return self.change_from(attn, hidden_states, text, pd, scores_f)

    def change_from(self, attn, hidden_states, text, pd: int, scores_f: torch.Tensor) -> torch.Tensor:
        """:meth:`change` with FD's scores S^f given, (heads, queries, keys)."""
        text = text[0] if isinstance(text, tuple) else text
        scores_p = cross_attention_logits(attn, hidden_states[pd : pd + 1], text[pd : pd + 1])
        mixed = interpolate_scores(scores_p, scores_f, self.state.pairs, self.state.alpha)
        delta = mixed.softmax(dim=-1) - scores_p.softmax(dim=-1)  # (heads, queries, keys)
        value = cross_value(attn, text[pd : pd + 1])
        change = attn.batch_to_head_dim(delta @ value)[0]  # (queries, heads·d)
        projected = change.to(attn.to_out[0].weight.dtype) @ attn.to_out[0].weight.T  # linear, no bias
        return (projected / attn.rescale_output_factor).to(hidden_states.dtype)


class HandedIdentityInterpolation(IdentityInterpolation):
    """:class:`IdentityInterpolation` across calls (Face-diffuser): in FD's call it records FD's
    scores S^f at this layer; in the call that sees the identity token it adds eq. 3's change
    to PD's row with them (:meth:`InterpolationState.in_call`)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if self.state.call is None or encoder_hidden_states is None:
            return out
        if hidden_states.ndim != 3:
            raise ValueError(f"{self.name}: eq. 3 interpolation expects (batch, tokens, channels) hidden states")
        pd, fd = self.state.call
        text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
        with torch.no_grad():
            if fd is not None:
                self.state.fd_scores[self.name] = cross_attention_logits(
                    attn, hidden_states[fd : fd + 1], text[fd : fd + 1]
                )
            if pd is not None:
                if self.name not in self.state.fd_scores:
                    raise RuntimeError(f"{self.name}: PD's call came before FD's call of the step recorded its scores")
                out = out.clone()
                out[pd] = out[pd] + self.change_from(attn, hidden_states, text, pd, self.state.fd_scores[self.name])
        return out


@contextlib.contextmanager
def interpolate_across_calls(models, state: InterpolationState, layers: Sequence[str]) -> Iterator[InterpolationState]:
    """Install :class:`HandedIdentityInterpolation` on ``layers`` of each UNet of a backend that
    splits its rows over calls (FD's model records, the identity model applies)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(
                installed_processors(model, layers, lambda name, inner: HandedIdentityInterpolation(inner, state, name))
            )
        yield state


@contextlib.contextmanager
def interpolate_identity(model, state: InterpolationState, layers: Sequence[str]) -> Iterator[InterpolationState]:
    """Install :class:`IdentityInterpolation` (UNet) or :class:`JointIdentityInterpolation`
    (FLUX) on ``layers``; originals restored in ``finally``."""
    if is_joint(model):
        with installed_joint_processors(
            model, layers, lambda name, inner, text: JointIdentityInterpolation(inner, state, name, text)
        ):
            yield state
        return
    with installed_processors(model, layers, lambda name, inner: IdentityInterpolation(inner, state, name)):
        yield state


class JointIdentityInterpolation:
    """FLUX attention processor: the layer's own output, plus the change eq. 3 makes to PD's
    image queries (scores of the identity text keys m replaced before the joint softmax)."""

    def __init__(self, inner, state: InterpolationState, name: str, text, chunk_size: int = 256):
        self.inner, self.state, self.name, self.text, self.chunk_size = inner, state, name, text, chunk_size

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        ip_hidden_states=None,
    ):
        extra = {} if ip_hidden_states is None else {"ip_hidden_states": ip_hidden_states}
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **extra)
        if self.state.rows is None:
            return out
        pd, fd = self.state.rows
        with torch.no_grad():
            change = self.change(attn, hidden_states, encoder_hidden_states, image_rotary_emb, pd, fd)
            if isinstance(out, tuple):  # double-stream: (image, text) outputs, each through its to_out
                image = out[0].clone()
                projected = change.to(attn.to_out[0].weight.dtype) @ attn.to_out[0].weight.T  # linear, no bias
                image[pd] = image[pd] + projected.to(image.dtype)
                return (image, *out[1:])
            out = out.clone()  # single-stream: [text; image] before the block's proj_out
            t = out.shape[1] - change.shape[0]
            out[pd, t:] = out[pd, t:] + change.to(out.dtype)
            return out

    def change(self, attn, hidden_states, encoder_hidden_states, rotary, pd: int, fd: int) -> torch.Tensor:
        """(softmax(S') − softmax(S))·V_p for PD's image queries, (image tokens, heads·d)."""

        def row(r):
            text = None if encoder_hidden_states is None else encoder_hidden_states[r : r + 1]
            return joint_projection(attn, hidden_states[r : r + 1], text, rotary, self.text.text_tokens)

        joint_p, joint_f = row(pd), row(fd)
        changes = []
        for start in range(0, joint_p.query.shape[1], self.chunk_size):
            scores_p = joint_p.logits(start, start + self.chunk_size)
            scores_f = joint_f.logits(start, start + self.chunk_size)
            mixed = interpolate_scores(scores_p, scores_f, self.state.pairs, self.state.alpha)
            delta = mixed.softmax(dim=-1) - scores_p.softmax(dim=-1)  # (heads, chunk, joint keys)
            changes.append((delta @ joint_p.value).transpose(0, 1).flatten(1))  # (chunk, heads·d)
        return torch.cat(changes)
