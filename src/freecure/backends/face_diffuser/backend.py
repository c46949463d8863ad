"""Face-diffuser (Wang et al., CVPR 2024, "High-fidelity person-centric subject-to-image
synthesis") as a FreeCure backend, on Stable Diffusion 1.5.

Face-diffuser runs two SD1.5 models, both released fine-tuned on FFHQ-wild:

* the **TDM** (text-driven diffusion model, ``unet_text_only`` in the original), a UNet that
  only ever sees text;
* the **SDM** (subject-augmented diffusion model), FastComposer's architecture: UNet, text
  encoder, CLIP image encoder and post-fuse MLP (see :mod:`.fastcomposer`).

All text embeddings come from the SDM's text encoder (the original puts it in the pipeline and
feeds the TDM with it too). With e = TDM, s = SDM, w the guidance scale, ∅ the negative prompt,
c the text-only prompt and c̃ the image-augmented one, step i of the original loop is

* ``i ≤ start_merge_step`` (scene construction): ε = e(∅) + w·(e(c) − e(∅));
* ``i ≤ final_step`` (subject-scene fusion, SNF): ε_g = e(∅) + w·(e(c) − e(∅)) and
  ε_e = s(c) + w·(s(c̃) − s(c)) — the SDM's guidance runs from the text-only prompt to the
  augmented one —, their guidance responses S_g = w·(e(c) − e(∅)), S_e = w·(s(c̃) − s(c))
  become saliency maps (:func:`saliency_map`) and each latent pixel takes the prediction of
  the more salient model: ε = (1 − ℳ)·ε_g + ℳ·ε_e with ℳ = [sal_e > sal_g] (:func:`snf_mask`);
* later steps (subject enhancement): ε = s(c) + w·(s(c̃) − s(c)).

FreeCure's engine guides each lane *after* the backend's noise prediction:
ε̂ = ε_u + w·(ε_c − ε_u) on the lane's (``pd_uncond``, ``pd``) rows. Because ℳ is one mask
for both rows and guidance is linear, the hook returns for PD

    ε_u = (1 − ℳ)·e(∅) + ℳ·s(c),    ε_c = (1 − ℳ)·e(c) + ℳ·s(c̃),

whose guided combination is exactly the original's fused ε (:func:`snf_rows`); ℳ = 0 before
SNF and ℳ = 1 after it. The saliency needs w, which the hook reads from
:attr:`Backend.guidance_scale` (set by :class:`~freecure.pipeline.FreeCurePipeline`).

FD is the TDM on the text-only prompt: it is Face-diffuser's identity-free model, the one the
original runs alone before ``start_merge_step``, so FD and PD share z_t up to the injection
step ``start_merge_step + 1`` as SAME assumes. Every row that is not PD (FD's rows, the
expression stage's rows) goes through the FD model only. ``fd_model="sd15"`` uses the
pretrained SD1.5 UNet instead; then FD and PD differ from the first step and the injection
step is 0.

Checkpoints (Hub ``CodeGoat24/Face-diffuser``): ``SDM/pytorch_model.bin`` has the layout of
FastComposer's checkpoint; ``TDM/pytorch_model.bin`` has ``text_encoder.*``, ``vae.*`` and
``unet.*`` (only the UNet is used, as in the original). Both load with strict key matching.
The original's licence allows non-commercial academic use only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ...core.conditioning import PD, PD_UNCOND, TextConditioning
from ...core.errors import InputError
from ...core.options import Option, non_negative_int, positive_int
from ..fastcomposer.backend import (
    SD15_REPO_ID,
    SD15_UNET_CONFIG,
    FastComposerModel,
    ImageAugmentedBackend,
    ReleasedModel,
    read_checkpoint,
    resolve_checkpoint,
    scaled_step,
    sd15_tokenizer,
    tiny_tokenizer,
)

logger = logging.getLogger(__name__)

HUB_REPO_ID = "CodeGoat24/Face-diffuser"
SDM_FILENAME = "SDM/pytorch_model.bin"
TDM_FILENAME = "TDM/pytorch_model.bin"
LICENSE = (
    "Face-diffuser: non-commercial academic research use only (README of "
    "github.com/CodeGoat24/Face-diffuser: 2-clause BSD for non-commercial academic use; "
    "commercial use needs permission from the authors); the weights are fine-tuned from "
    "Stable Diffusion v1.5 (CreativeML OpenRAIL-M) and CLIP ViT-L/14"
)

# SNF stages of the original sampling loop.
TEXT, SNF, SUBJECT = "text", "snf", "subject"


# ----------------------------------------------------------------------------- SNF maths
def saliency_map(response: torch.Tensor) -> torch.Tensor:
    """SNF's saliency of a guidance response S (n, C, h, w): a spatial distribution (n, 1, h, w).

    |S|, a 4×4 box filter (stride 1, zero padding 1, zeros counted), bilinear resize back to
    (h, w), mean over channels, softmax over the h·w positions — the original's
    ``AvgPool2d(4, padding=1, stride=1)``, ``Resize(64)``, channel mean and ``Softmax``.
    """
    n, _, h, w = response.shape
    smooth = F.avg_pool2d(response.abs().float(), kernel_size=4, stride=1, padding=1)
    smooth = F.interpolate(smooth, size=(h, w), mode="bilinear", align_corners=False)
    return smooth.mean(dim=1, keepdim=True).flatten(1).softmax(dim=1).view(n, 1, h, w)


def snf_mask(response_g: torch.Tensor, response_e: torch.Tensor) -> torch.Tensor:
    """ℳ: 1 where the SDM's saliency is larger than the TDM's (ties go to the TDM, as
    ``argmax`` picks the first), shape (n, 1, h, w)."""
    return (saliency_map(response_e) > saliency_map(response_g)).to(response_g.dtype)


def snf_rows(
    e_null: torch.Tensor, e_text: torch.Tensor, s_text: torch.Tensor, s_aug: torch.Tensor, guidance_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Saliency-adaptive noise fusion as per-row predictions (ε_u, ε_c) and the mask ℳ.

    ε_u + w·(ε_c − ε_u) = (1 − ℳ)·ε_g + ℳ·ε_e, the original's fused guided prediction, with
    ε_g = e(∅) + w·(e(c) − e(∅)) and ε_e = s(c) + w·(s(c̃) − s(c)).
    """
    w = guidance_scale
    mask = snf_mask(w * (e_text - e_null), w * (s_aug - s_text))
    eps_u = (1 - mask) * e_null + mask * s_text
    eps_c = (1 - mask) * e_text + mask * s_aug
    return eps_u, eps_c, mask


def snf_stage(step_index: int, start_merge_step: int, final_step: int) -> str:
    """Which model(s) predict PD's noise at a step: TDM alone, SNF, or SDM alone."""
    if step_index <= start_merge_step:
        return TEXT
    return SNF if step_index <= final_step else SUBJECT


# ----------------------------------------------------------------------------- models
class TextDrivenModel(ReleasedModel):
    """The modules of the TDM checkpoint (the original ``model_text_only.FaceDiffuserModel``)."""

    def __init__(self, text_encoder, vae, unet):
        super().__init__()
        self.text_encoder = text_encoder
        self.vae = vae
        self.unet = unet

    @classmethod
    def sd15(cls, device: str | torch.device = "meta") -> TextDrivenModel:
        """The full-size architecture, on the meta device by default."""
        full = FastComposerModel.sd15(device)
        return cls(full.text_encoder, full.vae, full.unet)

    @classmethod
    def tiny(cls, seed: int = 0) -> TextDrivenModel:
        full = FastComposerModel.tiny(seed)
        return cls(full.text_encoder, full.vae, full.unet)


@dataclass(frozen=True)
class FaceDiffuserConditioning(TextConditioning):
    """PD's conditioning: the augmented embedding τ(c̃) plus what the SNF hook needs.

    Attributes:
        text_only: τ(c), the SDM's unconditional branch and the TDM's conditional one.
        start_merge_step: last TDM-only step.
        final_step: last SNF step; later steps are SDM-only.
    """

    text_only: TextConditioning | None = None
    start_merge_step: int = 0
    final_step: int = 0

    def to(self, device=None, dtype=None) -> FaceDiffuserConditioning:
        moved = super().to(device, dtype)
        text_only = None if self.text_only is None else self.text_only.to(device, dtype)
        return replace(moved, text_only=text_only)


class FaceDiffuserBackend(ImageAugmentedBackend):
    """Face-diffuser: PD = TDM, then SNF of TDM and SDM, then SDM; FD = the FD model (TDM).

    Args:
        pipeline: SD1.5 pipeline whose ``unet`` is the FD model (the TDM by default) and whose
            text encoder is the SDM's.
        sdm_unet: the SDM's UNet.
        image_encoder, postfuse: the SDM's image encoder and post-fuse module.
        tdm_unet: the TDM's UNet; None when it is ``pipeline.unet``.
        start_merge_step: last TDM-only step; None scales the original's 15 of 50 steps.
        final_step: last SNF step; None scales the original's 30 of 50 steps.
        object_resolution: reference resize before the image encoder (the original's 512).
    """

    name = "face-diffuser"
    prompt_identity = "last"
    families = ("sd15",)
    license = LICENSE
    default_guidance_scale = 5.0  # the original's default
    #: PD's rows go through the TDM and the SDM in calls of their own; FASA maps the engine's
    #: row pairs onto those calls, FD's keys recorded in the FD model's call and handed to PD's
    #: (docs/engine.md, "FASA on Face-diffuser")
    rows_in_one_call = False
    fasa_across_calls = True
    #: the attention analyses (``freecure analyze``) likewise map the engine's FD and PD rows onto
    #: these calls: each call tells ``analysis_state`` the engine row of each of its rows and
    #: whether it is PD's call (:meth:`_analysis_call`; docs/analysis.md, "Face-diffuser")
    analysis_across_calls = True
    analysis_state = None

    def __init__(
        self,
        pipeline,
        sdm_unet,
        image_encoder,
        postfuse,
        tdm_unet=None,
        start_merge_step: int | None = None,
        final_step: int | None = None,
        object_resolution: int = 512,
    ):
        super().__init__(pipeline, image_encoder, postfuse, object_resolution)
        self.sdm_unet = sdm_unet
        self.tdm_unet = pipeline.unet if tdm_unet is None else tdm_unet
        self.start_merge_step = start_merge_step
        self.final_step = final_step

    @property
    def fd_is_tdm(self) -> bool:
        return self.tdm_unet is self.pipeline.unet

    def unets(self) -> list[torch.nn.Module]:
        unets = [self.pipeline.unet, self.sdm_unet]
        return unets if self.fd_is_tdm else unets + [self.tdm_unet]

    def fasa_denoisers(self) -> list[torch.nn.Module]:
        """FASA goes on every UNet: FD's model records FD's keys, the TDM and SDM attend to them."""
        return self.unets()

    # -- construction ---------------------------------------------------------------
    options = (
        Option(
            "--face-diffuser-sdm",
            metavar="PATH",
            help="face-diffuser: SDM/pytorch_model.bin of CodeGoat24/Face-diffuser (file or folder); "
            "default: download from the Hub. With --tiny: a checkpoint of the tiny architecture",
        ),
        Option(
            "--face-diffuser-tdm",
            metavar="PATH",
            help="face-diffuser: TDM/pytorch_model.bin (file or folder); default: download from the Hub",
        ),
        Option(
            "--face-diffuser-start-merge-step",
            type=non_negative_int,
            metavar="N",
            help="face-diffuser: last TDM-only step (default: 15 at 50 steps, scaled to --steps)",
        ),
        Option(
            "--face-diffuser-final-step",
            type=non_negative_int,
            metavar="N",
            help="face-diffuser: last SNF step (default: 30 at 50 steps, scaled to --steps)",
        ),
        Option(
            "--face-diffuser-fd-model",
            choices=("tdm", "sd15"),
            default="tdm",
            help="face-diffuser: FD's model: the TDM (default) or the pretrained SD1.5 UNet "
            "of --base-model (then identity is injected from step 0)",
        ),
        Option(
            "--face-diffuser-object-resolution",
            type=positive_int,
            default=512,
            metavar="PIXELS",
            help="face-diffuser: reference resize before the image encoder (default 512)",
        ),
    )

    @classmethod
    def from_options(cls, args) -> FaceDiffuserBackend:
        return cls.from_pretrained(
            args.face_diffuser_sdm,
            args.face_diffuser_tdm,
            device=args.device,
            dtype=args.dtype,
            tiny=args.tiny,
            base_model=args.base_model,
            fd_model=args.face_diffuser_fd_model,
            start_merge_step=args.face_diffuser_start_merge_step,
            final_step=args.face_diffuser_final_step,
            object_resolution=args.face_diffuser_object_resolution,
        )

    @classmethod
    def from_pretrained(
        cls,
        sdm: str | os.PathLike | None = None,
        tdm: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        tiny: bool = False,
        base_model: str | None = None,
        fd_model: str = "tdm",
        start_merge_step: int | None = None,
        final_step: int | None = None,
        object_resolution: int = 512,
    ) -> FaceDiffuserBackend:
        """Face-diffuser with its released SDM and TDM.

        Args:
            sdm, tdm: ``SDM/pytorch_model.bin`` and ``TDM/pytorch_model.bin`` (files, their
                folders, or a folder holding ``SDM/`` and ``TDM/``); None downloads them from
                :data:`HUB_REPO_ID` (only the local cache is read when HF_HUB_OFFLINE=1).
            device, dtype: default CUDA + float16 when available, else CPU + float32.
            tiny: tiny random components instead (offline); given checkpoints of the tiny
                architecture are loaded into them.
            base_model: the SD1.5 model whose UNet is FD's with ``fd_model="sd15"`` (and whose
                tokenizer is used when open-clip-torch is not installed).
            fd_model: ``"tdm"`` (default) or ``"sd15"``: the model of FD's rows.
            start_merge_step, final_step, object_resolution: see the class.
        """
        from ...core.runtime import resolve_device, resolve_dtype

        if fd_model not in ("tdm", "sd15"):
            raise InputError(f"face-diffuser: fd_model must be 'tdm' or 'sd15', got {fd_model!r}")
        device = resolve_device(device if device is None else str(device))
        dtype = torch.float32 if tiny else (dtype or resolve_dtype(None, device))
        if not tiny:
            logger.warning("Face-diffuser weights: %s", LICENSE)
        if tiny:
            sdm_model, tdm_model = FastComposerModel.tiny(seed=1), TextDrivenModel.tiny(seed=0)
        else:
            sdm_model, tdm_model = FastComposerModel.sd15("meta"), TextDrivenModel.sd15("meta")
        for model, given, filename, option in (
            (sdm_model, sdm, SDM_FILENAME, "--face-diffuser-sdm"),
            (tdm_model, tdm, TDM_FILENAME, "--face-diffuser-tdm"),
        ):
            if given is not None or not tiny:
                what = f"Face-diffuser {filename.split('/')[0]}"
                path = resolve_checkpoint(given, HUB_REPO_ID, filename, what, option)
                model.load_released(read_checkpoint(path), source=str(path))
        base_unet = None
        if fd_model == "sd15":
            base_unet = FastComposerModel.tiny(seed=2).unet if tiny else _pretrained_sd15_unet(base_model)
        # The original keeps only the TDM's UNet. (Moved inside a plain container: diffusers'
        # own `to(dtype)` warns about fp32 modules the SD1.5 UNet does not have.)
        tdm_unet = tdm_model.unet
        del tdm_model
        torch.nn.ModuleList([tdm_unet, sdm_model] + ([base_unet] if base_unet is not None else [])).to(device, dtype)
        tokenizer = tiny_tokenizer() if tiny else sd15_tokenizer(base_model)
        pipeline = sdm_model.to_pipeline(tokenizer, unet=tdm_unet if base_unet is None else base_unet)  # FD's model
        return cls(
            pipeline, sdm_model.unet, sdm_model.image_encoder, sdm_model.postfuse_module,
            tdm_unet=tdm_unet,
            start_merge_step=start_merge_step,
            final_step=final_step,
            object_resolution=object_resolution,
        )

    # -- conditioning ---------------------------------------------------------------
    def schedule(self, num_inference_steps: int) -> tuple[int, int]:
        """(start_merge_step, final_step) for T steps."""
        start = scaled_step(15, num_inference_steps) if self.start_merge_step is None else self.start_merge_step
        final = scaled_step(30, num_inference_steps) if self.final_step is None else self.final_step
        if not 0 <= start <= num_inference_steps - 2:
            raise InputError(
                f"face-diffuser: start_merge_step {start} must lie in 0..{num_inference_steps - 2} "
                f"for {num_inference_steps} steps"
            )
        if final < start:
            raise InputError(f"face-diffuser: final_step {final} is before start_merge_step {start}")
        return start, final

    def identity_conditions(self, parsed, references, fd, num_inference_steps):
        start, final = self.schedule(num_inference_steps)
        augmented = self.augmented_conditioning(parsed, references)
        pd = FaceDiffuserConditioning(augmented.prompt_embeds, text_only=fd, start_merge_step=start, final_step=final)
        return pd, (start + 1 if self.fd_is_tdm else 0)

    # -- noise prediction -----------------------------------------------------------
    def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size):
        """FD model on every non-PD row; Face-diffuser's TDM/SNF/SDM on PD's row pairs.

        PD's rows come in (``pd_uncond``, ``pd``) pairs on one latent, anywhere among the rows
        (as every batch layout of the engine puts them); each pair gets :func:`snf_rows`.
        """
        keys = list(row_keys)
        conds = [i for i, key in enumerate(keys) if key == PD]
        unconds = [i for i, key in enumerate(keys) if key == PD_UNCOND]
        others = [i for i, key in enumerate(keys) if key not in (PD, PD_UNCOND)]
        if not conds and (not unconds or self.fasa_state is not None):
            # before injection PD is FD's model; FASA's rows then hold a lone pd_uncond row
            return self._unet(self.pipeline.unet, latents, timestep, rows, list(range(len(keys))), pd_maps=True)
        pairs = self._pd_pairs(latents, keys, conds, unconds, others)
        pd = rows[pairs[0][1]]
        if not isinstance(pd, FaceDiffuserConditioning):
            raise TypeError("face-diffuser: PD rows need the FaceDiffuserConditioning of identity_conditions")
        stage = snf_stage(step_index, pd.start_merge_step, pd.final_step)
        w = self.guidance_scale
        if stage == SNF and w is None:
            raise ValueError(
                "face-diffuser's saliency fusion needs the guidance scale: set backend.guidance_scale "
                "(FreeCurePipeline does)"
            )

        # 1. TDM rows: e(∅), e(c) per PD pair, after the FD rows in one call when FD is the TDM.
        pd_latents = torch.cat([latents[[u, c]] for u, c in pairs])
        tdm_rows = [row for u, c in pairs for row in (rows[u], pd.text_only)]
        fd_latents, fd_rows = latents[others], [rows[i] for i in others]
        e = s = None
        # (for FASA: the engine row each row of these calls comes from; a pair's unconditional
        # parts e(∅), s(c) from pd_uncond's row, its conditional parts e(c), s(c̃) from pd's)
        pd_origin = [row for pair in pairs for row in pair]
        if stage in (TEXT, SNF) and self.fd_is_tdm:
            eps = self._unet(
                self.tdm_unet,
                torch.cat([fd_latents, pd_latents]),
                timestep,
                fd_rows + tdm_rows,
                others + pd_origin,
                pd_maps=stage == TEXT,
            )
            eps_fd, e = eps[: len(others)], eps[len(others) :]
        else:
            eps_fd = self._unet(self.pipeline.unet, fd_latents, timestep, fd_rows, others) if others else None
            if stage in (TEXT, SNF):
                e = self._unet(self.tdm_unet, pd_latents, timestep, tdm_rows, pd_origin, pd_maps=stage == TEXT)
        # 2. SDM rows: s(c), s(c̃) per PD pair.
        if stage in (SNF, SUBJECT):
            sdm_rows = [row for _, c in pairs for row in (pd.text_only, rows[c])]
            s = self._unet(self.sdm_unet, pd_latents, timestep, sdm_rows, pd_origin, pd_maps=True, identity=True)

        # 3. Per-row predictions whose guided combination is the original's ε.
        out = torch.empty_like(latents)
        if others:
            out[others] = eps_fd.to(out.dtype)
        for k, (u, c) in enumerate(pairs):
            pair = slice(2 * k, 2 * k + 2)
            if stage == TEXT:
                eps_u, eps_c = e[pair].unbind()
            elif stage == SUBJECT:
                eps_u, eps_c = s[pair].unbind()
            else:
                (e_null, e_text), (s_text, s_aug) = e[pair].unbind(), s[pair].unbind()
                eps_u, eps_c, _ = snf_rows(e_null[None], e_text[None], s_text[None], s_aug[None], w)
            out[u], out[c] = eps_u.to(out.dtype).squeeze(0), eps_c.to(out.dtype).squeeze(0)
        return out

    @staticmethod
    def _pd_pairs(latents, keys, conds, unconds, others) -> list[tuple[int, int]]:
        """(pd_uncond, pd) row pairs (the k-th of each key, in row order), checked to share their
        latent; the other rows may come before or after them (FASA's layout puts PD first)."""
        if len(conds) != len(unconds):
            shared = " (approximate_shared_uncond is not supported by face-diffuser)" if "uncond" in keys else ""
            raise InputError(
                "face-diffuser needs classifier-free guidance with PD's own unconditional row next to "
                "each PD row (its SDM is guided from the text-only prompt, not from the negative one; "
                f"the original asserts guidance_scale > 1){shared}; got rows {keys}"
            )
        pairs = list(zip(unconds, conds))
        for u, c in pairs:
            if not torch.equal(latents[u], latents[c]):
                raise ValueError(f"face-diffuser: rows {u} (pd_uncond) and {c} (pd) hold different latents")
        return pairs

    def _unet(
        self,
        unet,
        latents,
        timestep,
        rows: Sequence[TextConditioning],
        origin=None,
        pd_maps: bool = False,
        identity: bool = False,
    ) -> torch.Tensor:
        """One call of ``unet``; ``origin``: the engine row of each row, for FASA's and the
        analyses' hand-over; ``pd_maps``/``identity``: see :meth:`_analysis_call`."""
        embeds = torch.cat([row.prompt_embeds for row in rows]).to(device=latents.device, dtype=unet.dtype)
        with self._fasa_call(origin), self._analysis_call(origin, pd_maps, identity):
            return unet(latents.to(unet.dtype), timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    @contextlib.contextmanager
    def _analysis_call(self, origin: Sequence[int] | None, pd_maps: bool, identity: bool):
        """During an analysis (``analysis_state`` set by :mod:`freecure.analysis.studies`), tell it
        which engine row each row of this call comes from. ``pd_maps``: this call's row from PD's
        conditional engine row stands for PD (the SDM's s(c̃) from SNF on; the TDM's e(c) in the
        text-only stage; FD's model before injection, where PD's row is FD's). ``identity``: the
        call sees the identity-augmented prompt c̃ (the SDM's), where eq. 3 applies."""
        state = self.analysis_state
        if state is None or origin is None:
            yield
            return
        with state.in_call(list(origin), pd_maps=pd_maps, identity=identity):
            yield

    @contextlib.contextmanager
    def _fasa_call(self, origin: Sequence[int] | None):
        """During the FASA pass, map the engine's ``(PD row, FD row, image)`` pairs onto one of
        this backend's calls: rows from an FD row record their keys and values, rows from a PD
        row attend to the ones recorded (in this call, or the FD model's earlier call)."""
        state = self.fasa_state
        if state is None or origin is None:
            yield
            return
        with state.mapped_call(origin):
            yield


def _pretrained_sd15_unet(base_model: str | None):
    """The pretrained SD1.5 UNet of ``base_model`` (for ``--face-diffuser-fd-model sd15``)."""
    from diffusers import UNet2DConditionModel

    from ...core.errors import WeightsNotFoundError

    source = base_model or SD15_REPO_ID
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    except (OSError, ValueError) as error:
        raise WeightsNotFoundError(
            f"could not load the SD1.5 UNet of {source!r} for FD ({str(error).splitlines()[0]}); "
            "give --base-model (Hub id or local folder), use --face-diffuser-fd-model tdm, or run with --tiny"
        ) from None
    if unet.config.cross_attention_dim != SD15_UNET_CONFIG["cross_attention_dim"]:
        raise WeightsNotFoundError(f"{source!r} is not an SD1.5-family model (its UNet's cross-attention dim differs)")
    return unet
