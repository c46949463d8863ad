"""Writing a FreeCure run to a folder: stage images, masks, overlays, a strip and a manifest."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import __version__
from .atomic import atomic_folder, json_text
from .errors import InputError
from .masks import normalize_map, render_mask, render_mask_overlay
from .parsing import overlay_labels
from .pipeline import FreeCureOutput

STAGE_IMAGES = ("fd", "pd", "blended", "freecure")


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


def save_output(
    output: FreeCureOutput, out_dir: Path, overwrite: bool = False, extra: dict | None = None
) -> list[Path]:
    """Write every stage image, mask overlay, the FD | PD | FreeCure strip and ``manifest.json``.

    The run lands whole or not at all: it is written into a temporary sibling folder that is
    renamed to ``out_dir`` at the end (:func:`freecure.atomic.atomic_folder`). ``overwrite``
    replaces an earlier run entirely: no file of it remains.

    Raises:
        InputError: ``out_dir`` is a file, or holds files and ``overwrite`` is False.
        NonFiniteError: the manifest would hold NaN or infinity (nothing is written).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out must be a folder, but {out_dir} is a file")
    files = planned_files(output)
    names = [*files, "manifest.json"]
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        check_writable([out_dir / name for name in names], overwrite)
        raise InputError(f"{out_dir} already exists and holds files; choose another --out or pass --overwrite")
    with torch.no_grad():
        record = json_text(manifest(output, names, extra))  # before any file: NaN stops here
    with atomic_folder(out_dir, replace=True) as staging:
        for name, image in files.items():
            image.save(staging / name)
        (staging / "manifest.json").write_text(record, encoding="utf-8")
    return [out_dir / name for name in names]
