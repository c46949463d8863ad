"""`freecure cost`: UNet calls and batch items of plain PD, the literal paper and this engine,
counted by running each schedule on the tiny pipeline."""

from __future__ import annotations

from ..backends import BACKENDS, DEFAULT_BACKEND
from ..core.atomic import json_text
from ..families.tiny import TINY_FAMILIES
from ..stages.config import PRESETS
from . import options
from .generate import add_backend_options, backend_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cost",
        help="count UNet calls and batch items: plain PD vs the paper read literally vs this engine",
        description="Runs each schedule on tiny random-weight components and counts the UNet work.",
    )
    parser.add_argument("--steps", type=options.steps, default=None, help="denoising steps (default: 50; FLUX 28)")
    parser.add_argument("--gamma", type=options.finite_float(0.0, 1.0, open_minimum=True), default=0.5)
    parser.add_argument(
        "--inject-step",
        type=options.non_negative_int,
        default=None,
        help="identity injection step (default 10; 0 for a backend whose identity enters at step 0 by design)",
    )
    parser.add_argument(
        "--expression-guidance-scale",
        type=options.finite_float(1.0, 100.0),
        default=None,
        help="guidance of the expression re-denoising (default: the run's guidance scale)",
    )
    parser.add_argument("--inversion-guidance-scale", type=options.finite_float(1.0, 100.0), default=1.0)
    parser.add_argument(
        "--approximate-shared-uncond",
        action="store_true",
        help="3 rows instead of 4 after injection (not for FLUX without --true-cfg-scale > 1)",
    )
    parser.add_argument(
        "--family",
        choices=TINY_FAMILIES,
        default=None,
        help="tiny model family, one --backend runs on (default: the backend's first, sd15 for token-fusion)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=options.finite_float(0.0, 100.0),
        default=None,
        help="default: 7.5 SD1.5, 5.0 SDXL, 3.5 (embedded) FLUX",
    )
    parser.add_argument(
        "--true-cfg-scale",
        type=options.finite_float(1.0, 100.0),
        default=1.0,
        help="FLUX's true CFG, 1 … 100 (above 1: two rows per lane)",
    )
    parser.add_argument(
        "--method",
        choices=["rofa", "fasa", "both"],
        default=None,
        help="which correction to count: ROFA (default), FASA, or both (default with --preset: the preset's)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="count a preset's schedules: its correction, FASA settings and expression stage (docs/engine.md)",
    )
    parser.add_argument(
        "--expression",
        choices=["on", "off"],
        default=None,
        help="count the expression stage after the correction or not (default: the preset's, else on after "
        "rofa, off after fasa)",
    )
    parser.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=DEFAULT_BACKEND,
        help="the tiny backend to count, built as `freecure generate --tiny` builds it (--family: one it runs "
        "on); every denoiser it calls counts (InstantID's IdentityNet, InfiniteYou's InfuseNet, …)",
    )
    add_backend_options(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def check(args) -> None:
    """Everything checked before a model is built; resolves ``args.family`` and ``args.steps``.

    The families a backend runs on are the backend's own (``Backend.families``).

    Raises:
        InputError: a family the backend does not run on, an option another backend reads,
            an injection step outside the schedule, or a guidance option the family ignores.
    """
    from ..backends import BACKENDS
    from ..core.errors import InputError

    families = BACKENDS[args.backend].families
    if args.family is not None and args.family not in families:
        raise InputError(
            f"--family {args.family}: the {args.backend} backend runs on {', '.join(families)} only; "
            f"pass --family {families[0]} or drop it"
        )
    args.family = args.family or families[0]
    own = backend_options(args.backend)
    for name in sorted(BACKENDS):
        for dest, option in backend_options(name).items():
            if name != args.backend and dest not in own and getattr(args, dest, None) != option.default:
                raise InputError(
                    f"{option.flag} is an option of the {name} backend and would be ignored with "
                    f"--backend {args.backend}; drop it or pass --backend {name}"
                )
    if args.steps is None:
        args.steps = 28 if args.family == "flux" else 50
    if args.inject_step is None:
        fixed = BACKENDS[args.backend].fixed_injection_step
        args.inject_step = 10 if fixed is None else fixed
    if not 0 <= args.inject_step < args.steps:
        raise InputError(f"--inject-step must lie in 0..{args.steps - 1}, got {args.inject_step}")
    if args.family == "flux" and args.true_cfg_scale <= 1.0 and args.approximate_shared_uncond:
        raise InputError(
            "--approximate-shared-uncond would be ignored: FLUX without true classifier-free guidance has no "
            "unconditional row to share; pass --true-cfg-scale > 1 to use it, or drop it"
        )
    if args.family != "flux" and args.true_cfg_scale != 1.0:
        raise InputError(
            f"--true-cfg-scale is FLUX's true classifier-free guidance; --family {args.family} is Stable Diffusion, "
            "whose guidance is --guidance-scale: drop --true-cfg-scale"
        )


#: The run settings ``freecure cost`` builds its tiny backend with (as ``generate --tiny``).
BUILD_SETTINGS = dict(
    tiny=True, base_model=None, device="cpu", dtype=None, parser=None, parser_weights=None, scheduler=None,
    offload="none", vae_tiling=False, vae_slicing=False, compile=False, compile_mode=None, trigger=None, ref=[],
    negative_prompt=None, pd_region="placement", attention_aggregation="per_resolution",
)


def build(args):
    """The tiny FreeCure pipeline to count, through the builder ``freecure generate`` uses."""
    import argparse

    from ..build import build_freecure

    settings = argparse.Namespace(**{**BUILD_SETTINGS, **vars(args)})
    settings.tiny_family, settings.method = args.family, "fasa" if args.method == "both" else args.method
    freecure = build_freecure(settings)
    freecure.set_progress_bar_config(disable=True)
    freecure.pipeline.set_progress_bar_config(disable=True)
    return freecure


def run(args) -> int:
    from ..cost import count_costs, count_fasa_costs

    check(args)
    if args.method is None:
        args.method = PRESETS[args.preset].method if args.preset else "rofa"
    freecure = build(args)
    counted = dict(
        num_inference_steps=args.steps,
        inject_step=args.inject_step,
        guidance_scale=args.guidance_scale,
        true_cfg_scale=args.true_cfg_scale,
    )
    result = count_costs(freecure, **counted)  # plain PD, and ROFA's schedules
    if args.method in ("fasa", "both"):
        result.update(count_fasa_costs(freecure, **counted))
    if args.json:
        print(json_text(result), end="")
        return 0
    settings = result["settings"]
    print(
        f"{settings['family']} denoiser work at {settings['num_inference_steps']} steps, injection at step "
        f"{settings['inject_step']}, guidance {settings['guidance_scale']}, true CFG {settings['true_cfg_scale']}, "
        f"γ={settings['gamma']} (prompt: {settings['prompt']!r})"
    )
    print(f"{'schedule':<12} {'calls':>10} {'batch items':>12}")
    names = {"rofa": ("literal", "engine"), "fasa": ("literal_fasa", "engine_fasa")}
    shown = ("plain_pd", *[n for m in ("rofa", "fasa") if args.method in (m, "both") for n in names[m]])
    for name in shown:
        if result[name] is None:
            print(f"{name:<12} {'—':>10} {'—':>12}  (the authors' one-batch schedule: not for {args.backend})")
            continue
        print(f"{name:<12} {result[name]['unet_calls']:>10} {result[name]['batch_items']:>12}")
        for stage, counts in result[name].get("stages", {}).items():  # the engines' stages
            print(f"  {stage:<10} {counts['unet_calls']:>10} {counts['batch_items']:>12}")
    expression = result["engine"]["stages"].get("expression", {})
    if expression.get("ran") and "engine" in shown:
        print(
            f"expression stage: inversion at w={settings['inversion_guidance_scale']}, re-denoising at "
            f"w={settings['expression_guidance_scale']} ({expression['batch_items']} rows)"
        )
    return 0
