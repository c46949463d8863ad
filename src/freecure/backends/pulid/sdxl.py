"""PuLID SDXL v1.1 (``guozinan/PuLID``: ``pulid_v1.1.safetensors``) on diffusers' SDXL.

Written from the original's description (ToTheBeginning/PuLID @ 1aa2fc7:
``pulid/pipeline_v1_1.py``, ``pulid/attention_processor.py``, ``app_v1_1.py``):

* the IDFormer (``id_adapter.*``, :mod:`.pulid_idformer`) turns the face embedding into 32
  identity tokens of 2048; the unconditional branch gets the IDFormer of all-zero inputs;
* every cross-attention layer (``attn2``) of the UNet gets ``id_to_k``/``id_to_v``
  (``id_adapter_attn_layers.<i>``, i = the layer's position in ``unet.attn_processors``):
  the image queries attend to the identity tokens (plus ``num_zero`` zero tokens), and the
  result is added to the text attention's output before ``to_out``, scaled by ``id_scale``;
  with ``ortho="v2"`` (the v1.1 demo's setting) the part of it parallel to the text
  attention's output is first removed in proportion to how little the queries attend to the
  first five identity tokens.
* identity enters from the first step; the released demo samples with DPM++ 2M Karras
  (25 steps, CFG 7, ``id_scale`` 0.8, ``num_zero`` 20) on Juggernaut-XL-v9, or DPM++ SDE
  (stochastic) on DreamShaper-XL-Lightning.

FreeCure's FD and PD share one UNet call: :class:`PuLIDAttnProcessor` adds the identity
only to the batch rows that :class:`IdentityRows` names for that call (PD's rows), so FD's
rows are the plain SDPA attention of the base model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ...core.checkpoints import check_state_dict, read_tensors
from ...core.conditioning import PD, PD_UNCOND, TextConditioning
from ...core.errors import InputError, WeightsNotFoundError
from ...core.options import Option, finite_float, non_negative_int
from ..base import Backend
from .embedding import (
    INSIGHTFACE_LICENSE,
    PULID_SCHEMA,
    RELEASED_DIMS,
    FaceSource,
    PuLIDFaceEmbedding,
    load_face_embedding,
    needs_face_embedding,
    pulid_schema,
    random_face_embedding,
)
from .idformer import IDFormer, IDFormerConfig, tiny_idformer_config

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "RunDiffusion/Juggernaut-XL-v9"
WEIGHTS_REPO, SDXL_WEIGHTS = "guozinan/PuLID", "pulid_v1.1.safetensors"
LICENSE = f"PuLID weights: Apache-2.0; {INSIGHTFACE_LICENSE}; EVA-CLIP: MIT"
ORTHO_MODES = ("off", "v1", "v2")
#: Identity tokens whose attention mass decides ortho v2's projection (the original's ``:5``).
ORTHO_V2_TOKENS = 5


# --- identity attention --------------------------------------------------------------------
class IdentityKV(nn.Module):
    """``id_to_k``/``id_to_v`` of one cross-attention layer: identity tokens → keys, values."""

    def __init__(self, hidden_size: int, token_dim: int):
        super().__init__()
        self.id_to_k = nn.Linear(token_dim, hidden_size, bias=False)
        self.id_to_v = nn.Linear(token_dim, hidden_size, bias=False)


def _hidden_size(unet_config, name: str) -> int:
    """Width of the attention layer ``name`` from the UNet's block widths (the original's rule)."""
    widths = list(unet_config.block_out_channels)
    if name.startswith("mid_block"):
        return widths[-1]
    block = int(name.split(".")[1])
    return widths[::-1][block] if name.startswith("up_blocks") else widths[block]


def identity_attention_layers(unet_config, processor_names) -> nn.ModuleList:
    """One entry per attention processor, in ``unet.attn_processors`` order: an
    :class:`IdentityKV` for cross-attention (``attn2``), an empty module for self-attention.
    The indices are the checkpoint's ``id_adapter_attn_layers.<i>``."""
    layers = nn.ModuleList()
    for name in processor_names:
        if name.endswith("attn1.processor"):
            layers.append(nn.Module())
        else:
            layers.append(IdentityKV(_hidden_size(unet_config, name), unet_config.cross_attention_dim))
    return layers


@dataclass
class IdentityRows:
    """Which batch rows of the current UNet call carry identity tokens, and the tokens.

    Set by the backend around each call (:meth:`use`); empty means every row is plain.
    """

    index: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    @contextlib.contextmanager
    def use(self, tokens_by_row: Mapping[int, torch.Tensor]) -> Iterator[IdentityRows]:
        if tokens_by_row:
            rows = sorted(tokens_by_row)
            self.tokens = torch.stack([tokens_by_row[row] for row in rows])
            self.index = torch.tensor(rows, device=self.tokens.device)
        try:
            yield self
        finally:
            self.index = self.tokens = None


@dataclass(frozen=True)
class IdentitySettings:
    """PuLID SDXL's identity-attention knobs (the v1.1 demo's values by default).

    Attributes:
        id_scale: weight of the identity attention (demo slider: 0.8).
        num_zero: zero tokens appended to the identity tokens before ``id_to_k``/``id_to_v``;
            they take attention mass and give nothing (demo: 20).
        ortho: "off" (add), "v1" (add the part orthogonal to the text attention's output),
            "v2" (the demo's: remove the parallel part by 1 − the first five tokens' mass).
    """

    id_scale: float = 0.8
    num_zero: int = 20
    ortho: str = "v2"

    def __post_init__(self):
        if not (torch.isfinite(torch.tensor(self.id_scale)) and 0.0 <= self.id_scale <= 5.0):
            raise InputError(f"PuLID id scale must lie in [0, 5], got {self.id_scale}")
        if not 0 <= self.num_zero <= 256:
            raise InputError(f"PuLID num_zero must lie in 0..256, got {self.num_zero}")
        if self.ortho not in ORTHO_MODES:
            raise InputError(f"PuLID ortho must be one of {', '.join(ORTHO_MODES)}, got {self.ortho!r}")


def identity_attention(
    query: torch.Tensor, text_out: torch.Tensor, tokens: torch.Tensor, kv: IdentityKV, heads: int, s: IdentitySettings
) -> torch.Tensor:
    """``text_out`` plus PuLID's identity attention, before ``to_out``.

    Args:
        query: (b, heads, L, d) image queries of the identity rows.
        text_out: (b, L, heads·d) their text cross-attention output.
        tokens: (b, n, D) identity tokens.
    """
    b = tokens.shape[0]
    tokens = tokens.to(kv.id_to_k.weight.dtype)
    if s.num_zero:
        tokens = torch.cat([tokens, tokens.new_zeros(b, s.num_zero, tokens.shape[-1])], dim=1)
    head_dim = query.shape[-1]
    id_key = kv.id_to_k(tokens).to(query.dtype).view(b, -1, heads, head_dim).transpose(1, 2)
    id_value = kv.id_to_v(tokens).to(query.dtype).view(b, -1, heads, head_dim).transpose(1, 2)
    id_out = F.scaled_dot_product_attention(query, id_key, id_value)
    id_out = id_out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(query.dtype)
    if s.ortho == "off":
        return text_out + s.id_scale * id_out
    dtype = text_out.dtype
    h, i = text_out.float(), id_out.float()
    # projection of the identity output on the text output, per channel over the L positions
    # (where h is exactly 0 — SDXL's all-zero negative embedding — the original's 0/0 is NaN;
    # the projection of anything on the zero vector is taken as 0 instead)
    norm = (h * h).sum(dim=-2, keepdim=True)
    projection = (h * i).sum(dim=-2, keepdim=True) / torch.where(norm == 0, 1.0, norm) * h
    if s.ortho == "v1":
        return (h + s.id_scale * (i - projection)).to(dtype)
    # v2: unscaled logits; head-averaged attention mass on the first identity tokens
    mass = (query @ id_key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)[..., :ORTHO_V2_TOKENS]
    mass = mass.sum(dim=-1, keepdim=True).float()
    return (h + s.id_scale * (i + (mass - 1) * projection)).to(dtype)


class PuLIDAttnProcessor:
    """SDPA cross-attention (as diffusers' ``AttnProcessor2_0``) plus PuLID's identity
    attention on the rows :class:`IdentityRows` names; the other rows are untouched."""

    def __init__(self, kv: IdentityKV, rows: IdentityRows, settings: IdentitySettings):
        self.kv, self.rows, self.settings = kv, rows, settings

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, sequence, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        index = self.rows.index
        if index is not None:  # identity on the named rows only
            tokens = self.rows.tokens.to(device=query.device)
            with_id = identity_attention(query[index], hidden_states[index], tokens, self.kv, attn.heads, self.settings)
            hidden_states = hidden_states.index_copy(0, index, with_id.to(hidden_states.dtype))

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# --- weights -------------------------------------------------------------------------------
class PuLIDSDXLModules(nn.Module):
    """The two parts of ``pulid_v1.1.safetensors`` under the file's own key names."""

    def __init__(self, unet_config, processor_names, idformer: IDFormerConfig):
        super().__init__()
        if idformer.output_dim != unet_config.cross_attention_dim:
            raise ValueError(
                f"IDFormer tokens ({idformer.output_dim}) must match the UNet's cross-attention "
                f"width ({unet_config.cross_attention_dim})"
            )
        self.id_adapter = IDFormer(idformer)
        self.id_adapter_attn_layers = identity_attention_layers(unet_config, processor_names)


def sdxl_unet_processor_names(unet_config: Mapping) -> list[str]:
    """``attn_processors`` names of a UNet built (on the meta device) from ``unet_config``."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    return list(unet.attn_processors)


def load_pulid_sdxl_weights(modules: PuLIDSDXLModules, state_dict: Mapping[str, torch.Tensor]) -> PuLIDSDXLModules:
    """Strictly load ``pulid_v1.1.safetensors`` tensors (modules may live on the meta device)."""
    check_state_dict(
        modules,
        state_dict,
        "the PuLID SDXL checkpoint does not match PuLID v1.1's IDFormer and identity attention",
        hint="pass pulid_v1.1.safetensors (guozinan/PuLID) with an SDXL base model",
    )
    modules.load_state_dict(state_dict, strict=True, assign=True)
    return modules


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """The tensors of a PuLID ``.safetensors`` file (through :func:`freecure.checkpoints.read_tensors`)."""
    from pathlib import Path

    if Path(path).suffix != ".safetensors":
        raise InputError(f"PuLID weights must be a .safetensors file, got {path}")
    return read_tensors(path, "PuLID weights", hint="Download it again from guozinan/PuLID.")


def download_weights(filename: str, given: str | None) -> str:
    """``given``, else ``hf_hub_download(guozinan/PuLID, filename)`` with an actionable error."""
    if given:
        return given
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(WEIGHTS_REPO, filename)
    except Exception as error:  # offline, gated, missing: one line the user can act on
        raise WeightsNotFoundError(
            f"could not download {WEIGHTS_REPO}/{filename} ({type(error).__name__}); pass --pulid-weights "
            "FILE.safetensors, or run offline with --tiny"
        ) from None


# --- the backend ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PuLIDConditioning(TextConditioning):
    """A PD row: the prompt's text conditioning plus the IDFormer's identity tokens.

    ``uncond_id_tokens`` (on PD's positive row) are the IDFormer of zeros, for PD's
    unconditional row.
    """

    id_tokens: torch.Tensor | None = None
    uncond_id_tokens: torch.Tensor | None = field(default=None, repr=False)

    def to(self, device=None, dtype=None) -> PuLIDConditioning:
        moved = super().to(device=device, dtype=dtype)

        def move(t):  # identity tokens stay float32, as the original's (its ID modules are fp32)
            return None if t is None else t.to(device=device)

        return replace(moved, id_tokens=move(self.id_tokens), uncond_id_tokens=move(self.uncond_id_tokens))


PULID_EMBEDDING_HELP = "pulid-sdxl/pulid-flux: tensors id_cond and vit_hidden.0-4 (docs/backends/pulid.md)"


#: The options both PuLID backends read (SDXL adds its own below).
PULID_OPTIONS = (
    Option("--face-embedding", metavar="FILE", help=f"PuLID: precomputed face embedding: {PULID_EMBEDDING_HELP}"),
    Option("--pulid-weights", metavar="FILE", help="PuLID: pulid_v1.1 / pulid_flux safetensors"),
    Option(
        "--eva-clip-weights",
        metavar="FILE",
        help="PuLID: local EVA02_CLIP_L_336_psz14_s6B.pt for the face embedding from --ref (else the Hub)",
        unread=lambda args: (
            "EVA-CLIP only runs to compute PuLID's identity from photos, which --tiny and --face-embedding skip"
            if args.tiny or getattr(args, "face_embedding", None) is not None
            else None
        ),
    ),
    Option("--pulid-id-scale", type=finite_float(), help="PuLID: identity weight (SDXL 0.8, FLUX 1.0)"),
)


def face_from_cli(args, backend: str, dims: dict[str, int] | None = None, schema=None):
    """(face embedding, None) from ``--face-embedding`` (checked with the released widths
    ``dims``), else (None, the face encoder) for the ``--ref`` photos; every missing package or
    input fails here, before any model loads."""
    if args.face_embedding is not None:
        face = load_face_embedding(args.face_embedding, RELEASED_DIMS if dims is None else dims, schema or PULID_SCHEMA)
        return face, None
    if not (getattr(args, "ref", None) or getattr(args, "identities", None)):  # generate's --ref, eval's
        raise needs_face_embedding(backend)
    from ...core.runtime import resolve_device
    from .encoder import PuLIDFaceEncoder

    encoder = PuLIDFaceEncoder.from_pretrained(
        getattr(args, "eva_clip_weights", None),
        getattr(args, "parser_weights", None),
        resolve_device(getattr(args, "device", None)),
        backend=backend,
    )
    return None, encoder


class PuLIDSDXLBackend(Backend):
    """PuLID SDXL v1.1 on a diffusers SDXL pipeline; FD and PD rows gated per row.

    The identity processors are installed on every cross-attention layer when the backend is
    built (as the original does); with no identity rows named they compute exactly diffusers'
    SDPA attention. :meth:`restore_processors` puts the original processors back.
    """

    name = "pulid-sdxl"
    identity_mechanism = "PuLID's ID tokens in extra cross-attention beside the text's"
    embed_references = None  # the face embedding of every --ref photo
    families = ("sdxl",)
    rows_in_one_call = True  # predict_noise adds the adapter's inputs to the engine's one call
    license = LICENSE
    default_guidance_scale = 7.0
    #: ``--face-embedding``: the IDFormer's inputs, one row per reference photo.
    identity_schema = pulid_schema(name)

    def __init__(
        self,
        pipeline,
        modules: PuLIDSDXLModules,
        face: PuLIDFaceEmbedding | None,
        settings: IdentitySettings = IdentitySettings(),
        inject_step: int = 0,
        encoder=None,
    ):
        super().__init__(pipeline)
        if not self.is_sdxl:
            raise InputError("PuLID SDXL needs an SDXL-family base model (two text encoders)")
        config = modules.id_adapter.config
        if face is not None:
            face.check(config.id_dim, config.vit_dim, "the PuLID face embedding", self.identity_schema)
        self.faces = FaceSource(face, encoder)  # --face-embedding, or the encoder on the --ref photos
        # float32 as the original's IDFormer and id_to_k/id_to_v; keys/values are cast to the UNet's dtype
        self.modules = modules.to(device=self.device).eval()
        self.face, self.settings, self.inject_step = face, settings, inject_step
        self.encoder = encoder
        self.rows = IdentityRows()
        logger.warning("PuLID: %s", INSIGHTFACE_LICENSE)
        self._original_processors = dict(self.unet.attn_processors)
        names = list(self._original_processors)
        layers = self.modules.id_adapter_attn_layers
        if len(layers) != len(names):
            raise ValueError(f"PuLID has {len(layers)} attention entries, the UNet {len(names)} processors")
        self.unet.set_attn_processor(
            {
                name: PuLIDAttnProcessor(layer, self.rows, settings) if isinstance(layer, IdentityKV) else proc
                for (name, proc), layer in zip(self._original_processors.items(), layers)
            }
        )

    def restore_processors(self) -> None:
        self.unet.set_attn_processor(self._original_processors)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def embed_faces(cls, references, args):
        from .encoder import embed_faces

        return embed_faces(cls.name, references, args)

    options = (
        *PULID_OPTIONS,
        Option("--pulid-num-zero", type=non_negative_int, default=20, help="PuLID SDXL: zero tokens (default 20)"),
        Option("--pulid-ortho", choices=ORTHO_MODES, default="v2", help="PuLID SDXL: ortho (default v2)"),
    )

    @classmethod
    def identity_dims(cls, args) -> dict[str, int]:
        """The IDFormer's widths before any model loads: the released (id_cond 1280, EVA-CLIP
        577 patches of 1024) or, under ``--tiny``, the tiny IDFormer's (any patch count)."""
        if getattr(args, "tiny", False):
            config = tiny_idformer_config(1)
            return {"id_dim": config.id_dim, "vit_dim": config.vit_dim}
        return dict(RELEASED_DIMS)

    @classmethod
    def check_identity_files(cls, args) -> None:
        """``--face-embedding`` against :attr:`identity_schema`, before any model loads."""
        if getattr(args, "face_embedding", None) is not None:
            load_face_embedding(args.face_embedding, cls.identity_dims(args), cls.identity_schema)

    @classmethod
    def from_options(cls, args) -> PuLIDSDXLBackend:
        from ...core.runtime import load_base_pipeline

        id_scale = 0.8 if args.pulid_id_scale is None else args.pulid_id_scale
        settings = IdentitySettings(id_scale=id_scale, num_zero=args.pulid_num_zero, ortho=args.pulid_ortho)
        if args.tiny:
            backend = cls.build_tiny(settings=settings, face_embedding=args.face_embedding)
            backend.pipeline.to(args.device)
            backend.modules.to(args.device)
            return backend
        face, encoder = face_from_cli(args, cls.name, cls.identity_dims(args), cls.identity_schema)
        state = read_safetensors(download_weights(SDXL_WEIGHTS, args.pulid_weights))
        pipeline = load_base_pipeline(args.base_model or DEFAULT_BASE_MODEL, args.device, args.dtype, sdxl=True)
        with torch.device("meta"):
            modules = PuLIDSDXLModules(pipeline.unet.config, list(pipeline.unet.attn_processors), IDFormerConfig())
        return cls(pipeline, load_pulid_sdxl_weights(modules, state), face, settings, encoder=encoder)

    @classmethod
    def build_tiny(
        cls, settings: IdentitySettings = IdentitySettings(), face_embedding=None, seed: int = 0, pipeline=None,
        encoder=None,
    ):
        """Tiny random SDXL pipeline and PuLID modules (offline; images are noise)."""
        from ...families.tiny import tiny_sdxl_pipeline

        pipeline = pipeline or tiny_sdxl_pipeline()
        config = tiny_idformer_config(pipeline.unet.config.cross_attention_dim)
        torch.manual_seed(seed)
        modules = PuLIDSDXLModules(pipeline.unet.config, list(pipeline.unet.attn_processors), config)
        if face_embedding is not None:
            dims = {"id_dim": config.id_dim, "vit_dim": config.vit_dim}
            face = load_face_embedding(face_embedding, dims, cls.identity_schema)
        elif encoder is None:
            face = random_face_embedding(config.id_dim, config.vit_dim, seed=seed)
        else:  # the face embedding of the reference photos, through ``encoder`` (e.g. PuLIDFaceEncoder.tiny())
            face = None
        return cls(pipeline, modules, face, settings, encoder=encoder)

    # -- conditioning ----------------------------------------------------------------------
    @torch.no_grad()
    def identity_tokens(self, face: PuLIDFaceEmbedding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(identity tokens, unconditional identity tokens), each (num_queries, dim)."""
        face = face or self.face
        if face is None:
            raise ValueError("no face embedding: pass one (the encoder's runs in identity_conditions)")
        encoder = self.modules.id_adapter
        param = next(encoder.parameters())

        def run(f: PuLIDFaceEmbedding) -> torch.Tensor:
            id_cond, hidden = f.idformer_inputs()
            return encoder(id_cond.to(param), [h.to(param) for h in hidden])[0]

        return run(face), run(face.zeros())

    def identity_conditions(self, parsed, references, fd, num_inference_steps):
        """PD: FD's prompt plus the identity tokens, from ``inject_step`` (0 as the original).

        The identity comes from the ``--face-embedding`` file, or else from the reference
        photos through the face encoder (:mod:`.pulid_encoder`), as the original."""
        face = self.faces(references)
        config = self.modules.id_adapter.config
        face.check(config.id_dim, config.vit_dim, "the PuLID face embedding", self.identity_schema)
        tokens, uncond_tokens = self.identity_tokens(face)
        pd = PuLIDConditioning(fd.prompt_embeds, fd.pooled_prompt_embeds, tokens, uncond_tokens)
        return pd, min(self.inject_step, num_inference_steps - 1)

    def conditions(self, parsed, references, num_inference_steps, negative_prompt=None):
        """As the base class, with PD's own negative branch: the negative prompt plus the
        IDFormer's unconditional tokens (the original guides against those)."""
        conditions = super().conditions(parsed, references, num_inference_steps, negative_prompt)
        uncond = conditions.uncond
        pd_uncond = PuLIDConditioning(uncond.prompt_embeds, uncond.pooled_prompt_embeds, conditions.pd.uncond_id_tokens)
        return replace(conditions, pd_uncond=pd_uncond)

    # -- noise prediction ---------------------------------------------------------------
    def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size):
        """One UNet call; identity on the PD row and, when the call holds a PD row (PD's lane is
        injected), on PD's unconditional row. Every other row is the base model's."""
        injected = PD in row_keys
        tokens = {}
        for i, (row, key) in enumerate(zip(rows, row_keys)):
            if key == PD or (key == PD_UNCOND and injected):
                if not isinstance(row, PuLIDConditioning) or row.id_tokens is None:
                    raise TypeError(f"pulid: row {i} ({key}) needs the PuLIDConditioning of conditions()")
                tokens[i] = row.id_tokens
        with self.rows.use(tokens):
            return super().predict_noise(latents, timestep, rows, row_keys, step_index, image_size)
