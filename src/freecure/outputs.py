"""Writing a FreeCure run to a folder: stage images, masks, overlays, a strip and a manifest."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import __version__
from .core.atomic import atomic_folder, json_text
from .core.errors import InputError
from .parsing import overlay_labels
from .stages.masks import normalize_map, render_mask, render_mask_overlay
from .stages.records import FreeCureOutput

STAGE_IMAGES = ("fd", "pd", "blended", "freecure")
#: The sub-folder of one image of a ``--num-images`` run.
SEED_FOLDER = re.compile(r"seed[0-9]+")
#: A manifest larger than this is not one freecure wrote (they are a few kB).
MAX_MANIFEST_BYTES = 16 * 2**20


def read_run_manifest(folder: Path) -> dict | None:
    """``folder/manifest.json`` if it is a freecure manifest (a JSON object with
    ``freecure_version``), else None."""
    path = Path(folder) / "manifest.json"
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return None
    return data if isinstance(data, dict) and "freecure_version" in data else None


def _names(value) -> set[str]:
    return {name for name in value if isinstance(name, str)} if isinstance(value, list) else set()


def not_a_run(folder: Path, nested: bool = False) -> str | None:
    """Why ``folder`` is not an earlier freecure run (None when it is one, or is empty).

    A freecure run is a folder whose ``manifest.json`` has ``freecure_version`` and lists
    every other entry: its files (``files``, plain files) and, for a ``--num-images`` run, its
    ``seed<S>/`` sub-folders (``runs``), each a freecure run itself. A folder written by
    ``--num-images`` before the top-level manifest existed (only ``seed<S>/`` sub-folders, each
    a freecure run) counts too. Any other entry — a file, a link, a hidden file — makes it
    something else.
    """
    folder = Path(folder)
    entries = sorted(folder.iterdir())
    if not entries and not nested:
        return None
    record = read_run_manifest(folder)
    if record is None:
        older_batch = not nested and all(
            SEED_FOLDER.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink() for entry in entries
        )
        if not older_batch:
            return f"{folder} has no freecure manifest.json, so it is not a folder freecure wrote"
        runs = {entry.name for entry in entries}
        files: set[str] = set()
    else:
        files = _names(record.get("files")) | {"manifest.json"}
        runs = set() if nested else {name for name in _names(record.get("runs")) if SEED_FOLDER.fullmatch(name)}
    for entry in entries:
        if entry.name in runs and entry.is_dir() and not entry.is_symlink():
            problem = not_a_run(entry, nested=True)
            if problem is not None:
                return problem
        elif not (entry.name in files and entry.is_file() and not entry.is_symlink()):
            return f"{entry} is not part of the freecure run there (its manifest.json does not list it)"
    return None


def check_earlier_run(folder: Path, option: str = "--out") -> None:
    """Refuse to replace ``folder`` unless it is empty or an earlier freecure run
    (:func:`not_a_run`): nothing else a user keeps there is ever removed.

    Raises:
        InputError: one line naming what is not part of a run, and what to do.
    """
    problem = not_a_run(folder)
    if problem is not None:
        raise InputError(
            f"{option} {folder}: {problem}; --overwrite replaces only an earlier freecure run: move your files "
            f"elsewhere or choose another {option}"
        )


def check_writable(paths: Iterable[Path], overwrite: bool) -> None:
    """Refuse to replace existing files unless ``overwrite``: nothing a user made is lost."""
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (" …" if len(existing) > 5 else "")
        raise InputError(f"output files already exist: {shown}; choose another --out or pass --overwrite")


def slug(text: str) -> str:
    """A file-name-safe form of an attribute text: "black curly hair" → "black-curly-hair"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "attribute"


def strip(images: list[Image.Image], labels: list[str], gap: int = 4) -> Image.Image:
    """Side-by-side images with a caption band: FD | PD | FreeCure."""
    width, height = images[0].size
    band = max(14, height // 16)
    canvas = Image.new("RGB", (len(images) * width + (len(images) - 1) * gap, height + band), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (image, label) in enumerate(zip(images, labels)):
        x = index * (width + gap)
        canvas.paste(image.resize((width, height)), (x, band))
        draw.text((x + 4, 2), label, fill="black")
    return canvas


def planned_files(output: FreeCureOutput) -> dict[str, Image.Image]:
    """File name → image for everything a run writes (except the manifest)."""
    files: dict[str, Image.Image] = {f"{name}.png": output.images[name] for name in STAGE_IMAGES}
    files["strip.png"] = strip(
        [output.images["fd"], output.images["pd"], output.images["freecure"]], ["FD", "PD", "FreeCure"]
    )
    pd_image = output.images["pd"]
    if output.mask is not None:
        files["mask.png"] = render_mask(output.mask)
        files["mask_overlay.png"] = render_mask_overlay(pd_image, output.mask)
    if output.fasa_mask is not None:  # method "fasa": the mask on FD's keys
        files["fasa_mask_overlay.png"] = render_mask_overlay(output.images["fd"], output.fasa_mask)
    for text, mask in output.attribute_masks.items():
        files[f"mask_{slug(text)}.png"] = render_mask_overlay(pd_image, mask)
    for text, heat in output.attention_maps.items():
        files[f"attention_{slug(text)}.png"] = render_mask_overlay(
            output.images["fd"], normalize_map(heat), color=(255, 200, 0), alpha=0.7
        )
    for name, parse in (("fd", output.parse_fd), ("pd", output.parse_pd)):
        if parse is not None:
            files[f"parse_{name}.png"] = overlay_labels(output.images[name], parse.labels)
    return files


def manifest(output: FreeCureOutput, files: Iterable[str], extra: dict | None = None) -> dict:
    """JSON-ready description of the run."""
    return {
        "freecure_version": __version__,
        **(extra or {}),
        "settings": output.settings,
        "attributes": output.parsed.to_dict(),
        "stages": [vars(stage) for stage in output.stages],
        "unet_calls": output.unet_calls,
        "batch_items": output.batch_items,
        "notes": output.notes,
        "mask_coverage": None if output.mask is None else float(output.mask.mean()),
        "files": sorted(files),
    }


def write_run(output: FreeCureOutput, folder: Path, extra: dict | None = None) -> list[str]:
    """Write one run's files and ``manifest.json`` into ``folder`` (created if missing), as is:
    no check, no atomic rename (use :func:`save_output`, or write into the staging folder of
    :func:`freecure.atomic.atomic_folder`). Returns the file names.

    Raises:
        NonFiniteError: the manifest would hold NaN or infinity (before any file is written).
    """
    files = planned_files(output)
    names = [*files, "manifest.json"]
    with torch.no_grad():
        record = json_text(manifest(output, names, extra))  # before any file: NaN stops here
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    for name, image in files.items():
        image.save(folder / name)
    (folder / "manifest.json").write_text(record, encoding="utf-8")
    return names


def write_runs(
    outputs: Sequence[FreeCureOutput], seeds: Sequence[int], folder: Path, extra: dict | None = None
) -> list[str]:
    """Write a ``--num-images`` run into ``folder``, as is (see :func:`write_run`): one complete
    run folder per image, ``seed<S>/`` (its manifest has ``extra`` and its seed), and a
    top-level ``manifest.json`` that lists them (``runs``), so that the folder is recognised as
    an earlier freecure run (:func:`not_a_run`). Returns the sub-folder names."""
    folders = [f"seed{seed}" for seed in seeds]
    top = {"freecure_version": __version__, "seeds": list(seeds), "runs": folders, "files": ["manifest.json"]}
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    for output, seed, name in zip(outputs, seeds, folders):
        write_run(output, folder / name, {"seed": seed, **(extra or {})})
    (folder / "manifest.json").write_text(json_text(top), encoding="utf-8")
    return folders


def save_output(
    output: FreeCureOutput, out_dir: Path, overwrite: bool = False, extra: dict | None = None
) -> list[Path]:
    """Write every stage image, mask overlay, the FD | PD | FreeCure strip and ``manifest.json``.

    The run lands whole or not at all: it is written into a temporary sibling folder that is
    renamed to ``out_dir`` at the end (:func:`freecure.atomic.atomic_folder`). ``overwrite``
    replaces an earlier freecure run entirely (no file of it remains), and nothing else: a
    folder holding anything its manifest does not list is refused (:func:`check_earlier_run`),
    before writing and again at the final rename.

    Raises:
        InputError: ``out_dir`` is a file, holds files and ``overwrite`` is False, or holds
            files that are not an earlier freecure run's.
        NonFiniteError: the manifest would hold NaN or infinity (nothing is written).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out must be a folder, but {out_dir} is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        check_writable([out_dir / name for name in [*planned_files(output), "manifest.json"]], overwrite)
        raise InputError(f"{out_dir} already exists and holds files; choose another --out or pass --overwrite")
    with atomic_folder(out_dir, replace=overwrite, check=check_earlier_run) as staging:
        names = write_run(output, staging, extra)
    return [out_dir / name for name in names]

