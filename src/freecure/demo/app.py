"""The demo's web app: one static page and a small JSON API (Starlette, served by uvicorn).

Routes:
    GET  /                          the page (``static/index.html``)
    GET  /api/config                backends, methods, defaults, whether the weights are tiny
    POST /api/attributes            {"prompt", "backend"} → the parsed attributes (instant)
    POST /api/run                   multipart form → {"job": id} or {"error": message} (400)
    GET  /api/jobs/{id}             queue position, progress, result or error message
    GET  /api/jobs/{id}/files/{f}   one file of the run's output folder
    GET  /api/jobs/{id}/download    the output folder as a zip
    GET  /example.png               the bundled example reference photo
"""

from __future__ import annotations

import argparse
import logging
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..backends import BACKENDS
from ..errors import InputError
from .methods import METHODS
from .service import MAX_UPLOAD_BYTES, JobQueue, backend_trigger, check_request, preview_attributes

logger = logging.getLogger(__name__)


def find_example() -> Path | None:
    """``examples/astronaut.png`` of a source checkout, if there is one."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "examples" / "astronaut.png"
        if candidate.is_file():
            return candidate
    return None


def create_app(args: argparse.Namespace, workdir: Path, example: Path | None = None, preload: bool = True) -> Starlette:
    """The demo app for the ``freecure demo`` options ``args``; run outputs go under ``workdir``.
    ``preload`` loads ``args.backend``'s models in the background right away."""
    jobs = JobQueue(args, workdir, example, preload=args.backend if preload else None)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    def backend_default_guidance(name: str) -> float | None:
        value = getattr(BACKENDS[name], "default_guidance_scale", None)
        return value if isinstance(value, float) else None  # a property: known once loaded

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def config(request: Request) -> Response:
        return JSONResponse(
            {
                "tiny": bool(args.tiny),
                "backend": args.backend,
                "backends": [
                    {
                        "name": name,
                        "trigger": backend_trigger(args, name),
                        "default_guidance_scale": backend_default_guidance(name),
                        "license": BACKENDS[name].license,
                    }
                    for name in sorted(BACKENDS)
                ],
                "methods": [{"name": m.name, "title": m.title} for m in METHODS.values()],
                "defaults": {
                    "steps": args.steps,
                    "seed": 0,
                    "gamma": args.gamma,
                    "guidance_scale": args.guidance_scale,
                    "inject_step": args.inject_step,
                },
                "example": example is not None,
            }
        )

    async def attributes(request: Request) -> Response:
        body = await request.json()
        backend = body.get("backend") if body.get("backend") in BACKENDS else args.backend
        return JSONResponse(preview_attributes(str(body.get("prompt", "")), backend_trigger(args, backend)))

    async def run(request: Request) -> Response:
        try:
            form = await request.form(max_files=32, max_part_size=MAX_UPLOAD_BYTES)
        except Exception as error:  # malformed multipart body
            return JSONResponse({"error": f"could not read the form ({error})"}, status_code=400)
        uploads = []
        for upload in form.getlist("references"):
            if hasattr(upload, "read") and upload.filename:
                uploads.append((Path(upload.filename).name, await upload.read()))
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        try:
            checked = check_request(fields, uploads, example, args)
        except InputError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        job = jobs.submit(checked)
        return JSONResponse({"job": job.id})

    def find_job(request: Request):
        return jobs.jobs.get(request.path_params["job"])

    async def status(request: Request) -> Response:
        job = find_job(request)
        if job is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        return JSONResponse(
            {
                "state": job.state,
                "position": jobs.position(job),
                "progress": job.progress,
                "message": job.message,
                "result": job.result,
            }
        )

    async def file(request: Request) -> Response:
        job = find_job(request)
        name = request.path_params["name"]
        if job is None or job.result is None or name not in job.result["files"]:
            return JSONResponse({"error": "no such file"}, status_code=404)
        return FileResponse(job.out_dir / name)

    async def download(request: Request) -> Response:
        job = find_job(request)
        if job is None or job.result is None:
            return JSONResponse({"error": "no finished run"}, status_code=404)
        name = f"freecure-{job.request.backend}-seed{job.request.seed}.zip"
        return Response(
            jobs.zip_folder(job),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    async def example_image(request: Request) -> Response:
        if example is None:
            return JSONResponse({"error": "no bundled example"}, status_code=404)
        return FileResponse(example)

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/config", config),
            Route("/api/attributes", attributes, methods=["POST"]),
            Route("/api/run", run, methods=["POST"]),
            Route("/api/jobs/{job}", status),
            Route("/api/jobs/{job}/files/{name}", file),
            Route("/api/jobs/{job}/download", download),
            Route("/example.png", example_image),
        ]
    )
    app.state.jobs = jobs
    return app
