"""`freecure demo`: serve the FreeCure web page on localhost."""

from __future__ import annotations

import argparse
import math
import socket
import tempfile
from pathlib import Path

from ..demo.service import MAX_GUIDANCE, MAX_STEPS
from ..errors import InputError
from .generate import add_model_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="serve a Gradio page to try FreeCure (upload a face, type a prompt, compare FD | PD | FreeCure)",
        description=(
            "Serve the FreeCure demo page (Gradio): reference photo(s), prompt, backend, method and settings in; "
            "per-stage progress, FD | PD | FreeCure, masks, attention maps, stage times and a zip of the "
            "folder `freecure generate` writes out. Models load once per backend; one generation runs "
            "at a time and later requests wait in Gradio's queue. No share link, no telemetry. "
            "Needs `pip install 'freecure[demo]'`."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--workdir", type=Path, default=None, metavar="DIR", help="where runs are written (default: a temp folder)"
    )
    parser.add_argument(
        "--no-preload", action="store_true", help="load --backend's models on the first request, not at start"
    )
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program already listens on (before any model loads)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise InputError(f"--host {host!r} is not an address of this machine ({error})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise InputError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port") from None


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must lie in 1..65535, got {args.port}")
    # the page's defaults: checked now, not on the first visitor's request
    if not 2 <= args.steps <= MAX_STEPS:
        raise InputError(f"--steps must lie in 2..{MAX_STEPS}, got {args.steps}")
    if not (math.isfinite(args.gamma) and 0 < args.gamma <= 1):
        raise InputError(f"--gamma must lie in (0, 1], got {args.gamma}")
    guidance = args.guidance_scale
    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise InputError(f"--guidance-scale must lie in [0, {MAX_GUIDANCE}], got {args.guidance_scale}")
    if args.inject_step is not None and not 0 <= args.inject_step < args.steps:
        raise InputError(f"--inject-step must lie in 0..{args.steps - 1}, got {args.inject_step}")
    if args.workdir is not None and args.workdir.exists() and not args.workdir.is_dir():
        raise InputError(f"--workdir must be a folder, but {args.workdir} is a file")
    check_port_free(args.host, args.port)
    try:  # after the quick checks: importing Gradio takes seconds
        from ..demo.app import create_app, find_example, launch
    except ImportError as error:
        raise InputError(f"the demo needs Gradio ({error}); install it: pip install 'freecure[demo]'") from None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="freecure-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    example = find_example()
    demo = create_app(args, workdir, example, preload=not args.no_preload)
    allowed = [str(workdir.resolve())] + ([str(example.parent)] if example is not None else [])
    launch(demo, args.host, args.port, allowed)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"freecure demo: http://{host}:{args.port}/  (runs are written to {workdir}; Ctrl+C stops)", flush=True)
    if args.tiny:
        print("freecure demo: --tiny: tiny random-weight components; the images are noise", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0
