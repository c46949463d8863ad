"""The backend protocol: what a personalization method tells the FreeCure engine.

A backend wraps a diffusers text-to-image pipeline (SD1.5, SDXL or FLUX family) and says:

- the conditioning of FD (the prompt without identity) and of PD (with identity), and the
  unconditional (negative) branch of each;
- the denoising step from which identity is injected (before it PD's conditioning equals
  FD's, as with PhotoMaker's ``start_merge_step`` or FastComposer's delayed conditioning);
- how a batch of rows is turned into predictions (:meth:`Backend.predict_noise`: ε for a
  UNet, the flow velocity for FLUX), which a backend overrides when its PD is more than
  another conditioning (two UNets, a ControlNet, per-row adapter gates).

What differs between model families (denoiser, latent layout, text encoders, schedules,
decoding) is not here but in the backend's :attr:`Backend.family`
(:mod:`freecure.families`); a backend for a new method on a known family only implements
:meth:`Backend.identity_conditions` and, if needed, :meth:`Backend.predict_noise`.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from PIL import Image

from ..core.attributes import ParsedPrompt
from ..core.conditioning import Conditions, TextConditioning
from ..core.deprecation import moved_names
from ..core.errors import InputError
from ..core.options import Option
from ..families import family_of
from ..families.base import ModelFamily

#: The run's settings a backend is built with, beside its own options, and their defaults.
RUN_SETTINGS: dict[str, object] = {
    "tiny": False,
    "tiny_family": None,
    "base_model": None,
    "device": None,
    "dtype": None,
    "trigger": None,
    "ref": (),
    "parser_weights": None,
}


class Backend:
    """Base class of personalization backends.

    Subclasses implement :meth:`identity_conditions`; most keep the default
    :meth:`predict_noise`, which is one denoiser call on the stacked rows.
    """

    #: Registry name, e.g. ``"token-fusion"``.
    name: str = "base"
    #: The model families the backend runs on, its default first: ``"sd15"``, ``"sdxl"``,
    #: ``"flux"`` (``freecure.tiny.tiny_pipeline``'s names). ``--tiny --tiny-family`` must name
    #: one of them, and the CLI knows from them, before any model loads, whether a run is FLUX.
    families: tuple[str, ...] = ("sd15", "sdxl", "flux")
    #: The backend's own option that picks its model family (its ``args`` attribute, e.g.
    #: ``"faceid_family"``), or None; ``--tiny-family`` must agree with it when both are given.
    family_option: str | None = None
    #: Licence of the backend's own checkpoints, shown to users.
    license: str = "n/a"
    #: Guidance scale w of the FD/PD passes, set by ``FreeCurePipeline`` before sampling. Only
    #: predictions that depend on w read it (Face-diffuser's saliency maps; FLUX's guidance
    #: embedding); classifier-free guidance itself is applied by the engine, after
    #: :meth:`predict_noise`.
    guidance_scale: float | None = None
    # A backend may say with ``rows_in_one_call`` (class attribute or property) whether every
    # row of a :meth:`predict_noise` call goes through one call of the denoiser (FASA and the
    # attention studies address FD's and PD's rows by their index in it); left unsaid, see
    # :func:`freecure.fasa.rows_in_one_call`.
    #: A backend whose rows are split over calls (``rows_in_one_call`` False) may still run FASA
    #: by mapping the engine's row pairs onto its own calls (:meth:`freecure.fasa.FasaState.set_call`,
    #: FD's keys handed to PD's calls); it reads the state from ``fasa_state`` during the FASA pass.
    fasa_across_calls: bool = False
    fasa_state = None
    #: Likewise for the attention studies (``freecure analyze``): a backend that tells the
    #: studies' state which engine row each row of its own calls came from (Face-diffuser).
    analysis_across_calls: bool = False

    #: The backend's own options, declared once: the command line's and the demo's controls are
    #: generated from them (:class:`~freecure.core.options.Option`).
    options: tuple[Option, ...] = ()
    #: Which of the class word's tokens carry the identity in PD's prompt (eq. 3's columns):
    #: ``"all"``, ``"last"``, or None for a backend whose identity enters elsewhere.
    prompt_identity: str | None = None
    #: How the identity enters when not as prompt tokens, in words (the attention studies say it).
    identity_mechanism: str = ""
    #: The trigger word its prompts carry after the class word when ``--trigger`` is not given
    #: (PhotoMaker: "img"), or None.
    default_trigger: str | None = None
    #: The injection step when the method fixes it (a reference-image model sees the photo from
    #: step 0); None when it follows the method's own schedule (``freecure cost`` then counts at 10).
    fixed_injection_step: int | None = None
    #: ``freecure embed``: how many reference photos its face-embedding file is computed from
    #: (None: all of them), or False for a backend whose identity file ``embed`` does not write.
    embed_references: int | None | bool = False

    def __init__(self, pipeline):
        self.pipeline = pipeline

    # -- construction from options ------------------------------------------------------------
    @classmethod
    def add_cli_arguments(cls, group) -> None:
        """Add this backend's :attr:`options` to an argparse parser or group."""
        for option in cls.options:
            option.add_to(group)

    #: What the backend's identity file (``--face-embedding`` …) holds, an
    #: :class:`~freecure.backends.common.identity_files.IdentitySchema`; None for a backend without one.
    identity_schema = None

    @classmethod
    def check_identity_files(cls, args) -> None:
        """Read and check the identity files the options name against :attr:`identity_schema`,
        with the widths of the model the options describe; called before any model loads.

        Raises:
            InputError: a file that does not fit, naming the tensor and what is expected.
        """

    @classmethod
    def from_options(cls, args) -> Backend:
        """Build the backend from its options: ``args`` carries the run's settings (``tiny``:
        tiny random components, offline; ``tiny_family``, ``base_model``, ``device``, ``dtype``,
        ``trigger``, ``ref``) and each of :attr:`options` by its ``dest``, parsed and checked —
        from the command line, or from Python and the demo through :meth:`build_options`.
        """
        raise NotImplementedError(f"backend {cls.name!r} cannot be built from options")

    @classmethod
    def from_cli(cls, args) -> Backend:
        """The former name of :meth:`from_options` (one release)."""
        from ..core.deprecation import _warn

        _warn(f"{cls.__name__}.from_cli", f"{cls.__name__}.from_options")
        return cls.from_options(args)

    @classmethod
    def build_options(cls, **values) -> SimpleNamespace:
        """The options :meth:`from_options` reads, from Python values: each declared option from
        ``values`` (checked as the command line checks it) or its default, and the run's settings
        (``tiny``, ``tiny_family``, ``base_model``, ``device``, ``dtype``, ``trigger``, ``ref``,
        ``parser_weights``) from ``values`` or None/False.

        Raises:
            InputError: a value that does not fit its option, or a name that is not an option.
        """
        own = {option.dest: option for option in cls.options}
        unknown = sorted(set(values) - set(own) - set(RUN_SETTINGS))
        if unknown:
            known = ", ".join(sorted(own)) or "none"
            raise InputError(f"the {cls.name} backend has no option {', '.join(unknown)} (its options: {known})")
        args = {name: values.get(name, default) for name, default in RUN_SETTINGS.items()}
        for dest, option in own.items():
            args[dest] = option.parse(values[dest]) if dest in values else option.default
        return SimpleNamespace(**args)

    @classmethod
    def embed_faces(cls, references, args):
        """``freecure embed``: (a function writing the identity file to a path, a summary of its
        tensors) for the reference photos; only for backends whose :attr:`embed_references` is
        not False. ``args``: ``tiny``, ``device`` and the command's weight options."""
        raise NotImplementedError(f"freecure embed does not compute the {cls.name} backend's identity file")

    @classmethod
    def tiny(cls, family: str | None = None, device: str = "cpu", **options) -> Backend:
        """The backend on tiny random components, offline (the images are noise): ``family`` one
        of :attr:`families` (default the first), ``options`` its declared options by name."""
        family = family or cls.families[0]
        if family not in cls.families:
            raise InputError(f"the {cls.name} backend runs on {', '.join(cls.families)}, not {family}")
        args = cls.build_options(tiny=True, tiny_family=family, device=torch.device(device), **options)
        cls.check_identity_files(args)
        return cls.from_options(args)

    # -- pipeline facts ---------------------------------------------------------------
    @property
    def family(self) -> ModelFamily:
        """The model family of the pipeline (:mod:`freecure.families`)."""
        return family_of(self.pipeline)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the engine steps with: the UNet, or FLUX's transformer."""
        return self.family.denoiser(self.pipeline)

    @property
    def unet(self):
        return self.pipeline.unet

    def unets(self) -> list[torch.nn.Module]:
        """Every denoiser this backend calls (FreeCure counts their calls)."""
        return [self.denoiser]

    def fasa_denoisers(self) -> list[torch.nn.Module]:
        """The networks whose attention FASA changes (default: the denoiser)."""
        return [self.denoiser]

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.pipeline, "text_encoder_2", None) is not None

    @property
    def tokenizer(self):
        """The tokenizer of the text stream the image attends to (token columns)."""
        return self.family.tokenizer(self.pipeline)

    @property
    def device(self) -> torch.device:
        return self.pipeline._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def default_guidance_scale(self) -> float:
        """The base pipeline's default (7.5 SD1.5, 5.0 SDXL, 3.5 embedded for FLUX.1-dev)."""
        return self.family.default_guidance_scale(self.pipeline)

    # -- conditioning -----------------------------------------------------------------
    def encode_text(self, prompt: str) -> TextConditioning:
        """Encode a prompt with the pipeline's own text encoder(s), no guidance."""
        return self.family.encode_text(self, prompt)

    def negative_conditioning(self, negative_prompt: str | None) -> TextConditioning:
        """The unconditional branch: the encoded negative prompt, or SDXL's zeros for none."""
        return self.family.negative_conditioning(self, negative_prompt)

    def identity_conditions(
        self,
        parsed: ParsedPrompt,
        references: Sequence[Image.Image],
        fd: TextConditioning,
        num_inference_steps: int,
    ) -> tuple[TextConditioning, int]:
        """PD's positive conditioning and its injection step. Implemented by subclasses."""
        raise NotImplementedError

    def conditions(
        self,
        parsed: ParsedPrompt,
        references: Sequence[Image.Image],
        num_inference_steps: int,
        negative_prompt: str | None = None,
    ) -> Conditions:
        """Every conditioning a FreeCure run needs, encoded once."""
        fd = self.encode_text(parsed.foundation_prompt)
        pd, inject_step = self.identity_conditions(parsed, references, fd, num_inference_steps)
        if not 0 <= inject_step < num_inference_steps:
            raise ValueError(f"{self.name}: injection step {inject_step} is outside 0..{num_inference_steps - 1}")
        template = self.encode_text(parsed.template_prompt)
        expression = (
            template
            if parsed.expression_prompt == parsed.template_prompt
            else self.encode_text(parsed.expression_prompt)
        )
        return Conditions(
            uncond=self.negative_conditioning(negative_prompt),
            fd=fd,
            pd=pd,
            inject_step=inject_step,
            template=template,
            expression=expression,
        )

    # -- noise prediction ---------------------------------------------------------------
    def added_cond_kwargs(self, rows: Sequence[TextConditioning], height: int, width: int) -> dict | None:
        """SDXL's extra conditioning (pooled text and size/crop time ids) for the rows."""
        if not self.is_sdxl:
            return None
        pooled = torch.cat([row.pooled_prompt_embeds for row in rows])
        # original size, crop top-left, target size (SDXL micro-conditioning, no crop).
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids.repeat(len(rows), 1)}

    def predict_noise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        rows: Sequence[TextConditioning],
        row_keys: Sequence[str],
        step_index: int,
        image_size: tuple[int, int],
    ) -> torch.Tensor:
        """The prediction for each batch row: ``latents[i]`` under conditioning ``rows[i]``; ε
        (or v) for a UNet, the flow velocity for FLUX (``self.family.prediction_type``).

        Args:
            latents: model inputs (already scaled by the scheduler), one per row, in the
                family's layout (FLUX: packed tokens).
            timestep: the scheduler's timestep.
            rows: conditioning of each row.
            row_keys: what each row is (``"uncond"``, ``"fd"``, ``"pd"``, ``"pd_uncond"``,
                ``"template"``, ``"expression"``) so an override can treat PD rows differently.
            step_index: index of the denoising step (0 = noisiest).
            image_size: (height, width) in pixels, for SDXL's time ids and FLUX's position ids.
        """
        return self.family.predict(self, latents, timestep, rows, image_size)


def rows_in_one_call(backend) -> bool:
    """Whether every row of the backend's ``predict_noise`` calls goes through one denoiser
    call: what the backend says with ``rows_in_one_call`` (an attribute or property: True for
    the adapters that only add their inputs to that call, False for Face-diffuser's TDM/SDM and
    for IP-Adapter-FaceID with FD's LoRA off); left unsaid, true only for the default
    ``predict_noise``."""
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


#: names of this module before the vocabulary moved to freecure.core.conditioning (one release)
__getattr__ = moved_names(__name__, ["freecure.core.conditioning"])
