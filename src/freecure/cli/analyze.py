"""`freecure analyze`: the paper's motivation studies (§3) on any backend and prompt.

freecure analyze attention   --prompt P --ref IMG --out DIR     (Figure 3)
freecure analyze interpolate --prompt P --ref IMG --out DIR --alpha 0 0.5 1 --blocks down mid up
                                                                 (eq. 3, Figures 4 and 10)

Block groups follow the model family: down, mid, up (Stable Diffusion UNets); double, single
(FLUX's double- and single-stream blocks).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..core.errors import InputError
from . import options
from .generate import add_model_arguments, build_freecure, check_model_arguments, guidance_scale


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="the paper's attention studies: per-token maps of FD vs PD (Fig. 3), eq. 3 interpolation (Fig. 4/10)",
        description="Reproduce the motivation experiments of the paper's §3 on any backend and prompt.",
    )
    studies = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    attention = studies.add_parser(
        "attention",
        help="attention map of every prompt token in PD and FD, by block group (Figure 3)",
        description=(
            "From one z_T, FD and PD; for every prompt token, its attention map in FD and in PD (UNet: "
            "cross-attention; FLUX: the image queries' joint attention on the token's T5 key) averaged over "
            "the chosen steps, heads and the layers of each block group. Writes a labelled "
            "grid over the images, the raw maps (maps.safetensors), summary.json (attention mass of the "
            "identity token and of each attribute token, PD vs FD) and manifest.json."
        ),
    )
    _common(attention)
    attention.add_argument(
        "--analysis-steps",
        type=options.non_negative_int,
        nargs="+",
        default=None,
        metavar="I",
        help="step indices to average (default: all)",
    )
    attention.add_argument(
        "--heads",
        type=options.non_negative_int,
        nargs="+",
        default=None,
        metavar="H",
        help="heads to average (default: all)",
    )
    attention.add_argument(
        "--groups",
        nargs="+",
        default=None,
        metavar="G",
        help="block groups: down mid up (UNet), double single (FLUX), or all (default: each group)",
    )
    attention.set_defaults(func=run_attention)
    interpolate = studies.add_parser(
        "interpolate",
        help="inject a portion α of FD's cross-attention into PD's identity column (eq. 3, Figures 4 and 10)",
        description=(
            "For each block group and α, PD with its identity column(s) of cross-attention scores replaced by "
            "α·FD's placeholder column + (1 − α)·PD's, then the attention's softmax (FLUX: the joint softmax "
            "over [text; image] keys) (docs/analysis.md). "
            "Writes one image per (group, α), a grid (α across, block group down) and manifest.json."
        ),
    )
    _common(interpolate)
    interpolate.add_argument(
        "--alpha",
        type=options.unit_interval,
        nargs="+",
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        metavar="A",
        help="the α of eq. 3, each in [0, 1] and distinct (default 0 0.25 0.5 0.75 1)",
    )
    interpolate.add_argument(
        "--blocks",
        nargs="+",
        default=None,
        metavar="G",
        help="block groups: down mid up (UNet), double single (FLUX), or all (default: each group of the model)",
    )
    interpolate.set_defaults(func=run_interpolate)


def _common(parser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument(
        "--ref",
        action="append",
        default=[],
        type=options.existing_file,
        metavar="IMAGE",
        help="reference photo (repeatable)",
    )
    parser.add_argument("--class-word", default=None)
    parser.add_argument("--seed", type=options.seed, default=0, help="seed of z_T: 0 … 2^64-1 (default 0)")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="output folder (default: outputs/analyze-…)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace files of an earlier run in --out")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--cell",
        type=options.cell_size,
        default=128,
        metavar="PX",
        help=f"grid cell size in pixels, {options.MIN_CELL} … {options.MAX_CELL} (default 128)",
    )
    add_model_arguments(parser)
    options.record_inputs(parser)


def _out_dir(args) -> Path:
    out = args.out or Path("outputs") / f"analyze-{args.study}-{args.backend}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise InputError(f"--out must be a folder, but {out} is a file")
    return out


def _check(args) -> list:
    """Everything checked before any model loads: the options across each other, and the
    reference photos (read now, as `freecure generate` does)."""
    from ..core.attributes import check_prompt_length
    from ..core.images import load_reference

    check_prompt_length(args.prompt)
    check_model_arguments(args)
    return [load_reference(path) for path in args.ref]


def _setup(args):
    if args.tiny:
        print(
            "freecure: --tiny: tiny random-weight components; the images and maps are noise and show only the machinery"
        )
    freecure = build_freecure(args)
    freecure.set_progress_bar_config(disable=True)
    freecure.pipeline.set_progress_bar_config(disable=True)
    return freecure


def _prepare(args, freecure, references):
    from ..analysis import prepare

    return prepare(
        freecure,
        args.prompt,
        references,
        class_word=args.class_word,
        trigger_word=args.trigger,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=guidance_scale(args, freecure.backend),
        height=args.height,
        width=args.width,
        seed=args.seed,
        inject_step=args.inject_step,
        true_cfg_scale=getattr(args, "true_cfg_scale", 1.0),
    )


def _manifest(args, setup, files, extra) -> dict:
    from .. import __version__

    return {
        "freecure_version": __version__,
        "study": args.study,
        "weights": "random (tiny components)" if args.tiny else "pretrained",
        "references": [str(path) for path in args.ref],
        "settings": setup.settings,
        **extra,
        "files": sorted(files),
    }


def run_attention(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..analysis import attention_study, labelled_grid
    from ..outputs import check_writable
    from ..stages.masks import normalize_map, render_mask_overlay

    if args.steps < 2:
        raise InputError(f"--steps must be at least 2, got {args.steps}")
    if args.analysis_steps is not None and any(not 0 <= s < args.steps for s in args.analysis_steps):
        raise InputError(f"--analysis-steps must lie in 0..{args.steps - 1}, got {args.analysis_steps}")
    if args.heads is not None and any(h < 0 for h in args.heads):
        raise InputError(f"--heads must be non-negative indices, got {args.heads}")
    out = _out_dir(args)
    names = ["fd.png", "pd.png", "attention_grid.png", "maps.safetensors", "summary.json", "manifest.json"]
    check_writable([out / name for name in names], args.overwrite)
    options.check_inputs_outside(args, files=[out / name for name in names])
    references = _check(args)
    freecure = _setup(args)
    setup = _prepare(args, freecure, references)
    with tqdm(total=setup.steps, desc="analyze attention: FD+PD", disable=args.no_progress) as bar:
        study = attention_study(
            freecure, setup, args.analysis_steps, args.heads, args.groups, on_step=lambda i: bar.update()
        )
    groups = list(dict.fromkeys(group for _, group in study.maps))
    alignment = setup.alignment
    labels = [
        f"{label} / S*" if column in alignment.identity_fd else label
        for label, column in zip(alignment.labels, alignment.fd_columns)
    ]
    cells, col_labels = [], [f"{lane.upper()} {group}" for group in groups for lane in ("fd", "pd")]
    for k in range(len(labels)):
        row = []
        for group in groups:
            for lane in ("fd", "pd"):
                heat = normalize_map(study.maps[lane, group][k])
                row.append(render_mask_overlay(study.images[lane], heat, color=(255, 200, 0), alpha=0.7))
        cells.append(row)
    cells.insert(0, [study.images[lane] for _ in groups for lane in ("fd", "pd")])
    title = [
        f"freecure analyze attention · {setup.settings['backend']} · seed {args.seed} · {args.steps} steps",
        f"prompt: {setup.parsed.foundation_prompt}",
        f"steps averaged: {args.analysis_steps or 'all'} · heads: {args.heads or 'all'} · each map min-max normalised",
    ]
    grid = labelled_grid(cells, ["image", *labels], col_labels, title, cell=args.cell)
    from ..core.atomic import json_text

    summary_text = json_text(study.summary)  # NaN or infinity: one line, and nothing written

    out.mkdir(parents=True, exist_ok=True)
    study.images["fd"].save(out / "fd.png")
    study.images["pd"].save(out / "pd.png")
    grid.save(out / "attention_grid.png")
    tensors = {f"{lane}.{group}": t.contiguous().cpu() for (lane, group), t in study.maps.items()}
    tensors.update({f"full.{lane}.{group}": t.contiguous().cpu() for (lane, group), t in study.full.items()})
    save_file(tensors, str(out / "maps.safetensors"), metadata={"tokens": json.dumps(list(labels))})
    (out / "summary.json").write_text(summary_text)
    extra = {
        "analysis_steps": args.analysis_steps,
        "heads": args.heads,
        "groups": groups,
        "maps": {name: list(t.shape) for name, t in tensors.items()},
    }
    (out / "manifest.json").write_text(json.dumps(_manifest(args, setup, names, extra), indent=2, default=str) + "\n")
    print(f"freecure: wrote {len(names)} files to {out}")
    for group in groups:
        entry = study.summary["groups"][group]
        identity = entry["identity"]
        line = f"  {group:<6}"
        if "image_keys" in entry:
            line += f" image keys {entry['image_keys']['fd']:.3f} → {entry['image_keys']['pd']:.3f}"
        if "identity_mass" in entry:
            line += f" · reference keys (identity) {entry['identity_mass']['reference_keys']:.3f}"
        if identity is not None:
            line += f" identity mass FD {identity['fd']:.3f} → PD {identity['pd']:.3f}"
        for text, values in entry["attributes"].items():
            line += f" · {text!r} {values['fd']:.3f} → {values['pd']:.3f}"
        print(line)
    if args.tiny:
        print("  (weights are random: the maps are noise)")
    return 0


def run_interpolate(args: argparse.Namespace) -> int:
    import math

    from tqdm.auto import tqdm

    from ..analysis import cross_attention_groups, identity_in_prompt, interpolation_study, labelled_grid
    from ..analysis.tokens import adapter_mechanism
    from ..backends import BACKENDS
    from ..outputs import check_writable

    if args.steps < 2:
        raise InputError(f"--steps must be at least 2, got {args.steps}")
    if any(not math.isfinite(a) or not 0.0 <= a <= 1.0 for a in args.alpha):
        raise InputError(f"every --alpha must lie in [0, 1], got {args.alpha}")
    if len(set(args.alpha)) != len(args.alpha):
        raise InputError(f"--alpha values must differ, got {args.alpha}")
    backend_cls = BACKENDS[args.backend]
    if not identity_in_prompt(backend_cls):
        raise InputError(
            f"eq. 3 interpolates the identity token's cross-attention column, but the {args.backend} backend "
            f"injects identity through {adapter_mechanism(backend_cls)}, not a prompt token; "
            "`freecure analyze attention` compares its text tokens' maps instead"
        )
    out = _out_dir(args)

    def cell_name(group, alpha):
        return f"pd_{group}_a{alpha_text(alpha)}.png"

    names = ["fd.png", "interpolation_grid.png", "manifest.json"]
    if args.blocks is not None:
        cells = [out / cell_name(g, a) for g in args.blocks for a in args.alpha]
    else:  # the groups are the model's, known once it is loaded: any earlier cell counts
        cells = sorted(out.glob("pd_*_a*.png")) if out.is_dir() else []
    check_writable([out / name for name in names] + cells, args.overwrite)
    options.check_inputs_outside(args, files=[out / name for name in names] + cells)
    references = _check(args)
    freecure = _setup(args)
    setup = _prepare(args, freecure, references)
    blocks = args.blocks or list(cross_attention_groups(freecure.backend.denoiser))
    runs = len(blocks) * len(args.alpha) - (len(blocks) - 1) * (0.0 in args.alpha)
    with tqdm(total=runs, desc="analyze interpolate: runs", disable=args.no_progress) as bar:
        study = interpolation_study(freecure, setup, args.alpha, blocks, on_run=lambda g, a: bar.update())
    groups = list(dict.fromkeys(group for group, _ in study.images))
    names += [cell_name(g, a) for g in groups for a in args.alpha]
    cells = [[study.images[group, alpha] for alpha in args.alpha] for group in groups]
    title = [
        f"freecure analyze interpolate (eq. 3) · {setup.settings['backend']} · seed {args.seed} · {args.steps} steps",
        f"prompt: {setup.parsed.foundation_prompt}",
        f"identity columns (m, n): {list(study.pairs)} · injected from step {setup.conditions.inject_step}",
    ]
    grid = labelled_grid(cells, groups, [f"alpha = {alpha_text(a)}" for a in args.alpha], title, cell=args.cell)
    out.mkdir(parents=True, exist_ok=True)
    study.fd_image.save(out / "fd.png")
    for (group, alpha), image in study.images.items():
        image.save(out / cell_name(group, alpha))
    grid.save(out / "interpolation_grid.png")
    extra = {
        "alphas": args.alpha,
        "blocks": groups,
        "identity_pairs": [list(p) for p in study.pairs],
        "reading": "scores of PD's identity columns m ← α·FD's column n + (1 − α)·PD's, then the attention "
        "softmax over the keys (FLUX: the image queries' joint softmax over [text; image] keys; text "
        "queries untouched) (docs/analysis.md)",
    }
    (out / "manifest.json").write_text(json.dumps(_manifest(args, setup, names, extra), indent=2, default=str) + "\n")
    print(f"freecure: wrote {len(names)} files to {out} ({runs} generations)")
    if args.tiny:
        print("  (weights are random: the images are noise)")
    return 0


def alpha_text(alpha: float) -> str:
    """α as written in file names and labels: short (``0.5``, ``1``) where that reads back as
    the same number, else every digit Python needs (``0.1000001``), so that distinct α never
    share a file name."""
    short = f"{alpha:g}"
    return short if float(short) == alpha else repr(alpha)
