"""`freecure embed --backend pulid-flux --ref PHOTO --out face.safetensors`: compute a backend's
face embedding from reference photos once and write the ``--face-embedding`` file it reads.

PuLID (``pulid-sdxl``, ``pulid-flux``): insightface antelopev2 + EVA02-CLIP-L-14-336 on the aligned,
parsed face (:mod:`freecure.backends.pulid_encoder`); the file holds ``id_cond`` and
``vit_hidden.0``–``vit_hidden.4`` (docs/backends/pulid.md). Needs ``pip install 'freecure[pulid]'``
(insightface's models are for non-commercial research only). ``--tiny`` uses random stand-ins of
the tiny models' sizes: offline, and the file fits ``freecure generate --tiny --backend pulid-*``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import InputError
from . import options

#: Backends whose face embedding this command computes → how many photos they read.
EMBEDDERS = {"pulid-sdxl": None, "pulid-flux": 1}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``embed`` sub-command."""
    parser = subparsers.add_parser(
        "embed",
        help="compute a backend's face embedding from reference photos (--face-embedding file)",
        description=(
            "Compute the face embedding a backend conditions on from reference photos, as the original "
            "method does, and write it as the safetensors file that --face-embedding reads."
        ),
    )
    parser.add_argument("--backend", choices=sorted(EMBEDDERS), required=True)
    parser.add_argument(
        "--ref", type=options.existing_file, action="append", required=True, metavar="PHOTO",
        help="reference photo (repeat for several: pulid-sdxl reads all, pulid-flux one)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="the .safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--eva-clip-weights", type=options.existing_file, metavar="FILE",
                        help="local EVA02_CLIP_L_336_psz14_s6B.pt (default: download from QuanSun/EVA-CLIP)")
    parser.add_argument("--parser-weights", type=options.existing_file, metavar="FILE",
                        help="BiSeNet checkpoint 79999_iter.pth (default: as `freecure parse`)")
    parser.add_argument("--device", type=options.device, default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--tiny", action="store_true", help="random tiny stand-ins, offline (the numbers mean nothing)")
    options.record_inputs(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..backends.pulid.embedding import INSIGHTFACE_LICENSE, save_face_embedding
    from ..core.atomic import write_file
    from ..core.images import load_reference

    limit = EMBEDDERS[args.backend]
    if limit is not None and len(args.ref) > limit:
        raise InputError(f"{args.backend} reads {limit} reference photo; give one --ref")
    if args.out.suffix != ".safetensors":
        raise InputError(f"--out {args.out}: the face-embedding file must end in .safetensors")
    if args.out.is_dir():
        raise InputError(f"--out {args.out} is a folder; give a file name ending in .safetensors")
    if args.out.exists() and not args.overwrite:
        raise InputError(f"--out {args.out} exists; pass --overwrite to replace it")
    options.check_inputs_outside(args, files=[args.out])
    references = [load_reference(path) for path in args.ref]
    encoder = build_encoder(args)
    face = encoder(references)
    metadata = {
        "freecure": f"PuLID face embedding ({args.backend}) from {len(references)} photo(s)"
        + (", random tiny stand-in models" if args.tiny else ": insightface antelopev2 + EVA02-CLIP-L-14-336"),
        "licence": INSIGHTFACE_LICENSE,
    }
    write_file(args.out, lambda path: save_face_embedding(face, path, metadata))
    hidden = [f"vit_hidden.{i} {tuple(h.shape)}" for i, h in enumerate(face.vit_hidden)]
    shapes = ", ".join([f"id_cond {tuple(face.id_cond.shape)}", *hidden])
    print(f"wrote {args.out}: {shapes}")
    if args.tiny:
        print("freecure: --tiny: random stand-in models; the embedding means nothing")
    return 0


def build_encoder(args: argparse.Namespace):
    from ..backends.pulid.encoder import PuLIDFaceEncoder
    from ..core.runtime import resolve_device

    if args.tiny:
        if args.eva_clip_weights or args.parser_weights:
            raise InputError("--tiny uses random stand-in models: drop --eva-clip-weights/--parser-weights")
        return PuLIDFaceEncoder.tiny()
    return PuLIDFaceEncoder.from_pretrained(
        args.eva_clip_weights,
        args.parser_weights,
        resolve_device(args.device),
        backend=args.backend,
        instead="compute the embedding where they are installed",
    )
