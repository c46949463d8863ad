"""Released checkpoint layouts kept beside the tests, and shape-only state dicts built from them."""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def read_layout(name: str) -> dict[str, tuple[int, ...]]:
    """``key shape`` lines (shape as ``AxBxC``) of a key list; ``#`` lines are comments."""
    layout = {}
    for line in (DATA / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split()
            layout[key] = tuple(int(size) for size in shape.split("x"))
    return layout


def meta_state_dict(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A state dict of the layout's keys and shapes on the meta device (no memory)."""
    return {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
