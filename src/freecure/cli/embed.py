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


def embedders() -> dict:
    """The registered backends whose face-embedding file this command writes
    (``Backend.embed_references`` is not False)."""
    from ..backends import BACKENDS

    return {name: backend for name, backend in sorted(BACKENDS.items()) if backend.embed_references is not False}


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
    parser.add_argument("--backend", choices=sorted(embedders()), required=True)
    parser.add_argument(
        "--ref", type=options.existing_file, action="append", required=True, metavar="PHOTO",
        help="reference photo (repeat for several where the backend reads several)",
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
    from ..core.atomic import write_file
    from ..core.images import load_reference

    backend = embedders()[args.backend]
    limit = backend.embed_references
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
    save, summary = backend.embed_faces(references, args)
    write_file(args.out, save)
    print(f"wrote {args.out}: {summary}")
    if args.tiny:
        print("freecure: --tiny: random stand-in models; the embedding means nothing")
    return 0
