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


def read_config(name: str) -> dict:
    """A released model configuration (``config.json``) kept beside the key lists."""
    import json

    return json.loads((DATA / name).read_text())


def key_hash(layout: dict[str, tuple[int, ...]]) -> str:
    """md5 of the sorted ``key:A_B`` and ``key`` strings joined by commas: the convention of
    DiffSynth-Studio's ``hash_state_dict_keys``, whose ``model_configs.py`` records it for released
    checkpoints (so a derived key list can be compared with a file that cannot be downloaded)."""
    import hashlib

    parts = [f"{key}:{'_'.join(map(str, shape))}" for key, shape in layout.items()] + list(layout)
    return hashlib.md5(",".join(sorted(parts)).encode()).hexdigest()


def save_edited(model, folder: Path, edit=None, **save_kwargs) -> Path:
    """``model.save_pretrained(folder)``, then ``edit(state)`` applied to the tensors of the
    safetensors file that holds the first key ``edit`` names (every shard is offered in turn
    until one returns True)."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder, **save_kwargs)
    if edit is not None:
        for path in sorted(folder.glob("*.safetensors")):
            state = load_file(str(path))
            if edit(state):
                save_file(state, str(path), metadata={"format": "pt"})
                break
        else:
            raise AssertionError("the edit applied to no file")
    return folder
