"""Strict checkpoint matching with a message a user can act on, instead of torch's traceback."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

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
