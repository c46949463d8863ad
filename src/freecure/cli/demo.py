"""`freecure demo`: serve the FreeCure web page on localhost."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..errors import InputError
from .generate import add_model_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="serve a web page to try FreeCure (upload a face, type a prompt, compare FD | PD | FreeCure)",
        description=(
            "Serve the FreeCure demo page: reference photo(s), prompt, backend, method and settings in; "
            "per-stage progress, FD | PD | FreeCure, masks, attention maps, stage times and a zip of the "
            "folder `freecure generate` writes out. Models load once per backend; one generation runs "
            "at a time and later requests wait in a queue. Needs `pip install 'freecure[demo]'`."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--workdir", type=Path, default=None, metavar="DIR", help="where runs are written (default: a temp folder)"
    )
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must lie in 1..65535, got {args.port}")
    try:
        import uvicorn

        from ..demo.app import create_app, find_example
    except ImportError as error:
        raise InputError(f"the demo needs Starlette and uvicorn ({error}); install them: pip install 'freecure[demo]'")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="freecure-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    app = create_app(args, workdir, find_example())
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"freecure demo: http://{host}:{args.port}/  (runs are written to {workdir}; Ctrl+C stops)", flush=True)
    if args.tiny:
        print("freecure demo: --tiny: tiny random-weight components; the images are noise", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
