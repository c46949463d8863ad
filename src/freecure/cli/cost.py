"""`freecure cost`: UNet calls and batch items of plain PD, the literal paper and this engine,
counted by running each schedule on the tiny pipeline."""

from __future__ import annotations

from ..core.atomic import json_text
from . import options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cost",
        help="count UNet calls and batch items: plain PD vs the paper read literally vs this engine",
        description="Runs each schedule on tiny random-weight components and counts the UNet work.",
    )
    parser.add_argument("--steps", type=options.steps, default=None, help="denoising steps (default: 50; FLUX 28)")
    parser.add_argument("--gamma", type=options.finite_float(0.0, 1.0, open_minimum=True), default=0.5)
    parser.add_argument("--inject-step", type=options.non_negative_int, default=10)
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
        choices=["sd15", "sdxl", "flux"],
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
        default="rofa",
        help="which correction to count: the paper's ROFA (default), the authors' FASA, or both",
    )
    parser.add_argument(
        "--backend",
        choices=["token-fusion", "ip-adapter-faceid", "instantid", "pulid-sdxl", "pulid-flux"],
        default="token-fusion",
        help="tiny backend to count (instantid and pulid-sdxl run on SDXL only, pulid-flux on FLUX only; "
        "InstantID's IdentityNet calls are counted as UNet calls)",
    )
    parser.add_argument(
        "--faceid-fd-lora", choices=["keep", "off"], default=None,
        help="ip-adapter-faceid: keep (default) or off: FD without the LoRA costs a separate FD call per step",
    )
    parser.add_argument(
        "--instantid-fd",
        choices=["zero-identity", "no-identitynet"],
        default=None,
        help="instantid: FD's IdentityNet input (default zero-identity)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


#: Options of one backend: dest → (option, the backend that reads it).
BACKEND_ONLY = {
    "faceid_fd_lora": ("--faceid-fd-lora", "ip-adapter-faceid"),
    "instantid_fd": ("--instantid-fd", "instantid"),
}


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
    for dest, (option, backend) in BACKEND_ONLY.items():
        if getattr(args, dest) is not None and args.backend != backend:
            raise InputError(
                f"{option} is an option of the {backend} backend and would be ignored with "
                f"--backend {args.backend}; drop it or pass --backend {backend}"
            )
    if args.steps is None:
        args.steps = 28 if args.family == "flux" else 50
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


def run(args) -> int:
    from ..backends import RandomProjectionIdentityEncoder, TokenFusionBackend
    from ..backends.common.random_identity import text_dim
    from ..cost import count_costs
    from ..families.tiny import LayoutFaceParser, tiny_pipeline
    from ..pipeline import FreeCureConfig, FreeCurePipeline

    check(args)
    if args.backend == "ip-adapter-faceid":
        from ..backends import IPAdapterFaceIDBackend

        backend = IPAdapterFaceIDBackend.tiny(args.family, fd_lora=args.faceid_fd_lora != "off")
        pipeline = backend.pipeline
    elif args.backend == "instantid":
        from ..backends import InstantIDBackend

        backend = InstantIDBackend.tiny(fd_identitynet=args.instantid_fd != "no-identitynet")
        pipeline = backend.pipeline
    elif args.backend == "pulid-sdxl":
        from ..backends import PuLIDSDXLBackend

        backend = PuLIDSDXLBackend.tiny()
        pipeline = backend.pipeline
    elif args.backend == "pulid-flux":
        from ..backends import PuLIDFluxBackend

        backend = PuLIDFluxBackend.tiny()
        pipeline = backend.pipeline
    else:
        pipeline = tiny_pipeline(args.family)
        backend = TokenFusionBackend(pipeline, RandomProjectionIdentityEncoder(text_dim(pipeline)))
    config = FreeCureConfig(
        gamma=args.gamma,
        expression_guidance_scale=args.expression_guidance_scale,
        inversion_guidance_scale=args.inversion_guidance_scale,
        approximate_shared_uncond=args.approximate_shared_uncond,
    )
    freecure = FreeCurePipeline(backend, LayoutFaceParser(), config)
    freecure.set_progress_bar_config(disable=True)
    pipeline.set_progress_bar_config(disable=True)
    result = count_costs(
        freecure,
        num_inference_steps=args.steps,
        inject_step=args.inject_step,
        guidance_scale=args.guidance_scale,
        true_cfg_scale=args.true_cfg_scale,
    )
    if args.method in ("fasa", "both"):
        from ..cost import count_fasa_costs

        result.update(
            count_fasa_costs(
                freecure,
                num_inference_steps=args.steps,
                inject_step=args.inject_step,
                guidance_scale=args.guidance_scale,
                true_cfg_scale=args.true_cfg_scale,
            )
        )
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
