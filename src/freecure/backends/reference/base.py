"""Reference-image models: the person's photo read in context, FD the same network without it.

FLUX.1 Kontext and FLUX.2 append the reference photos' latent tokens after the target image's
tokens in their joint attention (``FluxKontextPipeline``, ``Flux2Pipeline``,
``Flux2KleinPipeline``). For FreeCure that is the cleanest case there is:

- **PD** is the pipeline's own call: every PD row (its conditional row, and its negative row
  where the model uses real CFG) carries the reference tokens (:class:`ReferenceConditioning`);
- **FD** is the very same transformer without them: plain text-to-image, its rows plain
  :class:`TextConditioning`, their sequence simply shorter.

Which rows see the references is declared by their conditioning, not inferred. Rows of the two
lengths cannot share a batch, so :meth:`ReferenceImageBackend.predict_noise` makes two calls per
step, FD's rows first, and declares to the engine's processors which engine row each row of a
call comes from (FASA: :meth:`~freecure.attention.fasa.FasaState.mapped_call`; SAME's capture:
:meth:`~freecure.attention.capture.AttentionStore.in_call`; the attention studies:
``TokenMapStore.in_call``). Inside a PD call the reference tokens are never masked and never lend
keys: FASA and the maps address the target image's tokens only (those with image index 0).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from PIL import Image

from ...core.attributes import ParsedPrompt
from ...core.conditioning import Conditions, ReferenceConditioning, ReferenceTokens, TextConditioning
from ...core.errors import InputError
from ...core.options import Option
from ..base import Backend

logger = logging.getLogger(__name__)

#: ``--quantize`` choices: diffusers' own quantization configs for the transformer.
QUANTIZATIONS = ("none", "bnb-nf4", "torchao-int8wo")

QUANTIZE_OPTION = Option(
    "--quantize",
    choices=QUANTIZATIONS,
    default="none",
    help="reference-image models: load the transformer quantized with diffusers' BitsAndBytesConfig "
    "(bnb-nf4, needs bitsandbytes and CUDA) or TorchAoConfig (torchao-int8wo, needs torchao); default none",
)


def quantization_config(choice: str, dtype: torch.dtype):
    """The diffusers quantization config of ``--quantize`` (None for ``"none"``).

    Raises:
        InputError: the library the choice needs is not installed.
    """
    if choice == "none":
        return None
    if choice not in QUANTIZATIONS:
        raise InputError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {choice!r}")
    import importlib.util

    library = {"bnb-nf4": "bitsandbytes", "torchao-int8wo": "torchao"}[choice]
    if importlib.util.find_spec(library) is None:
        raise InputError(f"--quantize {choice} needs the {library} package: pip install {library}")
    if choice == "bnb-nf4":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    from diffusers import TorchAoConfig

    return TorchAoConfig("int8wo")


def _references(row: TextConditioning) -> ReferenceTokens | None:
    return row.references if isinstance(row, ReferenceConditioning) else None


class ReferenceImageBackend(Backend):
    """Base of the backends whose model reads the reference photos in context.

    Subclasses give the pipeline (``from_options``, ``build_tiny``) and, where the family's
    defaults do not fit, how the photos are resized (:attr:`reference_max_area`).

    Args:
        pipeline: the reference pipeline (``FluxKontextPipeline``, ``Flux2Pipeline``, …).
        face_detector: finds the face in each reference (default: MTCNN, whose weights ship in
            ``facenet-pytorch``); a photo without one is refused.
        reference_max_area: photos larger than this many pixels are first scaled down to it
            (tiny runs: 64²); None keeps the pipeline's own rule.
    """

    prompt_identity = None
    identity_mechanism = (
        "the reference photos' latent tokens appended to the joint attention's image sequence (PD's rows "
        "only); FD is the same transformer without them"
    )
    fixed_injection_step = 0
    rows_in_one_call = False  # FD's rows (shorter sequence) and PD's rows go through separate calls
    fasa_across_calls = True
    analysis_across_calls = True
    analysis_state = None
    capture_store = None
    #: the pipeline's call reads at most this many reference photos
    max_references: int | None = None

    def __init__(self, pipeline, face_detector=None, reference_max_area: int | None = None):
        super().__init__(pipeline)
        self.face_detector = face_detector
        self.reference_max_area = reference_max_area
        self.references: ReferenceTokens | None = None

    def encode_references_kwargs(self) -> dict:
        """Extra arguments of the family's ``encode_references`` (Kontext: ``auto_resize``)."""
        return {}

    # -- identity ---------------------------------------------------------------------------
    def check_faces(self, references: Sequence[Image.Image]) -> None:
        """Refuse reference photos in which no face is found: FreeCure cures a face's attributes,
        and a photo without one would silently personalize nothing."""
        if self.face_detector is None:
            from ...parsing.face_crop import MTCNNFaceDetector

            self.face_detector = MTCNNFaceDetector()
        for number, image in enumerate(references, start=1):
            if self.face_detector(image.convert("RGB")) is None:
                raise InputError(
                    f"reference photo {number} of {len(references)} shows no face MTCNN can find; give a photo in "
                    "which the person's face is visible"
                )

    @contextlib.contextmanager
    def unchecked_faces(self) -> Iterator[None]:
        """No face check for the block (``freecure cost`` counts model calls on a grey photo)."""
        detector = self.face_detector
        self.face_detector = lambda image: (0, 0, *image.size)
        try:
            yield
        finally:
            self.face_detector = detector

    def prepared_references(self, references: Sequence[Image.Image]) -> list[Image.Image]:
        """The photos scaled down to :attr:`reference_max_area` where they exceed it."""
        area = self.reference_max_area
        if area is None:
            return list(references)
        scaled = []
        for image in references:
            width, height = image.size
            if width * height > area:
                factor = (area / (width * height)) ** 0.5
                image = image.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.LANCZOS)
            scaled.append(image)
        return scaled

    def identity_conditions(
        self, parsed: ParsedPrompt, references: Sequence[Image.Image], fd: TextConditioning, num_inference_steps: int
    ) -> tuple[TextConditioning, int]:
        """PD's conditioning is FD's text plus the reference tokens, from the first step."""
        if not references:
            raise InputError(f"the {self.name} backend reads the person's photo in context: give --ref PHOTO")
        if self.max_references is not None and len(references) > self.max_references:
            raise InputError(
                f"the {self.name} backend reads at most {self.max_references} reference photos, got {len(references)}"
            )
        self.check_faces(references)
        images = self.prepared_references(references)
        self.references = self.family.encode_references(self.pipeline, images, None, **self.encode_references_kwargs())
        return ReferenceConditioning(fd.prompt_embeds, fd.pooled_prompt_embeds, references=self.references), 0

    def conditions(self, parsed, references, num_inference_steps, negative_prompt=None) -> Conditions:
        """As :meth:`Backend.conditions`, and PD's negative row sees the references too (the
        reference pipelines concatenate them to the negative call's input as well)."""
        conditions = super().conditions(parsed, references, num_inference_steps, negative_prompt)
        uncond = conditions.uncond
        pd_uncond = ReferenceConditioning(uncond.prompt_embeds, uncond.pooled_prompt_embeds, references=self.references)
        return replace(conditions, pd_uncond=pd_uncond)

    # -- the two calls of a step ----------------------------------------------------------
    def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size) -> torch.Tensor:
        """FD's rows (no references) in one call, then PD's rows (with them) in another; the
        predictions back in the engine's row order."""
        plain = [i for i, row in enumerate(rows) if _references(row) is None]
        seeing = [i for i, row in enumerate(rows) if _references(row) is not None]
        out = None
        for index in (plain, seeing):  # FD first: FASA records FD's keys before PD attends to them
            if not index:
                continue
            references = _references(rows[index[0]])
            if any(_references(rows[i]) is not references for i in index):
                raise ValueError(f"{self.name}: the rows of one call must share their reference tokens")
            with self.call_origin(index):
                part = self.family.predict(
                    self, latents[index], timestep, [rows[i] for i in index], image_size, references
                )
            if out is None:
                out = part.new_empty((latents.shape[0], *part.shape[1:]))
            out[index] = part
        return out

    @contextlib.contextmanager
    def call_origin(self, origin: Sequence[int]) -> Iterator[None]:
        """Tell the engine's processors which engine row each row of the next call comes from."""
        with contextlib.ExitStack() as stack:
            if self.fasa_state is not None:
                stack.enter_context(self.fasa_state.mapped_call(origin))
            if self.capture_store is not None:
                stack.enter_context(self.capture_store.in_call(origin))
            if self.analysis_state is not None:  # the identity is not in PD's prompt: no eq. 3 columns
                stack.enter_context(self.analysis_state.in_call(list(origin), pd_maps=True, identity=False))
            yield
