"""The demo's work behind the page: checking a request, caching models, one queue per device.

Nothing here knows about HTTP; :mod:`freecure.demo.app` maps it onto routes.
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import math
import queue
import threading
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..attributes import COMMON_CLASS_WORDS, ParsedPrompt, detect_class_word, parse_prompt
from ..backends import BACKENDS
from ..errors import FreeCureError, InputError
from ..images import load_image, to_rgb
from .methods import METHODS

logger = logging.getLogger(__name__)

MAX_STEPS = 200
MAX_REFERENCES = 8
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 30.0


def backend_trigger(args: argparse.Namespace, backend: str) -> str | None:
    """The trigger word the backend's prompts carry after the class word (PhotoMaker: "img")."""
    if args.trigger is not None:
        return args.trigger
    if backend == "photomaker":
        from ..backends.photomaker import TRIGGER_WORD

        return TRIGGER_WORD
    return None


def find_class_word(prompt: str) -> str:
    """The subject's class word, with a message for the page (not the CLI's option) when there is none."""
    try:
        return detect_class_word(prompt)
    except InputError:
        raise InputError(
            f"the prompt names no subject FreeCure knows ({', '.join(COMMON_CLASS_WORDS)}); "
            "write one, e.g. “a woman with red hair, laughing happily”"
        ) from None


def preview_attributes(prompt: str, trigger: str | None) -> dict[str, Any]:
    """The prompt's attributes as the page shows them while the user types (no model needed).

    Returns a dict with ``ok``; either the parsed prompt (``attributes`` with their kind,
    ``unknown_words``, ``class_word``) or ``error``: what is wrong with the prompt.
    """
    if not prompt.strip():
        return {"ok": False, "error": "type a prompt, e.g. “a woman with red hair, laughing happily”"}
    try:
        parsed = parse_prompt(prompt, find_class_word(prompt), trigger=trigger)
    except InputError as error:
        return {"ok": False, "error": str(error)}
    return {"ok": True, **parsed.to_dict()}


def read_upload(name: str, data: bytes) -> Image.Image:
    """Decode an uploaded reference photo to RGB, or say why it cannot be used."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError(f"{name} is larger than {MAX_UPLOAD_BYTES // 2**20} MB; upload a smaller photo")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InputError(
            f"{name} is not an image; upload a photo of a face (PNG, JPEG, WebP or another format Pillow reads)"
        ) from None


def _number(form: dict[str, str], key: str, kind: type, low, high, default, what: str):
    """The form field ``key`` as a finite ``kind`` in [low, high]; ``default`` when left empty."""
    text = (form.get(key) or "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise InputError(f"{what} must be {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{what} must be finite, got {text!r}")
    if not low <= value <= high:
        raise InputError(f"{what} must lie in [{low}, {high}], got {text}")
    return value


@dataclass(frozen=True)
class RunRequest:
    """A checked request: every value is in range and the prompt parses."""

    prompt: str
    backend: str
    method: str
    class_word: str
    trigger: str | None
    references: tuple[Image.Image, ...]
    reference_names: tuple[str, ...]
    steps: int
    seed: int
    gamma: float
    guidance_scale: float | None
    inject_step: int | None
    parsed: ParsedPrompt


def check_request(
    form: dict[str, str], uploads: list[tuple[str, bytes]], example: Path | None, args: argparse.Namespace
) -> RunRequest:
    """Check the page's form before anything is queued.

    Raises:
        InputError: an empty prompt, a prompt without class word, an unknown backend or
            method, a number out of range, a file that is not an image, no reference photo.
    """
    prompt = (form.get("prompt") or "").strip()
    if not prompt:
        raise InputError("the prompt is empty; type one, e.g. “a woman with red hair, laughing happily”")
    backend = form.get("backend") or args.backend
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(sorted(BACKENDS))}")
    method = form.get("method") or next(iter(METHODS))
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    steps = _number(form, "steps", int, 2, MAX_STEPS, args.steps, "steps")
    seed = _number(form, "seed", int, 0, MAX_SEED, 0, "seed")
    gamma = _number(form, "gamma", float, 0.0, 1.0, args.gamma, "γ")
    if gamma == 0.0:
        raise InputError("γ must lie in (0, 1]: it is the fraction of the steps the expression stage inverts")
    guidance = _number(form, "guidance_scale", float, 0.0, MAX_GUIDANCE, args.guidance_scale, "guidance scale")
    inject_step = _number(form, "inject_step", int, 0, steps - 1, args.inject_step, "injection step")
    if len(uploads) > MAX_REFERENCES:
        raise InputError(f"upload at most {MAX_REFERENCES} reference photos, got {len(uploads)}")
    references = [read_upload(name, data) for name, data in uploads]
    names = [name for name, _ in uploads]
    if not references and example is not None and form.get("use_example") in ("1", "on", "true"):
        references, names = [load_image(example)], [example.name]
    if not references:
        raise InputError("upload at least one reference photo of the identity (or tick the bundled example)")
    trigger = backend_trigger(args, backend)
    class_word = find_class_word(prompt)
    parsed = parse_prompt(prompt, class_word, trigger=trigger)
    return RunRequest(
        prompt=prompt,
        backend=backend,
        method=method,
        class_word=class_word,
        trigger=trigger,
        references=tuple(references),
        reference_names=tuple(names),
        steps=steps,
        seed=seed,
        gamma=gamma,
        guidance_scale=guidance,
        inject_step=inject_step,
        parsed=parsed,
    )


class FaceCheck:
    """Refuses reference photos without a face (MTCNN, CPU), when a detector is installed."""

    def __init__(self):
        self._detector = None
        self.note: str | None = None

    def __call__(self, references, names) -> None:
        if self._detector is None and self.note is None:
            from ..parsing.face_crop import MTCNNFaceDetector

            try:
                self._detector = MTCNNFaceDetector("cpu")
            except ImportError as error:
                self.note = f"reference photos are not checked for a face: {error}"
                logger.warning("%s", self.note)
        if self._detector is None:
            return
        for image, name in zip(references, names):
            if self._detector(image) is None:
                raise InputError(f"no face found in the reference photo {name}; upload a photo that shows a face")


class ModelCache:
    """One FreeCure pipeline per backend, built on first use from the ``freecure demo`` options
    and kept for every later request (only the worker thread touches it)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._models: dict[str, Any] = {}

    def loaded(self) -> list[str]:
        return sorted(self._models)

    def get(self, backend: str):
        if backend not in self._models:
            from ..cli.generate import build_freecure

            args = argparse.Namespace(**vars(self.args))
            args.backend = backend
            logger.info("loading backend %s", backend)
            self._models[backend] = build_freecure(args)
        return self._models[backend]


@dataclass
class Job:
    """One queued generation and what the page is told about it."""

    id: str
    request: RunRequest
    out_dir: Path
    state: str = "queued"  # queued → running → done | error
    message: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)


class JobQueue:
    """First come, first served: one worker thread per device runs one generation at a time."""

    def __init__(self, args: argparse.Namespace, workdir: Path, example: Path | None, preload: str | None = None):
        self.args = args
        self.preload = preload  # a backend to load before the first request asks for it
        self.workdir = Path(workdir)
        self.example = example
        self.models = ModelCache(args)
        self.face_check = FaceCheck()
        self.jobs: dict[str, Job] = {}
        self._waiting: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._worker = threading.Thread(target=self._work, name="freecure-demo-worker", daemon=True)
        self._worker.start()

    def submit(self, request: RunRequest) -> Job:
        with self._lock:
            job_id = f"{next(self._ids):04d}-{int(time.time() * 1000) % 10**8:08d}"
            job = Job(job_id, request, self.workdir / job_id)
            self.jobs[job_id] = job
            self._waiting.append(job_id)
        self._queue.put(job_id)
        return job

    def position(self, job: Job) -> int:
        """How many generations run or wait before this one (0: it is running or done)."""
        with self._lock:
            if job.id not in self._waiting:
                return 0
            running = any(other.state == "running" for other in self.jobs.values())
            return self._waiting.index(job.id) + int(running)

    def _work(self) -> None:
        if self.preload is not None:
            try:
                self.models.get(self.preload)
            except Exception:  # the first request retries and shows the error on the page
                logger.exception("could not preload backend %s", self.preload)
        while True:
            job = self.jobs[self._queue.get()]
            with self._lock:
                self._waiting.remove(job.id)
                job.state = "running"
            try:
                job.result = self._run(job)
                job.state = "done"
            except FreeCureError as error:
                job.state, job.message = "error", str(error)
            except Exception as error:  # the page gets one line; the server log the traceback
                logger.exception("demo job %s failed", job.id)
                job.state, job.message = (
                    "error",
                    f"internal error ({type(error).__name__}: {error}); see the server log",
                )

    def _progress(self, job: Job, stage: str, done: int = 0, total: int = 0) -> None:
        job.progress = {"stage": stage, "done": done, "total": total}

    def _run(self, job: Job) -> dict[str, Any]:
        from ..outputs import save_output, slug
        from ..pipeline import FreeCurePipeline

        request = job.request
        self._progress(job, "checking the reference photos")
        self.face_check(request.references, request.reference_names)
        self._progress(
            job, f"loading {request.backend}" + ("" if request.backend in self.models.loaded() else " (once)")
        )
        loaded = self.models.get(request.backend)
        freecure = FreeCurePipeline(loaded.backend, loaded.face_parser, replace(loaded.config, gamma=request.gamma))
        freecure.set_progress_bar_config(disable=True, callback=lambda stage, d, t: self._progress(job, stage, d, t))
        guidance = (
            request.guidance_scale if request.guidance_scale is not None else loaded.backend.default_guidance_scale
        )
        import torch

        output = METHODS[request.method].run(
            freecure,
            prompt=request.prompt,
            reference_images=list(request.references),
            class_word=request.class_word,
            trigger_word=request.trigger,
            negative_prompt=self.args.negative_prompt,
            num_inference_steps=request.steps,
            guidance_scale=guidance,
            height=self.args.height,
            width=self.args.width,
            generator=torch.Generator().manual_seed(request.seed),
            inject_step=request.inject_step,
        )
        self._progress(job, "writing the output folder")
        extra = {
            "seed": request.seed,
            "method": request.method,
            "references": list(request.reference_names),
            "weights": "random (tiny components)" if self.args.tiny else "pretrained",
            "base_model": None if self.args.tiny else self.args.base_model,
            "license": loaded.backend.license,
        }
        paths = save_output(output, job.out_dir, extra=extra)
        files = sorted(path.name for path in paths)
        messages = list(output.notes)
        if self.face_check.note:
            messages.append(self.face_check.note)
        return {
            "files": files,
            "attributes": output.parsed.to_dict(),
            "stages": [vars(stage) for stage in output.stages],
            "notes": messages,
            "settings": output.settings,
            "unet_calls": output.unet_calls,
            "attribute_files": [
                {
                    "text": text,
                    "mask": f"mask_{slug(text)}.png" if f"mask_{slug(text)}.png" in files else None,
                    "attention": f"attention_{slug(text)}.png",
                }
                for text in output.attention_maps
            ],
        }

    def zip_folder(self, job: Job) -> bytes:
        """The job's output folder — the one ``freecure generate`` writes — as a zip."""
        buffer = io.BytesIO()
        folder = f"freecure-{job.request.backend}-seed{job.request.seed}"
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in job.result["files"]:
                archive.write(job.out_dir / name, f"{folder}/{name}")
        return buffer.getvalue()
