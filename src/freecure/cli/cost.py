"""`freecure cost`: UNet calls and batch items of plain PD, the literal paper and this engine,
counted by running each schedule on the tiny pipeline."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cost",
        help="count UNet calls and batch items: plain PD vs the paper read literally vs this engine",
        description="Runs each schedule on tiny random-weight components and counts the UNet work.",
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50; FLUX 28)")
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--inject-step", type=int, default=10)
    parser.add_argument("--expression-guidance-scale", type=float, default=1.0)
    parser.add_argument("--approximate-shared-uncond", action="store_true")
    parser.add_argument("--family", choices=["sd15", "sdxl", "flux"], default="sd15")
    parser.add_argument(
        "--backend",
        choices=["token-fusion", "pulid-sdxl", "pulid-flux"],
        default="token-fusion",
        help="tiny backend to count (pulid-sdxl runs on the tiny SDXL pipeline, pulid-flux on the tiny "
        "FLUX pipeline, whatever --family says)",
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="default: 7.5 SD1.5, 5.0 SDXL, 3.5 (embedded) FLUX"
    )
    parser.add_argument("--true-cfg-scale", type=float, default=1.0, help="FLUX's true CFG (two rows per lane)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..backends import RandomProjectionIdentityEncoder, TokenFusionBackend
    from ..backends.token_fusion import text_dim
    from ..cost import count_costs
    from ..errors import InputError
    from ..pipeline import FreeCureConfig, FreeCurePipeline
    from ..tiny import LayoutFaceParser, tiny_pipeline

    args.family = {"pulid-sdxl": "sdxl", "pulid-flux": "flux"}.get(args.backend, args.family)
    if args.steps is None:
        args.steps = 28 if args.family == "flux" else 50
    if args.steps < 2:
        raise InputError(f"--steps must be at least 2, got {args.steps}")
    if not 0 <= args.inject_step < args.steps:
        raise InputError(f"--inject-step must lie in 0..{args.steps - 1}, got {args.inject_step}")
    if args.backend == "pulid-sdxl":
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
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    settings = result["settings"]
    print(
        f"{settings['family']} denoiser work at {settings['num_inference_steps']} steps, injection at step "
        f"{settings['inject_step']}, guidance {settings['guidance_scale']}, true CFG {settings['true_cfg_scale']}, "
        f"γ={settings['gamma']} (prompt: {settings['prompt']!r})"
    )
    print(f"{'schedule':<12} {'calls':>10} {'batch items':>12}")
    for name in ("plain_pd", "literal", "engine"):
        print(f"{name:<12} {result[name]['unet_calls']:>10} {result[name]['batch_items']:>12}")
    return 0
