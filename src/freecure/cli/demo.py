"""`freecure demo`: serve the FreeCure web page on localhost."""

from __future__ import annotations

import argparse
import atexit
import math
import os
import signal
import socket
import tempfile
from pathlib import Path

from ..core.errors import InputError
from ..demo.service import MAX_GUIDANCE, MAX_STEPS
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
        "--workdir",
        type=Path,
        default=None,
        metavar="DIR",
        help=(
            "where runs are written (default: a temp folder); each run's folder is removed once no page "
            "shows it, and all of them at exit (the page's zip keeps a run)"
        ),
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
    gradio_temp_dir = os.environ.get("GRADIO_TEMP_DIR")
    files = demo_files(args.workdir)  # before Gradio is imported: it writes to GRADIO_TEMP_DIR
    atexit.register(files.close)  # also when start-up fails half-way
    previous = _on_sigterm(_stop)  # `kill`, a service manager: clean up as on Ctrl+C
    try:
        try:  # after the quick checks: importing Gradio takes seconds
            from ..demo.app import create_app, find_example, launch
        except ImportError as error:
            raise InputError(f"the demo needs Gradio ({error}); install it: pip install 'freecure[demo]'") from None
        example = find_example()
        demo = create_app(args, files.workdir, example, preload=not args.no_preload, files=files)
        allowed = [str(files.workdir.resolve())] + ([str(example.parent)] if example is not None else [])
        launch(demo, args.host, args.port, allowed)
        try:
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(
                f"freecure demo: http://{host}:{args.port}/  (runs are written to {files.workdir}; Ctrl+C stops)",
                flush=True,
            )
            if args.tiny:
                print("freecure demo: --tiny: tiny random-weight components; the images are noise", flush=True)
            demo.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            demo.close()
    finally:
        if previous is not None:
            _on_sigterm(previous)
        files.close()
        atexit.unregister(files.close)
        if gradio_temp_dir is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = gradio_temp_dir
    return 0


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds to the clean-up in run()


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM (only the main thread can); the previous one."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def demo_files(workdir: Path | None):
    """The demo's files: ``workdir`` (default: a new temp folder) for run folders, and a new folder
    of its own for Gradio's uploads (``GRADIO_TEMP_DIR`` is pointed there, inside the one a user
    set, if any), so that what the demo removes is only ever what it made."""
    from ..demo.service import DemoFiles

    own_workdir = workdir is None or not workdir.exists()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="freecure-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    parent = os.environ.get("GRADIO_TEMP_DIR") or None
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="freecure-demo-uploads-", dir=parent))
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # read by Gradio on import, and when the page is built and served
    return DemoFiles(workdir, cache, own_workdir=own_workdir)
