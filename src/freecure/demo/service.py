"""The demo's work behind the page: checking a request, caching models, running, zipping.

Nothing here knows about the web framework; :mod:`freecure.demo.app` builds the Gradio page on it.
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import math
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..backends import BACKENDS
from ..core.attributes import (
    COMMON_CLASS_WORDS,
    ParsedPrompt,
    check_prompt_length,
    detect_class_word,
    parse_prompt,
)
from ..core.errors import InputError
from ..core.images import load_image, to_rgb
from .methods import METHODS

logger = logging.getLogger(__name__)

MAX_STEPS = 200
MAX_REFERENCES = 8
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 30.0
#: The longest prompt the page (its text box) and its API accept, in characters: CLIP reads 77
#: tokens (about 300 characters), FLUX's T5 512 (about 2,000); the rest would be cut anyway.
MAX_PAGE_PROMPT_CHARS = 2_000
#: Runs whose folders are kept for the pages that show them; past this, the oldest goes.
MAX_KEPT_RUNS = 32


def backend_trigger(args: argparse.Namespace, backend: str) -> str | None:
    """The trigger word the backend's prompts carry after the class word (PhotoMaker: "img")."""
    if args.trigger is not None:
        return args.trigger
    return BACKENDS[backend].default_trigger


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
        check_prompt_length(prompt, MAX_PAGE_PROMPT_CHARS)
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
    #: the backend's own options set on the page, (dest, value) checked by their declarations
    backend_options: tuple[tuple[str, Any], ...] = ()


def check_request(
    form: dict[str, str], uploads: list[tuple[str, bytes]], example: Path | None, args: argparse.Namespace
) -> RunRequest:
    """Check the page's form before anything is queued.

    Raises:
        InputError: an empty prompt, one over :data:`MAX_PAGE_PROMPT_CHARS` characters, a
            prompt without class word, an unknown backend or method, a number out of range, a
            file that is not an image or over :data:`MAX_UPLOAD_BYTES`, no reference photo.
    """
    check_prompt_length(form.get("prompt") or "", MAX_PAGE_PROMPT_CHARS)
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
    backend_options = page_options(BACKENDS[backend], form)
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
        backend_options=backend_options,
    )


def page_options(backend, form: dict[str, str]) -> tuple[tuple[str, Any], ...]:
    """The backend's declared options (``Backend.options``) the page sets: ``form["option:<dest>"]``,
    each checked as the command line checks it; an empty field keeps the server's value. File
    and folder options are the server's (``freecure demo`` options), never the page's.

    Raises:
        InputError: a value its option refuses, naming the option.
    """
    chosen = []
    for option in page_controls(backend):
        text = (form.get(f"option:{option.dest}") or "").strip()
        if text:
            chosen.append(
                (
                    option.dest,
                    option.parse(text.lower() in ("1", "true", "on")) if option.flag_only else option.parse(text),
                )
            )
    return tuple(chosen)


def page_controls(backend) -> list:
    """The options of ``backend`` the page offers a control for: all but files and folders."""
    return [option for option in backend.options if option.control != "path"]


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
    and kept for every later request (a lock keeps a preload and a request from building twice)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def loaded(self) -> list[str]:
        return sorted(self._models)

    @staticmethod
    def key(backend: str, options: tuple[tuple[str, Any], ...] = ()) -> str:
        """The cache's name of a backend built with page-set ``options``."""
        return backend if not options else f"{backend} {dict(options)}"

    def get(self, backend: str, options: tuple[tuple[str, Any], ...] = ()):
        """The FreeCure pipeline of ``backend`` with its page-set ``options``, built once."""
        key = self.key(backend, options)
        with self._lock:
            if key not in self._models:
                from ..build import build_freecure

                args = argparse.Namespace(**vars(self.args))
                args.backend = backend
                for dest, value in options:
                    setattr(args, dest, value)
                logger.info("loading backend %s", key)
                self._models[key] = build_freecure(args)
            return self._models[key]


ProgressReport = Callable[[str, int, int], None]
"""``report(stage, done, total)``: what the page shows while a generation runs."""


@dataclass(frozen=True)
class RunResult:
    """A finished generation: its output folder (what ``freecure generate`` writes) and what the page shows."""

    out_dir: Path
    files: tuple[str, ...]
    attributes: dict[str, Any]
    stages: tuple[dict[str, Any], ...]
    notes: tuple[str, ...]
    settings: dict[str, Any]
    attribute_files: tuple[tuple[str, str], ...]  # (caption, file name): masks and attention maps

    def path(self, name: str) -> Path | None:
        return self.out_dir / name if name in self.files else None

    @property
    def folders(self) -> tuple[Path, Path]:
        """The run's folder and the folder of its zip (:func:`zip_folder`)."""
        return self.out_dir, self.out_dir.with_name(f"{self.out_dir.name}.zip")


class DemoFiles:
    """The files and folders the demo makes, and when they go.

    The demo makes run folders (``<workdir>/<run>/`` and the zip beside it, ``<run>.zip/``) and,
    through the web framework, uploads in a cache folder of its own (``cache``). A page session
    *holds* what it still needs under named slots — ``"run"``: the folders its results are
    served from, ``"uploads"``: the photos its upload box holds; holding new paths in a slot lets
    go of the slot's earlier ones. A path no session holds is deleted at once; so is the oldest
    run when more than ``max_runs`` are held, everything a session holds when it ends
    (:meth:`end`), and everything at exit (:meth:`close`).

    Only paths the demo made are ever deleted: run folders :meth:`new_run` named (and that did not
    exist before), and files inside ``cache``. The workdir itself is removed at exit only when the
    demo created it and it is empty by then; ``cache`` (a fresh folder the demo made for the web
    framework, nobody else's) is removed whole.

    Args:
        workdir: where run folders go.
        cache: the web framework's upload folder, when the demo created it; None: uploads are
            never deleted.
        own_workdir: the demo created ``workdir``.
        max_runs: most runs held at once (:data:`MAX_KEPT_RUNS`).
    """

    def __init__(
        self,
        workdir: Path,
        cache: Path | None = None,
        own_workdir: bool = False,
        max_runs: int = MAX_KEPT_RUNS,
    ):
        self.workdir = Path(workdir)
        self.cache = None if cache is None else Path(cache).resolve()
        self.own_workdir = own_workdir
        self.max_runs = max_runs
        self._ids = itertools.count(1)
        self._made: set[Path] = set()
        self._holders: dict[Path, set[tuple[str, str]]] = {}
        self._slots: dict[tuple[str, str], frozenset[Path]] = {}  # in the order they were last set
        self._lock = threading.RLock()
        self._closed = False

    def new_run(self) -> tuple[Path, Path]:
        """A fresh run folder and the folder for its zip (neither exists yet); both are the demo's."""
        with self._lock:
            while True:
                out_dir = self.workdir / f"{next(self._ids):04d}-{int(time.time() * 1000) % 10**8:08d}"
                zip_dir = out_dir.with_name(f"{out_dir.name}.zip")
                if not out_dir.exists() and not zip_dir.exists():  # never adopt a folder of someone else
                    self._made.update((out_dir, zip_dir))
                    return out_dir, zip_dir

    def _ours(self, path: Path) -> Path | None:
        """``path`` as the demo's own, or None: a run folder it named, or a file in its cache."""
        path = Path(path)
        if path in self._made:
            return path
        if self.cache is not None:
            resolved = path.resolve()  # a link out of the cache is not the demo's
            if resolved != self.cache and resolved.is_relative_to(self.cache):
                return resolved
        return None

    def hold(self, session: str, slot: str, paths: Iterable[Path | str]) -> None:
        """``session`` now needs ``paths`` in ``slot`` (and no longer the slot's earlier ones)."""
        with self._lock:
            if self._closed:
                return
            key = (session, slot)
            paths = frozenset(path for path in map(self._ours, paths) if path is not None)
            old = self._slots.pop(key, frozenset())
            for path in paths:
                self._holders.setdefault(path, set()).add(key)
            self._slots[key] = paths
            self._let_go(key, old - paths)
            runs = [held for held in self._slots if held[1] == "run"]
            for oldest in runs[: max(len(runs) - self.max_runs, 0)]:
                self._let_go(oldest, self._slots.pop(oldest))

    def release(self, paths: Iterable[Path | str]) -> None:
        """Delete ``paths`` (the demo's own) that no session holds: a failed run's folders."""
        with self._lock:
            for path in map(self._ours, paths):
                if path is not None and not self._holders.get(path):
                    self._remove(path)

    def end(self, session: str) -> None:
        """The session's page was closed: let go of everything it held."""
        with self._lock:
            for key in [key for key in self._slots if key[0] == session]:
                self._let_go(key, self._slots.pop(key))

    def sweep(self, age: float = 60.0) -> None:
        """Delete the empty ``tmp*`` files Gradio 6 leaves at the top of its cache (one for each
        uploaded file it hands to a function, never used) once ``age`` seconds old."""
        if self.cache is None or not self.cache.is_dir():
            return
        now = time.time()
        for path in self.cache.glob("tmp*"):
            try:
                info = path.lstat()
                if path.is_file() and not path.is_symlink() and info.st_size == 0 and now - info.st_mtime > age:
                    path.unlink()
            except OSError:
                pass

    def held(self) -> set[Path]:
        with self._lock:
            return {path for path, holders in self._holders.items() if holders}

    def close(self) -> None:
        """At exit: delete every run folder the demo made, its cache, and its own empty workdir."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for path in sorted(self._made):
                self._remove(path)
            self._holders.clear()
            self._slots.clear()
            if self.cache is not None:
                shutil.rmtree(self.cache, ignore_errors=True)
            if self.own_workdir:
                try:
                    self.workdir.rmdir()  # only when empty: a file someone put there stays
                except OSError:
                    pass

    def _let_go(self, key: tuple[str, str], paths: Iterable[Path]) -> None:
        for path in paths:
            holders = self._holders.get(path, set())
            holders.discard(key)
            if not holders:
                self._holders.pop(path, None)
                self._remove(path)

    def _remove(self, path: Path) -> None:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        except OSError as error:
            logger.warning("could not remove %s: %s", path, error)
            return
        if path not in self._made and self.cache is not None:
            parent = path.parent  # Gradio keeps each upload in a folder of its own
            if parent != self.cache and parent.is_relative_to(self.cache):
                try:
                    parent.rmdir()
                except OSError:
                    pass


class Runner:
    """Runs checked requests one after another (the web framework's queue calls :meth:`run` from
    one worker at a time); each run writes to its own folder under ``workdir``, which
    ``files`` (:class:`DemoFiles`) names and later removes."""

    def __init__(
        self,
        args: argparse.Namespace,
        workdir: Path,
        preload: str | None = None,
        files: DemoFiles | None = None,
    ):
        self.args = args
        self.workdir = Path(workdir)
        self.files = files or DemoFiles(self.workdir)
        self.models = ModelCache(args)
        self.face_check = FaceCheck()
        if preload is not None:  # load the default backend in the background right away
            threading.Thread(target=self._preload, args=(preload,), name="freecure-demo-preload", daemon=True).start()

    def _preload(self, backend: str) -> None:
        try:
            self.models.get(backend)
        except Exception:  # the first request retries and shows the error on the page
            logger.exception("could not preload backend %s", backend)

    def close(self) -> None:
        """Delete every run folder the runner wrote (see :meth:`DemoFiles.close`)."""
        self.files.close()

    def run(self, request: RunRequest, report: ProgressReport = lambda stage, done, total: None) -> RunResult:
        """Generate ``request`` into a new run folder; a failed run leaves no folder behind."""
        out_dir, zip_dir = self.files.new_run()
        try:
            return self._run(request, report, out_dir)
        except BaseException:
            self.files.release([out_dir, zip_dir])
            raise

    def _run(self, request: RunRequest, report: ProgressReport, out_dir: Path) -> RunResult:
        from ..outputs import save_output, slug
        from ..pipeline import FreeCurePipeline

        report("checking the reference photos", 0, 0)
        self.face_check(request.references, request.reference_names)
        key = self.models.key(request.backend, request.backend_options)
        report(f"loading {key}" + ("" if key in self.models.loaded() else " (once)"), 0, 0)
        loaded = self.models.get(request.backend, request.backend_options)
        freecure = FreeCurePipeline(loaded.backend, loaded.face_parser, replace(loaded.config, gamma=request.gamma))
        freecure.set_progress_bar_config(disable=True, callback=report)
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
        report("writing the output folder", 0, 0)
        extra = {
            "seed": request.seed,
            "method": request.method,
            "references": list(request.reference_names),
            "weights": "random (tiny components)" if self.args.tiny else "pretrained",
            "base_model": None if self.args.tiny else self.args.base_model,
            "license": loaded.backend.license,
        }
        files = tuple(sorted(path.name for path in save_output(output, out_dir, extra=extra)))
        notes = list(output.notes)
        if self.face_check.note:
            notes.append(self.face_check.note)
        attribute_files = []
        for text in output.attention_maps:
            if f"mask_{slug(text)}.png" in files:
                attribute_files.append((f"mask: {text}", f"mask_{slug(text)}.png"))
            attribute_files.append((f"attention: {text}", f"attention_{slug(text)}.png"))
        return RunResult(
            out_dir=out_dir,
            files=files,
            attributes=output.parsed.to_dict(),
            stages=tuple(vars(stage) for stage in output.stages),
            notes=tuple(notes),
            settings=dict(output.settings),
            attribute_files=tuple(attribute_files),
        )


def zip_folder(result: RunResult, request: RunRequest) -> Path:
    """The run's output folder — the one ``freecure generate`` writes — as a zip next to it."""
    folder = f"freecure-{request.backend}-seed{request.seed}"
    path = result.folders[1] / f"{folder}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in result.files:
            archive.write(result.out_dir / name, f"{folder}/{name}")
    return path
