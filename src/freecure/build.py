"""Build a FreeCure pipeline from options: one builder for the command line, the demo and ``freecure cost``.

The options are attributes of one object (an argparse namespace from the command line, or
``Backend.build_options`` from Python and the demo): the run's settings, the FreeCure method
(``--preset``, ``--method``, FASA's options, ``--expression``), and the chosen backend's own
declared options. Nothing here knows a backend by name: each is found in the registry and built
by its own ``from_options``.
"""

from __future__ import annotations

import argparse

from .backends import BACKENDS
from .core.errors import InputError
from .core.runtime import apply_memory_options, compile_denoiser, resolve_device, resolve_dtype, set_scheduler


def resolve_tiny_family(args: argparse.Namespace) -> None:
    """``args.tiny_family``: the one given, which must be a family the backend runs on
    (``Backend.families``), else (with ``--tiny``) the backend's default, its first; in place.

    Raises:
        InputError: a ``--tiny-family`` the backend cannot build.
    """
    backend = BACKENDS[args.backend]
    families = backend.families
    given = getattr(args, "tiny_family", None)
    own = getattr(args, backend.family_option, None) if backend.family_option else None
    if given is not None and own is not None and given != own:
        option = "--" + backend.family_option.replace("_", "-")
        raise InputError(
            f"--tiny-family {given} and {option} {own} disagree ({option} would win); give one of them"
        )
    given = given or own
    if given is not None and given not in families:
        raise InputError(
            f"--tiny-family {given} would be ignored: the {args.backend} backend runs on {', '.join(families)} "
            f"only; pass --tiny-family {families[0]} or drop it"
        )
    if args.tiny:
        args.tiny_family = given or families[0]


def run_is_flux(args: argparse.Namespace) -> bool | None:
    """Whether the run's model is FLUX, known before any model loads from the backend's
    families and ``--tiny-family``; None when only the loaded base model can tell (a backend
    that runs on several families, with real weights)."""
    families = BACKENDS[args.backend].families
    if args.tiny:
        return (getattr(args, "tiny_family", None) or families[0]) == "flux"
    if "flux" not in families:
        return False
    return True if families == ("flux",) else None


def check_family_options(args: argparse.Namespace, flux: bool | None) -> None:
    """Refuse the guidance options the model family would ignore or cannot use: FLUX (``flux``
    True) reads ``--negative-prompt`` and ``--approximate-shared-uncond`` only with true CFG
    (``--true-cfg-scale`` > 1); Stable Diffusion (False) has no ``--true-cfg-scale``. None:
    not known yet (checked again by :func:`build_freecure` once the model is loaded)."""
    true_cfg = getattr(args, "true_cfg_scale", 1.0) > 1.0
    if flux and not true_cfg:
        if args.negative_prompt is not None:
            raise InputError(
                "--negative-prompt would be ignored: FLUX is guidance-distilled and reads a negative prompt only "
                "with true classifier-free guidance; pass --true-cfg-scale > 1 to use it, or drop it"
            )
        if args.approximate_shared_uncond:
            raise InputError(
                "--approximate-shared-uncond would be ignored: FLUX without true classifier-free guidance has no "
                "unconditional row to share; pass --true-cfg-scale > 1 to use it, or drop it"
            )
    if flux is False and getattr(args, "true_cfg_scale", 1.0) != 1.0:
        raise InputError(
            f"--true-cfg-scale is FLUX's true classifier-free guidance; the {args.backend} backend runs Stable "
            "Diffusion, whose guidance is --guidance-scale: drop --true-cfg-scale"
        )


def fasa_config(args: argparse.Namespace):
    """The :class:`~freecure.stages.fasa.FasaConfig` of the parsed options (its defaults for
    those not given)."""
    from .stages.fasa import FasaConfig

    return FasaConfig(**fasa_given(args))


def build_face_parser(args):
    from .families.tiny import LayoutFaceParser

    choice = args.parser or ("layout" if args.tiny else "bisenet")
    if choice == "layout":
        return LayoutFaceParser()
    from .parsing import BiSeNetFaceParser

    return BiSeNetFaceParser.from_pretrained(args.parser_weights, device=args.device)


def build_freecure(args: argparse.Namespace):
    """The FreeCure pipeline that :func:`add_model_arguments`' options describe.

    Resolves ``args.device`` and ``args.dtype`` in place (the backends read them).
    """
    from .pipeline import FreeCurePipeline

    resolve_tiny_family(args)  # the demo builds here without check_model_arguments
    BACKENDS[args.backend].check_identity_files(args)  # the identity files fit the backend, before any model loads
    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)
    if args.compile and args.offload != "none":
        raise InputError("--compile and --offload do not combine (offload hooks move weights inside the compiled call)")
    if args.offload == "sequential" and args.device.type == "cpu":
        raise InputError("--offload sequential needs a GPU (accelerate cannot stream weights to the CPU); use model")
    config = freecure_config(args)
    if getattr(args, "trigger", None) is None:
        args.trigger = BACKENDS[args.backend].default_trigger  # PhotoMaker's prompts always carry 'img'
    backend = BACKENDS[args.backend].from_options(args)
    family = backend.family
    check_family_options(args, family.name == "flux")  # a base model of a backend with several families
    args.scheduler = args.scheduler or family.default_scheduler
    if args.scheduler not in family.schedulers:
        choices = ", ".join(family.schedulers)
        raise InputError(f"--scheduler {args.scheduler} does not fit a {family.name} model; choose one of {choices}")
    set_scheduler(backend.pipeline, args.scheduler)
    apply_memory_options(backend.pipeline, args.device, args.offload, args.vae_tiling, args.vae_slicing)
    if args.compile:
        compile_denoiser(backend.denoiser, mode=args.compile_mode)
    return FreeCurePipeline(backend, build_face_parser(args), config)


def guidance_scale(args: argparse.Namespace, backend) -> float:
    """``--guidance-scale``, else the backend's original default (7.5 for plain SD1.5)."""
    return args.guidance_scale if args.guidance_scale is not None else backend.default_guidance_scale


def resolve_method(args: argparse.Namespace) -> None:
    """``args.method`` as the run will use it: given, else the ``--preset``'s, else ROFA; in place.
    (The expression stage is resolved by :class:`FreeCureConfig`: the option, else the preset's,
    else the correction's default.)"""
    from .stages.config import PRESETS

    preset = PRESETS[args.preset] if getattr(args, "preset", None) else None
    if getattr(args, "method", None) is None:
        args.method = preset.method if preset is not None else "rofa"


def freecure_config(args: argparse.Namespace):
    """The :class:`~freecure.pipeline.FreeCureConfig` the options describe: the ``--preset``
    (if any) with every option given beside it on top."""
    from .stages.config import FreeCureConfig

    resolve_method(args)
    settings = dict(
        gamma=args.gamma,
        expression_guidance_scale=args.expression_guidance_scale,
        inversion_guidance_scale=args.inversion_guidance_scale,
        approximate_shared_uncond=args.approximate_shared_uncond,
        pd_region=args.pd_region,
        attention_aggregation=args.attention_aggregation,
        method=args.method,
    )
    expression = getattr(args, "expression", None)
    if expression is not None:
        settings["expression"] = expression == "on"
    preset = getattr(args, "preset", None)
    if preset:
        return FreeCureConfig.from_preset(preset, fasa=fasa_given(args), **settings)
    return FreeCureConfig(fasa=fasa_config(args), **settings)


def fasa_given(args: argparse.Namespace) -> dict:
    """The FASA settings given on the command line, by :class:`FasaConfig` field."""
    from .attention.fasa import LAYER_PRESETS

    given = {}
    layers = getattr(args, "fasa_layers", None)
    if layers is not None:
        preset = len(layers) == 1 and layers[0] in LAYER_PRESETS
        given["layers"] = layers[0] if preset else tuple(layers)
    for field, dest in (
        ("mask_source", "fasa_mask"),
        ("mask_weight", "fasa_mask_weight"),
        ("uncond", "fasa_uncond"),
        ("form", "fasa_form"),
    ):
        if getattr(args, dest, None) is not None:
            given[field] = getattr(args, dest)
    return given
