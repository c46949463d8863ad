"""`freecure generate`: run FreeCure with a personalization backend and write every stage."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..backends import BACKENDS
from ..errors import InputError
from ..runtime import (
    OFFLOAD_MODES,
    SCHEDULERS,
    apply_memory_options,
    compile_denoiser,
    resolve_device,
    resolve_dtype,
    set_scheduler,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate FD, PD and the FreeCure image for a prompt and reference photo(s)",
        description=(
            "Run the personalization backend with FreeCure: the foundation (FD) and personalized "
            "(PD) images from one seed, the SAME masks, the ROFA noise-blended image and the final "
            "image after expression restore. Writes every stage, mask overlays, an FD | PD | "
            "FreeCure strip and manifest.json to --out."
        ),
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument(
        "--ref",
        action="append",
        default=[],
        type=Path,
        metavar="IMAGE",
        help="reference photo of the identity (repeatable)",
    )
    parser.add_argument(
        "--class-word", default=None, help="the subject's class word in the prompt (default: found in the prompt)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-images",
        type=int,
        default=1,
        metavar="N",
        help="N images from seeds SEED … SEED+N−1, sharing every model call; each goes to "
        "--out/seed<S>/ (default 1: the files go to --out itself)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder (default: outputs/<backend>-<time>-seed<N>)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace files of an earlier run in --out")
    parser.add_argument("--no-progress", action="store_true")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def add_model_arguments(parser) -> None:
    """The options that build the backend, the face parser and FreeCure, and the diffusion
    settings: shared by ``freecure generate`` and ``freecure eval``."""
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="token-fusion")
    parser.add_argument("--trigger", default=None, help="trigger word after the class word (PhotoMaker: img)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps T (default 50)")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="CFG scale of FD and PD (default: the backend's original, e.g. 5.0 for PhotoMaker)",
    )
    parser.add_argument("--gamma", type=float, default=0.5, help="γ: expression inversion depth (0, 1]")
    parser.add_argument(
        "--expression-guidance-scale",
        type=float,
        default=1.0,
        help="guidance of the expression inversion and re-denoising (default 1.0)",
    )
    parser.add_argument("--inject-step", type=int, default=None, help="override the backend's injection step")
    parser.add_argument(
        "--approximate-shared-uncond",
        action="store_true",
        help="3 batch rows instead of 4 after injection (FD guidance approximate)",
    )
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help="default: ddim for Stable Diffusion, flow-euler for FLUX",
    )
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--base-model", default=None, help="Hub id or folder of the base pipeline")
    parser.add_argument(
        "--parser",
        choices=["bisenet", "layout"],
        default=None,
        help="face parser Ψ: bisenet (default) or layout (synthetic, default with --tiny)",
    )
    parser.add_argument("--parser-weights", default=None, help="BiSeNet checkpoint 79999_iter.pth")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float16 / bfloat16 / float32 (default: fp16 on CUDA)")
    memory = parser.add_argument_group("memory and speed")
    memory.add_argument(
        "--offload",
        choices=OFFLOAD_MODES,
        default="none",
        help="diffusers CPU offload: model (one model on the GPU at a time) or sequential (layer by layer)",
    )
    memory.add_argument("--vae-tiling", action="store_true", help="decode large images tile by tile")
    memory.add_argument("--vae-slicing", action="store_true", help="decode one image of a batch at a time")
    memory.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoiser (static batch shapes: each stage compiles once)",
    )
    memory.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (GPU)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random-weight components, offline: shows the machinery, images are noise",
    )
    parser.add_argument("--tiny-family", choices=["sd15", "sdxl", "flux"], default="sd15")
    for name, backend in sorted(BACKENDS.items()):
        backend.add_cli_arguments(parser.add_argument_group(f"{name} backend"))


def build_face_parser(args):
    from ..tiny import LayoutFaceParser

    choice = args.parser or ("layout" if args.tiny else "bisenet")
    if choice == "layout":
        return LayoutFaceParser()
    from ..parsing import BiSeNetFaceParser

    return BiSeNetFaceParser.from_pretrained(args.parser_weights, device=args.device)


def build_freecure(args: argparse.Namespace):
    """The FreeCure pipeline that :func:`add_model_arguments`' options describe.

    Resolves ``args.device`` and ``args.dtype`` in place (the backends read them).
    """
    from ..pipeline import FreeCureConfig, FreeCurePipeline

    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)
    if args.compile and args.offload != "none":
        raise InputError("--compile and --offload do not combine (offload hooks move weights inside the compiled call)")
    if args.offload == "sequential" and args.device.type == "cpu":
        raise InputError("--offload sequential needs a GPU (accelerate cannot stream weights to the CPU); use model")
    config = FreeCureConfig(
        gamma=args.gamma,
        expression_guidance_scale=args.expression_guidance_scale,
        approximate_shared_uncond=args.approximate_shared_uncond,
    )
    backend = BACKENDS[args.backend].from_cli(args)
    family = backend.family
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


def run(args: argparse.Namespace) -> int:
    from ..attributes import detect_class_word
    from ..outputs import check_writable, planned_files, save_output

    if args.num_images < 1:
        raise InputError(f"--num-images must be at least 1, got {args.num_images}")
    class_word = args.class_word or detect_class_word(args.prompt)
    out_dir = args.out or Path("outputs") / f"{args.backend}-{time.strftime('%Y%m%d-%H%M%S')}-seed{args.seed}"
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out must be a folder, but {out_dir} is a file")
    if args.tiny:
        print("freecure: --tiny: tiny random-weight components; the images are noise and show only the machinery")
    freecure = build_freecure(args)
    backend = freecure.backend
    freecure.set_progress_bar_config(disable=args.no_progress)
    guidance = guidance_scale(args, backend)
    seeds = [args.seed + k for k in range(args.num_images)]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    folders = [out_dir] if len(seeds) == 1 else [out_dir / f"seed{seed}" for seed in seeds]
    outputs = freecure(
        args.prompt,
        reference_images=args.ref,
        class_word=class_word,
        trigger_word=args.trigger,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=guidance,
        height=args.height,
        width=args.width,
        generator=generators if len(seeds) > 1 else generators[0],
        inject_step=args.inject_step,
        num_images_per_prompt=len(seeds),
    )
    outputs = outputs if isinstance(outputs, list) else [outputs]
    for output, folder in zip(outputs, folders):  # refuse before writing anything
        check_writable([folder / name for name in [*planned_files(output), "manifest.json"]], args.overwrite)
    for output, seed, folder in zip(outputs, seeds, folders):
        extra = {
            "seed": seed,
            "references": [str(path) for path in args.ref],
            "weights": "random (tiny components)" if args.tiny else "pretrained",
            "base_model": None if args.tiny else args.base_model,
            "license": backend.license,
        }
        paths = save_output(output, folder, overwrite=args.overwrite, extra=extra)
        print(f"freecure: wrote {len(paths)} files to {folder}")
    output = outputs[0]
    if len(outputs) > 1:
        print(f"  {len(outputs)} images in one batch; the stage figures are the whole batch's")
    for stage in output.stages:
        state = (
            f"{stage.seconds:6.2f}s  {stage.unet_calls:3d} UNet calls  {stage.batch_items:3d} items"
            if stage.ran
            else f"skipped: {stage.reason}"
        )
        print(f"  {stage.name:<11} {state}")
    print(f"  total       {output.unet_calls} UNet calls, {output.batch_items} batch items")
    for note in output.notes:
        print(f"  note: {note}")
    if args.tiny:
        print("  (weights are random: the images are noise)")
    return 0
