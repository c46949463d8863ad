"""PuLID-FLUX's identity modules on diffusers' ``FluxTransformer2DModel``, by forward hooks.

``pulid_flux_v0.9.1.safetensors`` (and v0.9.0, same layout) holds ``pulid_encoder.*``, the
IDFormer of :mod:`.pulid_idformer` (32 identity tokens of 2048), and ``pulid_ca.0`` …
``pulid_ca.19``, perceiver cross-attention modules (:class:`PerceiverAttentionCA`).

The original (ToTheBeginning/PuLID @ 1aa2fc7, ``flux/model.py``, ``pulid/pipeline_flux.py``)
runs, inside its FLUX forward, after double-stream block i for i = 0, 2, …, 18 and after
single-stream block j for j = 0, 4, …, 36 (CA modules in that order)::

    img = img + id_weight * pulid_ca[k](id, img)

on the *image* tokens only (for single-stream blocks, the image part of the joint sequence);
the text tokens are untouched; with ``id = None`` (before ``start_step``) nothing is added.

Here each of those blocks of diffusers' transformer gets a forward hook
(:func:`install_flux_identity`) that adds the CA output to the block's image-token output
(``(encoder_hidden_states, hidden_states)`` for both block kinds), for the batch rows that
:class:`~.pulid.IdentityRows` names: one transformer call carries FD rows (no identity) and
PD rows. No diffusers code is edited or copied.

Insertion points for other block counts (tiny test models): the original's rule is kept —
every 2nd double block and every 4th single block, counting from block 0, i.e.
ceil(N_double / 2) + ceil(N_single / 4) CA modules (9 + 1 + 9 + 1 = 20 for FLUX.1's 19 + 38
blocks, the original's own formula).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from ...core.checkpoints import check_state_dict
from ...core.conditioning import PD, PD_UNCOND
from ...core.errors import InputError
from ..base import Backend
from .embedding import (
    INSIGHTFACE_LICENSE,
    RELEASED_DIMS,
    FaceSource,
    PuLIDFaceEmbedding,
    load_face_embedding,
    pulid_schema,
    random_face_embedding,
)
from .idformer import IDFormer, IDFormerConfig
from .sdxl import (
    LICENSE,
    PULID_OPTIONS,
    IdentityRows,
    PuLIDConditioning,
    download_weights,
    face_from_cli,
    read_safetensors,
)

logger = logging.getLogger(__name__)

FLUX_WEIGHTS = {"v0.9.1": "pulid_flux_v0.9.1.safetensors", "v0.9.0": "pulid_flux_v0.9.0.safetensors"}
DOUBLE_INTERVAL, SINGLE_INTERVAL = 2, 4
DOUBLE, SINGLE = "double", "single"


@dataclass(frozen=True)
class PerceiverCAConfig:
    """Sizes of a CA module; defaults are the released ones (FLUX.1 width 3072, tokens 2048)."""

    dim: int = 3072
    dim_head: int = 128
    heads: int = 16
    kv_dim: int = 2048


class PerceiverAttentionCA(nn.Module):
    """Image tokens (queries, width ``dim``) attend to the identity tokens (``kv_dim``).

    softmax(q·kᵀ/√d)·v with LayerNorms on both inputs, the scale split over q and k and the
    softmax in float32 as the original; no residual (the caller adds ``id_weight ·`` it).
    """

    def __init__(self, config: PerceiverCAConfig = PerceiverCAConfig()):
        super().__init__()
        inner = config.dim_head * config.heads
        self.dim_head, self.heads = config.dim_head, config.heads
        self.norm1 = nn.LayerNorm(config.kv_dim)
        self.norm2 = nn.LayerNorm(config.dim)
        self.to_q = nn.Linear(config.dim, inner, bias=False)
        self.to_kv = nn.Linear(config.kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, config.dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.heads, -1).transpose(1, 2)

    def forward(self, id_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        id_tokens, image_tokens = self.norm1(id_tokens), self.norm2(image_tokens)
        b, length, _ = image_tokens.shape
        q = self._heads(self.to_q(image_tokens))
        k, v = (self._heads(t) for t in self.to_kv(id_tokens).chunk(2, dim=-1))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        return self.to_out((weight @ v).transpose(1, 2).reshape(b, length, -1))


def ca_insertion_points(num_double: int, num_single: int) -> list[tuple[str, int]]:
    """(block kind, block index) after which CA module k acts, k in order."""
    double = [(DOUBLE, i) for i in range(0, num_double, DOUBLE_INTERVAL)]
    return double + [(SINGLE, j) for j in range(0, num_single, SINGLE_INTERVAL)]


class PuLIDFluxModules(nn.Module):
    """The two parts of ``pulid_flux_v0.9.x.safetensors`` under the file's own key names."""

    def __init__(
        self,
        num_double: int = 19,
        num_single: int = 38,
        encoder: IDFormerConfig = IDFormerConfig(),  # noqa: B008 (frozen, immutable)
        ca: PerceiverCAConfig = PerceiverCAConfig(),
    ):
        super().__init__()
        if encoder.output_dim != ca.kv_dim:
            raise ValueError(f"identity tokens ({encoder.output_dim}) must match the CA key width ({ca.kv_dim})")
        self.points = ca_insertion_points(num_double, num_single)
        self.pulid_encoder = IDFormer(encoder)
        self.pulid_ca = nn.ModuleList(PerceiverAttentionCA(ca) for _ in self.points)

    @classmethod
    def for_transformer(cls, transformer, encoder: IDFormerConfig | None = None, **ca) -> PuLIDFluxModules:
        """Sized for ``transformer``'s block counts and width (identity tokens ``kv_dim``)."""
        config = transformer.config
        encoder = encoder or IDFormerConfig()
        ca_config = PerceiverCAConfig(dim=transformer.inner_dim, kv_dim=encoder.output_dim, **ca)
        return cls(config.num_layers, config.num_single_layers, encoder, ca_config)


def load_pulid_flux_weights(modules: PuLIDFluxModules, state_dict: Mapping[str, torch.Tensor]) -> PuLIDFluxModules:
    """Strictly load ``pulid_flux_v0.9.x.safetensors`` tensors (modules may be on meta)."""
    check_state_dict(
        modules,
        state_dict,
        "the PuLID-FLUX checkpoint does not match PuLID-FLUX's IDFormer and 20 CA modules",
        hint="pass pulid_flux_v0.9.1.safetensors (or v0.9.0) from guozinan/PuLID with a FLUX.1-dev base model",
    )
    modules.load_state_dict(state_dict, strict=True, assign=True)
    return modules


def _ca_hook(ca: PerceiverAttentionCA, rows: IdentityRows, id_weight: float):
    def hook(module, args, kwargs, output):
        index = rows.index
        if index is None:
            return None
        encoder_hidden_states, hidden_states = output
        image = hidden_states[index]
        image = image + id_weight * ca(rows.tokens.to(device=image.device, dtype=image.dtype), image)
        return encoder_hidden_states, hidden_states.index_copy(0, index, image)

    return hook


@contextlib.contextmanager
def install_flux_identity(
    transformer, modules: PuLIDFluxModules, rows: IdentityRows, id_weight: float = 1.0
) -> Iterator[IdentityRows]:
    """Hook the CA modules after their blocks for the duration of the block; removed in
    ``finally``. Rows named by ``rows`` (set per call) get the identity; others nothing."""
    blocks = {DOUBLE: transformer.transformer_blocks, SINGLE: transformer.single_transformer_blocks}
    expected = ca_insertion_points(len(blocks[DOUBLE]), len(blocks[SINGLE]))
    if expected != modules.points:
        raise ValueError(
            f"PuLID-FLUX modules were built for {len(modules.points)} insertion points, the transformer "
            f"has {len(expected)}"
        )
    handles = [
        blocks[kind][i].register_forward_hook(_ca_hook(ca, rows, id_weight), with_kwargs=True)
        for (kind, i), ca in zip(modules.points, modules.pulid_ca)
    ]
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()


# --- the backend (on the FLUX family of freecure.families) ------------------------------------
DEFAULT_FLUX_BASE = "black-forest-labs/FLUX.1-dev"


class PuLIDFluxBackend(Backend):
    """PuLID-FLUX on diffusers' FLUX pipeline: FD rows plain, PD rows with the identity CA.

    ``start_step`` (the original's "timestep to start inserting ID", demo default 0; its docs
    suggest 4 for photographic, 0–1 for stylised images) is PD's injection step. With true CFG
    PD's negative row gets the IDFormer's unconditional tokens, as the original.
    """

    name = "pulid-flux"
    identity_mechanism = "PuLID-FLUX's ID cross-attention modules after FLUX's blocks (the T5 prompt is untouched)"
    embed_references = 1  # PuLID-FLUX reads the first --ref photo
    families = ("flux",)
    rows_in_one_call = True  # predict_noise adds the adapter's inputs to the engine's one call
    license = LICENSE
    #: ``--face-embedding``: the IDFormer's inputs of one reference photo (refs = 1).
    identity_schema = pulid_schema(name)

    def __init__(self, pipeline, modules: PuLIDFluxModules, face: PuLIDFaceEmbedding | None, id_weight: float = 1.0,
                 start_step: int = 0, encoder=None):
        super().__init__(pipeline)
        if not hasattr(pipeline, "transformer"):
            raise InputError("PuLID-FLUX needs a FLUX pipeline (a transformer denoiser)")
        if not (math.isfinite(id_weight) and 0.0 <= id_weight <= 5.0):
            raise InputError(f"PuLID-FLUX id weight must lie in [0, 5], got {id_weight}")
        if face is not None:
            self.check_face(face, modules)
        self.modules = modules.to(device=self.device, dtype=self.dtype).eval()
        self.face, self.id_weight, self.start_step = face, id_weight, start_step
        self.encoder = encoder
        self.faces = FaceSource(face, encoder, max_refs=1)  # the original reads one photo
        self.rows = IdentityRows()
        logger.warning("PuLID: %s", INSIGHTFACE_LICENSE)

    @classmethod
    def check_face(cls, face: PuLIDFaceEmbedding, modules: PuLIDFluxModules) -> None:
        config = modules.pulid_encoder.config
        face.check(config.id_dim, config.vit_dim, "the PuLID-FLUX face embedding", cls.identity_schema, refs=1)

    @classmethod
    def identity_dims(cls, args) -> dict[str, int]:
        """The IDFormer's widths before any model loads (released or tiny), one reference row."""
        from .idformer import tiny_idformer_config

        if getattr(args, "tiny", False):
            config = tiny_idformer_config(1)
            return {"id_dim": config.id_dim, "vit_dim": config.vit_dim, "refs": 1}
        return {**RELEASED_DIMS, "refs": 1}

    @classmethod
    def check_identity_files(cls, args) -> None:
        """``--face-embedding`` against :attr:`identity_schema`, before any model loads."""
        if getattr(args, "face_embedding", None) is not None:
            load_face_embedding(args.face_embedding, cls.identity_dims(args), cls.identity_schema)

    @classmethod
    def embed_faces(cls, references, args):
        from .encoder import embed_faces

        return embed_faces(cls.name, references, args)

    options = PULID_OPTIONS  # SDXL's --pulid-num-zero and --pulid-ortho are not FLUX's

    @classmethod
    def from_options(cls, args) -> PuLIDFluxBackend:
        id_weight = 1.0 if args.pulid_id_scale is None else args.pulid_id_scale
        if args.tiny:
            backend = cls.build_tiny(id_weight=id_weight, face_embedding=args.face_embedding)
            backend.pipeline.to(args.device)
            backend.modules.to(args.device)
            return backend
        from ...core.runtime import load_base_pipeline

        face, encoder = face_from_cli(args, cls.name, cls.identity_dims(args), cls.identity_schema)
        state = read_safetensors(download_weights(FLUX_WEIGHTS["v0.9.1"], args.pulid_weights))
        pipeline = load_base_pipeline(args.base_model or DEFAULT_FLUX_BASE, args.device, args.dtype)
        with torch.device("meta"):
            modules = PuLIDFluxModules.for_transformer(pipeline.transformer)
        return cls(pipeline, load_pulid_flux_weights(modules, state), face, id_weight, encoder=encoder)

    @classmethod
    def build_tiny(
        cls, id_weight: float = 1.0, face_embedding=None, seed: int = 0, pipeline=None, start_step: int = 0,
        encoder=None,
    ):
        """Tiny random FLUX pipeline and PuLID modules (offline; images are noise)."""
        from ...families.tiny import tiny_pipeline
        from .idformer import tiny_idformer_config

        pipeline = pipeline or tiny_pipeline("flux")
        torch.manual_seed(seed)
        modules = PuLIDFluxModules.for_transformer(pipeline.transformer, tiny_idformer_config(24), dim_head=8, heads=2)
        config = modules.pulid_encoder.config
        if face_embedding is not None:
            dims = {"id_dim": config.id_dim, "vit_dim": config.vit_dim, "refs": 1}
            face = load_face_embedding(face_embedding, dims, cls.identity_schema)
        elif encoder is None:
            face = random_face_embedding(config.id_dim, config.vit_dim, seed=seed)
        else:  # the face embedding of the first reference photo, through ``encoder``
            face = None
        return cls(pipeline, modules, face, id_weight, start_step, encoder=encoder)

    @torch.no_grad()
    def identity_tokens(self, face: PuLIDFaceEmbedding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(identity tokens, unconditional tokens) from the face embedding, (32, 2048) each."""
        face = face or self.face
        if face is None:
            raise ValueError("no face embedding: pass one (the encoder's runs in identity_conditions)")
        encoder = self.modules.pulid_encoder
        param = next(encoder.parameters())

        def run(face: PuLIDFaceEmbedding) -> torch.Tensor:
            id_cond, hidden = face.idformer_inputs()
            return encoder(id_cond[:, 0].to(param), [h.to(param) for h in hidden])[0]

        return run(face), run(face.zeros())

    def identity_conditions(self, parsed, references, fd, num_inference_steps):
        """PD: FD's prompt plus the identity tokens of the ``--face-embedding`` file, or else of
        the first reference photo through the face encoder (:mod:`.pulid_encoder`)."""
        face = self.faces(references)
        self.check_face(face, self.modules)
        tokens, uncond_tokens = self.identity_tokens(face)
        pd = PuLIDConditioning(fd.prompt_embeds, fd.pooled_prompt_embeds, tokens, uncond_tokens)
        return pd, min(self.start_step, num_inference_steps - 1)

    def conditions(self, parsed, references, num_inference_steps, negative_prompt=None):
        conditions = super().conditions(parsed, references, num_inference_steps, negative_prompt)
        uncond = conditions.uncond
        pd_uncond = PuLIDConditioning(uncond.prompt_embeds, uncond.pooled_prompt_embeds, conditions.pd.uncond_id_tokens)
        return replace(conditions, pd_uncond=pd_uncond)

    def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size):
        """One transformer call; the CA identity on PD's row (and PD's negative row under true
        CFG, when PD is injected); every other row is plain FLUX."""
        injected = PD in row_keys
        tokens = {}
        for i, (row, key) in enumerate(zip(rows, row_keys)):
            if key == PD or (key == PD_UNCOND and injected):
                if not isinstance(row, PuLIDConditioning) or row.id_tokens is None:
                    raise TypeError(f"pulid-flux: row {i} ({key}) needs the PuLIDConditioning of conditions()")
                tokens[i] = row.id_tokens.to(self.dtype)
        with install_flux_identity(self.denoiser, self.modules, self.rows, self.id_weight), self.rows.use(tokens):
            return super().predict_noise(latents, timestep, rows, row_keys, step_index, image_size)
