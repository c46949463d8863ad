"""`freecure parse IMAGE --out DIR`: run the face parser Ψ (BiSeNet) on one image.

Writes ``DIR/<stem>_labels.png`` (single-channel class ids at the input size),
``DIR/<stem>_overlay.png`` (class colours over the image) and ``DIR/<stem>_parse.json``
(per-class pixel fractions, face box, crop, note and the weights used).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from ..core.atomic import json_text, write_files
from ..core.errors import InputError
from ..core.images import load_image
from ..parsing import BiSeNetFaceParser, ParseResult, overlay_labels
from ..parsing.weights import ENV_VAR
from . import options

#: Shorter side, in pixels, below which an image cannot show a face worth parsing.
MIN_PARSE_SIDE = 16


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``parse`` sub-command."""
    parser = subparsers.add_parser(
        "parse",
        help="face-parse an image with BiSeNet (the paper's Ψ)",
        description=(
            "Parse a face image into the 19 CelebAMask-HQ classes with the released BiSeNet. "
            "The face is found with MTCNN and a square crop around it is parsed; without a "
            "face (or with --no-detect) the whole image is parsed."
        ),
    )
    parser.add_argument("image", type=Path, help="image file (PNG, JPEG, WebP, …)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--json", action="store_true", help="print the JSON report to stdout")
    parser.add_argument(
        "--weights",
        type=Path,
        metavar="PATH",
        help=f"BiSeNet checkpoint 79999_iter.pth (default: ${ENV_VAR}, Hub cache, installed copy)",
    )
    parser.add_argument(
        "--no-detect", action="store_true", help="skip face detection; parse the whole image"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--device", type=options.device, default=None, help="torch device (default: cuda if available)")
    options.record_inputs(parser)
    parser.set_defaults(func=run)


def output_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """The three files written for an image called ``stem``."""
    return {
        "labels": out_dir / f"{stem}_labels.png",
        "overlay": out_dir / f"{stem}_overlay.png",
        "report": out_dir / f"{stem}_parse.json",
    }


def _check_outputs(outputs: dict[str, Path], overwrite: bool) -> None:
    """Refuse a file as the output folder, and existing outputs unless ``overwrite``."""
    out_dir = next(iter(outputs.values())).parent
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out must be a folder, but {out_dir} is a file")
    existing = [str(path) for path in outputs.values() if path.exists()]
    if existing and not overwrite:
        raise InputError(
            f"output files already exist: {', '.join(existing)}; pass --overwrite to replace "
            "them or choose another --out folder"
        )


def build_report(
    image_path: Path,
    size: tuple[int, int],
    result: ParseResult,
    parser: BiSeNetFaceParser,
    outputs: dict[str, Path],
) -> dict:
    """JSON-ready summary of one parse."""
    weights = parser.weights
    return {
        "image": str(image_path),
        "size": {"width": size[0], "height": size[1]},
        "face_found": result.face_found,
        "face_box": list(result.face_box) if result.face_box is not None else None,
        "crop_box": list(result.crop_box),
        "note": result.note,
        "weights": str(weights.path) if weights is not None else None,
        "weights_source": weights.source if weights is not None else None,
        "fractions": {name: round(value, 6) for name, value in result.fractions().items()},
        "outputs": {kind: str(path) for kind, path in outputs.items()},
    }


def _summary(report: dict) -> str:
    size = report["size"]
    present = sorted(
        ((value, name) for name, value in report["fractions"].items() if value > 0), reverse=True
    )
    classes = ", ".join(f"{name} {value:.1%}" for value, name in present[:6])
    return "\n".join(
        [
            f"parsed {report['image']} ({size['width']}x{size['height']}): {report['note']}",
            f"largest classes: {classes}",
            f"wrote {', '.join(report['outputs'].values())}",
        ]
    )


def run(args: argparse.Namespace) -> int:
    """Parse ``args.image`` and write the label map, overlay and report."""
    image = load_image(args.image)
    if min(image.size) < MIN_PARSE_SIDE:
        raise InputError(
            f"{args.image} is {image.width}×{image.height} px, too small to hold a face; give an image whose "
            f"shorter side is at least {MIN_PARSE_SIDE} px"
        )
    outputs = output_paths(args.out, args.image.stem)
    _check_outputs(outputs, args.overwrite)
    options.check_output_folder(args.out, resumable=True)  # other images' results may share the folder
    options.check_inputs_outside(args, files=outputs.values())
    parser = BiSeNetFaceParser.from_pretrained(
        args.weights, device=None if args.device is None else torch.device(args.device), detect_faces=not args.no_detect
    )
    result = parser(image)

    report = build_report(args.image, image.size, result, parser, outputs)
    text = json_text(report)
    write_files(
        args.out,
        {
            outputs["labels"].name: lambda path: Image.fromarray(result.labels).save(path, format="PNG"),
            outputs["overlay"].name: lambda path: overlay_labels(image, result.labels).save(path, format="PNG"),
            outputs["report"].name: text,
        },
    )
    print(text.rstrip("\n") if args.json else _summary(report))
    return 0
