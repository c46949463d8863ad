"""`freecure generate`: run FreeCure with a personalization backend and write every stage."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..backends import BACKENDS, DEFAULT_BACKEND
from ..build import (  # noqa: F401 (build_face_parser, fasa_config: used by the other commands)
    build_face_parser,
    build_freecure,
    check_family_options,
    fasa_config,
    guidance_scale,
    resolve_method,
    resolve_tiny_family,
    run_is_flux,
)
from ..core.errors import InputError
from ..core.runtime import (
    DTYPES,
    OFFLOAD_MODES,
    SCHEDULERS,
)
from ..core.terminal import printable
from ..families.tiny import TINY_FAMILIES
from . import options


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
    parser.add_argument("--seed", type=options.seed, default=0, help="seed of z_T: 0 … 2^64-1 (default 0)")
    parser.add_argument(
        "--num-images",
        type=options.num_images,
        default=1,
        metavar="N",
        help=f"N images from seeds SEED … SEED+N−1, sharing every model call; each goes to "
        f"--out/seed<S>/ (default 1: the files go to --out itself). At most {options.MAX_NUM_IMAGES}: "
        "the N images are one batch (4N denoiser rows) held in memory together; for more, run again "
        "with the next --seed",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder, new or empty, never the current folder (default: outputs/<backend>-<time>-seed<N>)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier freecure run in --out (its files are removed); a folder holding anything its "
        "manifest.json does not list is never replaced, nor one that holds an input (--ref, …)",
    )
    parser.add_argument("--no-progress", action="store_true")
    add_model_arguments(parser)
    options.record_inputs(parser)
    parser.set_defaults(func=run)


def add_model_arguments(parser) -> None:
    """The options that build the backend, the face parser and FreeCure, and the diffusion
    settings: shared by ``freecure generate`` and ``freecure eval``."""
    parser.add_argument("--backend", choices=sorted(BACKENDS), default=DEFAULT_BACKEND)
    parser.add_argument("--trigger", default=None, help="trigger word after the class word (PhotoMaker: img)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument(
        "--steps", type=options.steps, default=50, help=f"denoising steps T: 2 … {options.MAX_STEPS} (default 50)"
    )
    parser.add_argument(
        "--guidance-scale",
        type=options.finite_float(minimum=0.0, maximum=100.0),
        default=None,
        help="CFG scale of FD and PD (default: the backend's original, e.g. 5.0 for PhotoMaker)",
    )
    parser.add_argument(
        "--true-cfg-scale",
        type=options.finite_float(1.0, 100.0),
        default=1.0,
        help="FLUX: true classifier-free guidance with --negative-prompt, 1 … 100 (1 = off, one row per lane; "
        "FLUX reads --negative-prompt only above 1)",
    )
    parser.add_argument(
        "--gamma",
        type=options.finite_float(0.0, 1.0, open_minimum=True),
        default=0.5,
        help="γ: expression inversion depth (0, 1]",
    )
    parser.add_argument(
        "--expression-guidance-scale",
        type=options.finite_float(minimum=1.0, maximum=100.0),
        default=None,
        help="guidance of the expression re-denoising (default: the run's --guidance-scale)",
    )
    parser.add_argument(
        "--inversion-guidance-scale",
        type=options.finite_float(minimum=1.0, maximum=100.0),
        default=1.0,
        help="guidance of the expression stage's DDIM inversion (default 1.0: closest to exact); "
        "--inversion-guidance-scale 1 --expression-guidance-scale 1 is the former behaviour",
    )
    parser.add_argument(
        "--pd-region",
        choices=["placement", "literal"],
        default="placement",
        help="PD's factor of eq. 4: where the attribute belongs on PD's face (default), "
        "or its own class in PD's image (literal eq. 4: an accessory PD did not draw is skipped)",
    )
    parser.add_argument(
        "--attention-aggregation",
        choices=["per_resolution", "per_layer"],
        default="per_resolution",
        help="average FD's cross-attention layers per resolution then across (default), or all at once",
    )
    parser.add_argument(
        "--inject-step", type=options.non_negative_int, default=None, help="override the backend's injection step"
    )
    parser.add_argument(
        "--approximate-shared-uncond",
        action="store_true",
        help="3 batch rows instead of 4 after injection (FD guidance approximate); not for FLUX without "
        "--true-cfg-scale > 1, which has no unconditional row to share",
    )
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help="default: ddim for Stable Diffusion, flow-euler for FLUX",
    )
    add_method_arguments(parser)
    size_help = "image {} in pixels, a multiple of 64 for SD/SDXL, 16 for FLUX (default: the model's)"
    parser.add_argument("--height", type=options.image_size, default=None, help=size_help.format("height"))
    parser.add_argument("--width", type=options.image_size, default=None, help=size_help.format("width"))
    parser.add_argument("--base-model", default=None, help="Hub id or folder of the base pipeline")
    parser.add_argument(
        "--parser",
        choices=["bisenet", "layout"],
        default=None,
        help="face parser Ψ: bisenet (default) or layout (synthetic, default with --tiny)",
    )
    parser.add_argument(
        "--parser-weights", type=options.existing_file, default=None, help="BiSeNet checkpoint 79999_iter.pth"
    )
    parser.add_argument(
        "--device",
        type=options.device,
        default=None,
        help="torch device: cpu, cuda, cuda:N, mps (default: cuda if available)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="float16 / bfloat16 / float32 (default: fp16 on CUDA)"
    )
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
    memory.add_argument(
        "--compile-mode",
        type=options.compile_mode,
        default=None,
        help="with --compile: a torch.compile mode of this torch (torch._inductor.list_mode_options(): default, "
        "reduce-overhead (GPU), max-autotune, …)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random-weight components, offline: shows the machinery, images are noise",
    )
    families = "; ".join(f"{name} {'/'.join(b.families)}" for name, b in sorted(BACKENDS.items()))
    parser.add_argument(
        "--tiny-family",
        choices=TINY_FAMILIES,
        default=None,
        help=f"with --tiny: the tiny model's family, one the backend runs on (default: its first): {families}",
    )
    add_backend_options(parser)


def add_backend_options(parser) -> None:
    """Every registered backend's declared options (``Backend.options``), one group per backend.
    A flag several backends declare (``--face-embedding``) is added once, its help joining
    theirs; :func:`check_model_arguments` refuses one the chosen backend does not declare."""
    declared: dict[str, list] = {}
    for name, backend in sorted(BACKENDS.items()):
        for option in backend.options:
            declared.setdefault(option.flag, []).append((name, option))
    added = set()
    for name, backend in sorted(BACKENDS.items()):
        group = parser.add_argument_group(f"{name} backend")
        for option in backend.options:
            if option.flag in added:
                continue
            helps = list(dict.fromkeys(o.help for _, o in declared[option.flag] if o.help))
            replace(option, help="; ".join(helps)).add_to(group)
            added.add(option.flag)


def backend_options(name: str) -> dict:
    """The options a backend declares, by their attribute name (dest)."""
    return {option.dest: option for option in BACKENDS[name].options}


#: Options that some modes do not read: (dest, option, predicate on args, why it is unread).
MODE_IGNORED = (
    ("base_model", "--base-model", lambda a: a.tiny, "--tiny builds tiny random components"),
    ("parser_weights", "--parser-weights", lambda a: (a.parser or ("layout" if a.tiny else "bisenet")) == "layout",
     "the layout face parser has no weights (pass --parser bisenet to use them)"),
    ("tiny_family", "--tiny-family", lambda a: not a.tiny, "only --tiny builds tiny models (pass --tiny to use it)"),
    ("compile_mode", "--compile-mode", lambda a: not a.compile,
     "it says how --compile compiles (pass --compile to use it)"),
)

#: The FASA options (dest → option); None when not given (:func:`add_method_arguments`).
FASA_OPTIONS = {
    "fasa_layers": "--fasa-layers",
    "fasa_mask": "--fasa-mask",
    "fasa_mask_weight": "--fasa-mask-weight",
    "fasa_uncond": "--fasa-uncond",
    "fasa_form": "--fasa-form",
}


def check_model_arguments(args: argparse.Namespace) -> None:
    """Checks across options, before anything loads: an injection step inside the schedule,
    and no option given that this mode would silently ignore: another backend's options, those
    of :data:`MODE_IGNORED`, FASA's without ``--method fasa``, a ``--tiny-family`` the backend
    does not run on, and guidance options the model family does not read
    (:func:`check_family_options`). Resolves ``args.tiny_family`` (:func:`resolve_tiny_family`).

    Raises:
        InputError: the first problem found.
    """
    if args.inject_step is not None and args.inject_step >= args.steps:
        raise InputError(
            f"--inject-step must lie in 0..{args.steps - 1} for --steps {args.steps}, got {args.inject_step}"
        )
    own = backend_options(args.backend)
    for backend in sorted(BACKENDS):
        if backend == args.backend:
            continue
        for dest, option in backend_options(backend).items():
            if dest in own:
                continue
            if getattr(args, dest, option.default) != option.default:
                raise InputError(
                    f"{option.flag} belongs to the {backend} backend and would be ignored with "
                    f"--backend {args.backend}; drop it or pass --backend {backend}"
                )
    for dest, option, ignored, why in MODE_IGNORED:
        if getattr(args, dest, None) is not None and ignored(args):
            raise InputError(f"{option} would be ignored: {why}; drop it")
    for dest, option in own.items():
        why = option.unread(args) if option.unread is not None and getattr(args, dest, None) is not None else None
        if why:
            raise InputError(f"{option.flag} would be ignored: {why}; drop it")
    given = f"--method {args.method}" if getattr(args, "method", None) else None
    resolve_method(args)  # --method, else the --preset's, else rofa
    if getattr(args, "preset", None) and given is None:
        given = f"--preset {args.preset} (method {args.method})"
    if getattr(args, "method", "rofa") != "fasa":
        for dest, option in FASA_OPTIONS.items():
            if getattr(args, dest, None) is not None:
                raise InputError(
                    f"{option} would be ignored with {given or '--method rofa'}: it sets FASA; "
                    "pass --method fasa or drop it"
                )
    resolve_tiny_family(args)
    check_family_options(args, run_is_flux(args))


def add_method_arguments(parser) -> None:
    """``--method`` and the FASA options (docs/engine.md, "FASA")."""
    from ..attention.fasa import FASA_FORMS, LAYER_PRESETS
    from ..stages.config import PRESETS
    from ..stages.fasa import MASK_SOURCES, FasaConfig

    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="the method as a source has it: "
        + "; ".join(f"{name}: {preset.source}" for name, preset in PRESETS.items())
        + " (options given beside it override it; docs/engine.md)",
    )
    parser.add_argument(
        "--method",
        choices=["rofa", "fasa"],
        default=None,
        help="correction after the SAME pass: rofa (the arXiv paper's noise blending; the default without "
        "--preset) or fasa (foundation-aware self-attention: the released code, the NeurIPS paper)",
    )
    parser.add_argument(
        "--expression",
        choices=["on", "off"],
        default=None,
        help="the expression stage after the correction (after FASA: the NeurIPS paper's asymmetric prompt "
        "guidance); default: the preset's, else on after rofa and off after fasa",
    )
    # Defaults None: given with --method rofa, they are refused (check_model_arguments);
    # fasa_config leaves FasaConfig's defaults for those not given.
    group = parser.add_argument_group("FASA (--method fasa; refused with rofa)")
    group.add_argument(
        "--fasa-layers",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"a preset ({', '.join(LAYER_PRESETS)}; each for the model families it names) or "
        "attention-processor name patterns (fnmatch) of the layers to change: a UNet's self-attention, "
        "FLUX's joint attention (default: up = a UNet's up path, FLUX's later half of blocks)",
    )
    group.add_argument(
        "--fasa-mask", choices=MASK_SOURCES, default=None, help=f"mask on FD's keys (default {FasaConfig.mask_source})"
    )
    group.add_argument(
        "--fasa-mask-weight",
        type=options.finite_float(0.0, 100.0),
        default=None,
        help=f"logit offset w inside the mask (default {FasaConfig.mask_weight})",
    )
    group.add_argument(
        "--fasa-form",
        choices=FASA_FORMS,
        default=None,
        help="how ω and the mask enter FD's logits: code (default; the released code's bias ω inside, FD's keys "
        "blocked outside) or paper (the NeurIPS paper's factor [1, ωℳ] on the logits)",
    )
    group.add_argument(
        "--fasa-uncond",
        action="store_true",
        default=None,
        help="also change PD's unconditional row (the authors' code does not)",
    )


def run(args: argparse.Namespace) -> int:
    from ..core.atomic import atomic_folder
    from ..core.attributes import check_prompt_length, detect_class_word
    from ..core.images import load_reference
    from ..outputs import check_earlier_run, write_run, write_runs

    # Everything a user gave is checked before any model loads.
    if args.seed + args.num_images - 1 > options.MAX_SEED:
        raise InputError(f"--seed + --num-images - 1 must be at most {options.MAX_SEED}")
    check_prompt_length(args.prompt)  # also with --class-word, which skips detect_class_word
    class_word = args.class_word or detect_class_word(args.prompt)
    out_dir = args.out or Path("outputs") / f"{args.backend}-{time.strftime('%Y%m%d-%H%M%S')}-seed{args.seed}"
    options.check_output_folder(out_dir, overwrite=args.overwrite)
    options.check_inputs_outside(args, folders=[out_dir])  # --overwrite replaces it whole
    check_model_arguments(args)
    references = [load_reference(path) for path in args.ref]
    if args.tiny:
        print("freecure: --tiny: tiny random-weight components; the images are noise and show only the machinery")
    freecure = build_freecure(args)
    backend = freecure.backend
    freecure.set_progress_bar_config(disable=args.no_progress)
    guidance = guidance_scale(args, backend)
    seeds = [args.seed + k for k in range(args.num_images)]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    extra = {
        "references": [str(path) for path in args.ref],
        "weights": "random (tiny components)" if args.tiny else "pretrained",
        "base_model": None if args.tiny else args.base_model,
        "license": backend.license,
    }
    # The run (one image, or the whole batch) is written to a staging folder renamed to --out at
    # the end. --out is checked again there: a folder filled meanwhile (another run) is kept,
    # and only an earlier freecure run is replaced, only with --overwrite.
    with atomic_folder(out_dir, replace=args.overwrite, check=check_earlier_run) as staging:
        outputs = freecure(
            args.prompt,
            reference_images=references,
            class_word=class_word,
            trigger_word=args.trigger,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=guidance,
            height=args.height,
            width=args.width,
            generator=generators if len(seeds) > 1 else generators[0],
            inject_step=args.inject_step,
            true_cfg_scale=args.true_cfg_scale,
            num_images_per_prompt=len(seeds),
        )
        outputs = outputs if isinstance(outputs, list) else [outputs]
        if len(outputs) == 1:
            written = write_run(outputs[0], staging, {"seed": seeds[0], **extra})
        else:
            written = write_runs(outputs, seeds, staging, extra)
    if len(outputs) == 1:
        print(f"freecure: wrote {len(written)} files to {out_dir}")
    else:
        print(f"freecure: wrote {len(outputs)} runs to {', '.join(str(out_dir / folder) for folder in written)}")
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
        print(f"  note: {printable(note)}")  # notes quote the prompt's words
    if args.tiny:
        print("  (weights are random: the images are noise)")
    return 0
