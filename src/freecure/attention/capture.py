"""Capture of FD's cross-attention maps for SAME (paper §3.2 and §4.1).

Stable Diffusion: :func:`capture_cross_attention` on the UNet's up-block cross-attention.
FLUX: :func:`capture_joint_attention` on the transformer's joint attention, where the image
queries attend to [text; image] keys and only the text columns are kept.

A :class:`CrossAttentionCapture` processor wraps whatever processor a cross-attention layer
already has (SDPA's ``AttnProcessor2_0``, an IP-Adapter processor, …): the wrapped
processor still computes the layer's output, and the wrapper additionally computes
softmax(QKᵀ/√d) for the one batch row that holds FD's conditional branch, keeps only the
attribute tokens' columns, averages over heads and adds the result to an
:class:`AttentionStore`. Layers that are not captured keep their processor untouched.

The denoising loop tells the store which step and which batch row it is running
(:meth:`AttentionStore.set_context`) before each UNet call; nothing is inferred by counting
calls.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .projections import is_parallel, joint_projection

AGGREGATIONS = ("per_resolution", "per_layer")


@dataclass
class AttentionStore:
    """Running sums of captured cross-attention maps, keyed by layer name.

    Args:
        token_indices: columns of the text sequence to keep (the attribute tokens).
        latent_size: (h, w) of the latent grid; maps of every layer are reshaped to their own
            grid of the same aspect ratio and resized to this size when aggregated.
        aggregation: how :meth:`aggregate` weighs the layers. ``"per_resolution"`` (default):
            mean over the layers of each resolution, then mean over resolutions, so every
            resolution counts equally; ``"per_layer"``: one mean over all layers. They agree
            when every resolution has as many layers (SD1.5: 3 each); on SDXL's up blocks
            (30 layers at 32², 6 at 64² for 1024²) per-layer lets the coarse layers dominate.

    Several images (seeds) in one pass: the context names one capture row per image and each
    sum gains a leading image axis, (images, query_tokens, tokens); ``image`` picks one in
    :meth:`layer_map`, :meth:`aggregate` and :meth:`token_map`. With one row the sums stay
    (query_tokens, tokens).
    """

    token_indices: tuple[int, ...]
    latent_size: tuple[int, int]
    aggregation: str = "per_resolution"
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    steps_seen: set[int] = field(default_factory=set)
    step: int | None = None
    row: int | tuple[int, ...] | None = None

    def set_context(self, step: int, row: int | Sequence[int] | None) -> None:
        """Declare the step being run and the batch row(s) to capture, one per image (None:
        capture nothing)."""
        self.step, self.row = step, row if row is None or isinstance(row, int) else tuple(row)
        if row is not None:
            self.steps_seen.add(step)

    @property
    def rows(self) -> tuple[int, ...]:
        """The capture rows of the current call, one per image; () when nothing is captured."""
        if self.row is None:
            return ()
        return (self.row,) if isinstance(self.row, int) else self.row

    @contextlib.contextmanager
    def in_call(self, origin: Sequence[int]) -> Iterator[None]:
        """For a backend that splits the engine's rows over several denoiser calls (a
        reference-image model: FD's rows without the reference tokens, PD's with them): during
        one of its calls, capture the rows of this call that come from the capture rows
        (``origin``: the engine row of each row of the call); nothing in a call without them."""
        engine = self.row
        if engine is not None:
            wanted = (engine,) if isinstance(engine, int) else engine
            here = tuple(origin.index(row) for row in wanted if row in origin)
            if here and len(here) != len(wanted):
                raise RuntimeError(f"the capture rows {wanted} were split over calls ({list(origin)} in this one)")
            self.row = here or None
        try:
            yield
        finally:
            self.row = engine

    def add(self, layer: str, probs: torch.Tensor) -> None:
        """Add one layer's head-averaged attention, shape (query_tokens, len(token_indices)),
        or (images, query_tokens, len(token_indices)) for several capture rows."""
        probs = probs.detach().float()
        if probs.ndim == 3 and probs.shape[0] == 1:
            probs = probs[0]
        # The count is a tensor updated in place, not a Python int: under torch.compile an int
        # would be guarded on by value and every step would compile a new graph.
        if layer in self.sums:
            self.sums[layer] += probs
            self.counts[layer] += 1
        else:
            self.sums[layer] = probs.clone()
            self.counts[layer] = torch.ones((), dtype=probs.dtype, device=probs.device)

    def layer_map(self, layer: str, image: int = 0) -> torch.Tensor:
        """Mean over steps of one layer: (h, w, tokens) on that layer's own grid."""
        mean = self.sums[layer] / self.counts[layer]
        if mean.ndim == 3:
            mean = mean[image]
        elif image != 0:
            raise IndexError(f"one image was captured, not image {image}")
        h, w = _grid_for(mean.shape[0], self.latent_size)
        return mean.reshape(h, w, -1)

    def aggregate(self, image: int = 0) -> torch.Tensor:
        """Mean over heads, steps and layers at latent resolution: (tokens, h, w).

        Layers are averaged per resolution, then across resolutions (``aggregation=
        "per_resolution"``), or all together (``"per_layer"``).
        """
        if not self.sums:
            raise RuntimeError("no cross-attention was captured: no capture layer ran with a capture row set")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        groups: dict[tuple[int, int], list[torch.Tensor]] = {}
        for layer in self.sums:
            grid = self.layer_map(layer, image)
            key = tuple(grid.shape[:2]) if self.aggregation == "per_resolution" else (0, 0)
            grid = grid.permute(2, 0, 1)[None]  # (1, tokens, h, w)
            resized = F.interpolate(grid, size=self.latent_size, mode="bilinear", align_corners=False)
            groups.setdefault(key, []).append(resized[0])
        return torch.stack([torch.stack(maps).mean(dim=0) for maps in groups.values()]).mean(dim=0)

    def token_map(self, columns: Sequence[int], image: int = 0) -> torch.Tensor:
        """H_i: the aggregated map averaged over the given prompt columns, shape (h, w)."""
        positions = [self.token_indices.index(column) for column in columns]
        return self.aggregate(image)[positions].mean(dim=0)

    def stored_bytes(self) -> int:
        """Memory held by the running sums (FreeCure's own, beyond the model's)."""
        return sum(t.numel() * t.element_size() for t in self.sums.values())


def _grid_for(tokens: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of ``tokens`` query positions with the latent's aspect ratio."""
    height, width = latent_size
    scale = math.sqrt(height * width / tokens)
    h, w = round(height / scale), round(width / scale)
    if h * w != tokens:
        raise ValueError(f"cannot lay {tokens} query tokens on a grid shaped like {latent_size}")
    return h, w


class CrossAttentionCapture:
    """Attention processor: delegate the output to ``inner``, record FD's attention maps."""

    def __init__(self, inner, store: AttentionStore, name: str):
        self.inner = inner
        self.store = store
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows = self.store.rows
        if rows and encoder_hidden_states is not None:
            self._record(attn, hidden_states[list(rows)], encoder_hidden_states, rows)
        extra = {} if ip_adapter_masks is None else {"ip_adapter_masks": ip_adapter_masks}
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **extra)

    @torch.no_grad()
    def _record(self, attn: Attention, hidden_states, encoder_hidden_states, rows: tuple[int, ...]) -> None:
        text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
        text = text[list(rows)]
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(text))
        probs = attn.get_attention_scores(query, key)  # (rows·heads, queries, keys), row-major
        probs = probs.unflatten(0, (len(rows), -1))
        columns = list(self.store.token_indices)
        self.store.add(self.name, probs[..., columns].mean(dim=1))


@contextlib.contextmanager
def installed_processors(model, layers: Sequence[str], make: Callable[[str, object], object]) -> Iterator[None]:
    """Give each of ``layers`` the processor ``make(name, its current processor)`` for the
    duration of the block; every processor of ``model`` is restored in ``finally``, even when
    generation raises. The one way FreeCure's processors (capture, FASA, the analyses) go in."""
    original = dict(model.attn_processors)
    processors = dict(original)
    for name in layers:
        processors[name] = make(name, original[name])
    model.set_attn_processor(processors)
    try:
        yield
    finally:
        model.set_attn_processor(original)


def up_block_cross_attention_layers(unet) -> list[str]:
    """Names of the cross-attention processors (``attn2``) in the UNet's up-sampling blocks."""
    return [name for name in unet.attn_processors if name.startswith("up_blocks.") and ".attn2." in name]


@contextlib.contextmanager
def capture_cross_attention(
    unet, store: AttentionStore, layers: Sequence[str] | None = None
) -> Iterator[AttentionStore]:
    """Install :class:`CrossAttentionCapture` on ``layers`` (default: up-block cross-attention)
    for the duration of the block; the original processors are restored in ``finally``."""
    layers = list(layers) if layers is not None else up_block_cross_attention_layers(unet)
    if not layers:
        raise ValueError("the UNet has no cross-attention layers in its up-sampling blocks to capture")
    with installed_processors(unet, layers, lambda name, inner: CrossAttentionCapture(inner, store, name)):
        yield store


# --- FLUX: joint attention over [text; image] ---------------------------------------------
@dataclass
class JointContext:
    """Shared by the FLUX processors of one transformer: the current call's text length
    (single-stream blocks see [text; image] as one sequence and need it)."""

    text_tokens: int | None = None
    #: how many of the call's image tokens belong to the target image; the rest are reference
    #: images read in context (FLUX.1 Kontext, FLUX.2), appended after them
    image_tokens: int | None = None


def target_tokens(img_ids: torch.Tensor | None) -> int | None:
    """How many image tokens of a FLUX call belong to the target image: those whose position id
    has image index 0 (FLUX.1 Kontext gives its reference index 1, FLUX.2 a time offset of 10
    per reference; the ids are how the model itself tells them apart). None without ids."""
    if img_ids is None:
        return None
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    return int((ids[:, 0] == 0).sum())


class JointAttentionCapture:
    """FLUX attention processor: delegate the output to ``inner``, record FD's attention maps.

    FLUX attends jointly: keys are [text; image]. For the batch row holding FD, the image
    queries' softmax over the *joint* key set is computed (exactly as the layer computes it:
    RMS-normed, rotary-embedded queries and keys, scale 1/√d), in chunks of ``chunk_size``
    queries so that a 1024² image (4096 image × 4608 joint tokens × 24 heads) never needs its
    whole probability tensor at once; only the attribute tokens' text columns are kept,
    averaged over heads. Double-stream blocks pass text and image separately; single-stream
    blocks pass them concatenated, and the text length comes from the transformer call.
    """

    def __init__(self, inner, store: AttentionStore, name: str, context: JointContext, chunk_size: int = 256):
        self.inner = inner
        self.store = store
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
        ip_hidden_states=None,
    ):
        rows = self.store.rows
        if rows:
            self._record(attn, hidden_states, encoder_hidden_states, image_rotary_emb, rows)
        extra = {} if ip_hidden_states is None else {"ip_hidden_states": ip_hidden_states}
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **extra)

    @torch.no_grad()
    def _record(self, attn, hidden_states, encoder_hidden_states, rotary, rows: tuple[int, ...]) -> None:
        """One row at a time (each image's probabilities are computed in query chunks)."""
        self.store.add(
            self.name,
            torch.stack([self._row_map(attn, hidden_states, encoder_hidden_states, rotary, row) for row in rows]),
        )

    def _row_map(self, attn, hidden_states, encoder_hidden_states, rotary, row: int) -> torch.Tensor:
        text = None if encoder_hidden_states is None else encoder_hidden_states[row : row + 1]
        joint = joint_projection(
            attn, hidden_states[row : row + 1], text, rotary, self.context.text_tokens, values=False
        )
        query, key = joint.query, joint.key  # (heads, image queries, d), (heads, joint keys, d)
        columns = list(self.store.token_indices)
        scale = 1.0 / math.sqrt(query.shape[-1])
        maps = []
        for chunk in query.split(self.chunk_size, dim=1):
            probs = torch.softmax(chunk @ key.transpose(1, 2) * scale, dim=-1)  # (heads, chunk, joint)
            maps.append(probs[:, :, columns].mean(dim=0))
        return torch.cat(maps)


def double_stream_attention_layers(transformer) -> list[str]:
    """Names of the joint-attention processors of FLUX's double-stream blocks."""
    return [name for name in transformer.attn_processors if name.startswith("transformer_blocks.")]


@contextlib.contextmanager
def capture_joint_attention(
    transformer, store: AttentionStore, layers: Sequence[str] | None = None, chunk_size: int = 256
) -> Iterator[AttentionStore]:
    """Install :class:`JointAttentionCapture` on ``layers`` of a FLUX transformer (default: every
    double-stream block) for the duration of the block. Every other processor is left as it is
    (the fast SDPA path); the originals are restored in ``finally``."""
    layers = list(layers) if layers is not None else double_stream_attention_layers(transformer)
    unknown = [name for name in layers if name not in transformer.attn_processors]
    if not layers or unknown:
        raise ValueError(f"no such FLUX attention processors to capture: {unknown or 'none given'}")
    def capture(name, inner, context):
        return JointAttentionCapture(inner, store, name, context, chunk_size)

    with installed_joint_processors(transformer, layers, capture):
        yield store


@contextlib.contextmanager
def installed_joint_processors(transformer, layers: Sequence[str], make) -> Iterator[JointContext]:
    """:func:`installed_processors` for FLUX joint attention: ``make(name, inner, context)`` on
    ``layers``, with a forward pre-hook telling ``context`` each call's text length; processors
    and hook removed in ``finally``."""
    context = JointContext()

    def build(name, inner):
        if is_parallel(_attention_module(transformer, name)):  # FLUX.2's single-stream blocks
            return _ParallelCall(make(name, _Flux1Call(inner), context))
        return make(name, inner, context)

    def text_length(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states")
        context.text_tokens = None if text is None else int(text.shape[1])
        context.image_tokens = target_tokens(kwargs.get("img_ids"))

    with installed_processors(transformer, layers, build):
        handle = transformer.register_forward_pre_hook(text_length, with_kwargs=True)
        try:
            yield context
        finally:
            handle.remove()


def _attention_module(model, processor_name: str):
    """The attention module a processor name (``"….attn.processor"``) belongs to."""
    module = model
    for part in processor_name.split(".")[:-1]:
        module = getattr(module, part)
    return module


class _ParallelCall:
    """FLUX.2's single-stream attention calls its processor as ``(attn, hidden_states,
    attention_mask, image_rotary_emb)``; FreeCure's joint processors take FLUX.1's ``(attn,
    hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)``: this sits between."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, **kwargs):
        return self.processor(attn, hidden_states, None, attention_mask, image_rotary_emb, **kwargs)


class _Flux1Call:
    """The other way round: FLUX.2's own single-stream processor called FLUX.1-style by FreeCure's."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs
    ):
        return self.inner(attn, hidden_states, attention_mask, image_rotary_emb, **kwargs)
