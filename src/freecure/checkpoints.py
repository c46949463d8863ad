"""Strict checkpoint matching with a message a user can act on, instead of torch's traceback."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from .errors import WeightsNotFoundError


def _first(names: Iterable[str], limit: int) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    hint: str = "",
    display: Callable[[str], str] | None = None,
) -> None:
    """Compare ``state_dict`` with ``model``'s keys and shapes, as strict loading would.

    Args:
        model: the module to load into (it may live on the meta device).
        state_dict: the checkpoint's tensors, already in the model's key names.
        what: the start of the message, e.g. "photomaker-v1.bin does not match the ID encoder".
        hint: a sentence saying what to check or pass instead.
        display: maps a model key to the name the checkpoint file uses, for renamed layouts.

    Raises:
        WeightsNotFoundError: keys are missing or unexpected, or shapes differ; the message
            names (the first of) them.
    """
    display = display or (lambda key: key)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    given = {key: tuple(value.shape) for key, value in state_dict.items()}
    missing = [display(key) for key in expected.keys() - given.keys()]
    unexpected = [display(key) for key in given.keys() - expected.keys()]
    reshaped = [
        f"{display(key)} (checkpoint {given[key]}, model {expected[key]})"
        for key in expected.keys() & given.keys()
        if given[key] != expected[key]
    ]
    problems = [
        f"{label} ({len(items)}): {_first(items, limit)}"
        for label, items, limit in (
            ("missing keys", missing, 5),
            ("unexpected keys", unexpected, 5),
            ("shape mismatches", reshaped, 3),
        )
        if items
    ]
    if problems:
        raise WeightsNotFoundError(f"{what}: " + "; ".join(problems) + (f". {hint}" if hint else ""))


#: Suffixes read as safetensors; every other file is read with ``torch.load(weights_only=True)``.
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def read_tensors(path: str | os.PathLike, what: str = "checkpoint", hint: str = "", nested: bool = False) -> dict:
    """The tensors of a weights file of any format, with one clear error for every failure.

    ``.safetensors`` files are read with safetensors; anything else (``.bin``, ``.pth``,
    ``.pt``, ``.ckpt``) with ``torch.load(weights_only=True)`` (memory-mapped when the file
    allows it), so no file can run code. A top-level ``{"state_dict": {...}}`` is unwrapped.

    This is the one place a weights file is opened: exception types differ between the
    safetensors and torch versions freecure supports (safetensors' ``SafetensorError``,
    torch's ``UnpicklingError``/``RuntimeError``/``EOFError``), so every failure of the
    reading itself becomes :class:`WeightsNotFoundError` naming the file.

    Args:
        path: the file.
        what: what the file should be, for the message ("the PhotoMaker checkpoint").
        hint: a sentence saying how to get a good copy.
        nested: accept one level of nesting (``{"id_encoder": {...}, "lora_weights": {...}}``).

    Raises:
        WeightsNotFoundError: missing, unreadable, truncated or corrupt file, or not tensors.
    """
    path = Path(path)
    tail = f" {hint}" if hint else ""
    if not path.is_file():
        raise WeightsNotFoundError(f"{what} not found: {path} is not a file.{tail}")
    try:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every reading failure means "unusable file"
        kind = "a safetensors file" if path.suffix.lower() in SAFETENSORS_SUFFIXES else "a PyTorch checkpoint"
        reason = _first_line(error)
        if isinstance(error, pickle.UnpicklingError):  # torch's text suggests weights_only=False: never
            reason = "it is not a tensor-only checkpoint: it holds other Python objects, which freecure never unpickles"
        raise WeightsNotFoundError(
            f"cannot read {path} as {kind} for {what} ({reason}); it may be truncated, corrupt or of "
            f"another format: download it again or pass the right file.{tail}"
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]

    def tensors(mapping) -> bool:
        return isinstance(mapping, Mapping) and all(isinstance(v, torch.Tensor) for v in mapping.values())

    ok = tensors(state) or (
        nested and isinstance(state, Mapping) and all(tensors(v) or isinstance(v, torch.Tensor) for v in state.values())
    )
    if not ok:
        raise WeightsNotFoundError(
            f"{path} is not a state dict of tensors (got {type(state).__name__}), so it cannot be {what}.{tail}"
        )
    return dict(state)
