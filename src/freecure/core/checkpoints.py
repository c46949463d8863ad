"""Strict checkpoint matching with a message a user can act on, instead of torch's traceback."""

from __future__ import annotations

import json
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


def _unreadable(path: Path, error: BaseException, what: str, tail: str) -> WeightsNotFoundError:
    kind = "a safetensors file" if path.suffix.lower() in SAFETENSORS_SUFFIXES else "a PyTorch checkpoint"
    reason = _first_line(error)
    if isinstance(error, pickle.UnpicklingError):  # torch's text suggests weights_only=False: never
        reason = "it is not a tensor-only checkpoint: it holds other Python objects, which freecure never unpickles"
    return WeightsNotFoundError(
        f"cannot read {path} as {kind} for {what} ({reason}); it may be truncated, corrupt or of "
        f"another format: download it again or pass the right file.{tail}"
    )


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
        raise _unreadable(path, error, what, tail) from None
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


# --- diffusers model folders (config.json + weights), loaded strictly ------------------------------
#
# diffusers' ``ModelMixin.from_pretrained`` only logs a warning for a missing or an unexpected key:
# a missing one stays on the meta device (the later ``.to(device)`` fails with "Cannot copy out of
# meta tensor", naming nothing) and an unexpected one is dropped. ControlNet-style checkpoints
# (InstantID's IdentityNet, InfiniteYou's InfuseNet) are therefore checked here first, from the
# files' headers, against the model that their config.json builds.

#: diffusers' weight file names in the order its ``from_pretrained`` tries them (safetensors
#: first: a sharded index, then one file; then the ``.bin`` equivalents), and whether they are
#: safetensors (passed on as ``use_safetensors`` so that diffusers reads the very files checked).
DIFFUSERS_WEIGHTS = (
    ("diffusion_pytorch_model.safetensors.index.json", True),
    ("diffusion_pytorch_model.safetensors", True),
    ("diffusion_pytorch_model.bin.index.json", False),
    ("diffusion_pytorch_model.bin", False),
)


def read_shapes(path: str | os.PathLike, what: str = "checkpoint", hint: str = "") -> dict[str, tuple[int, ...]]:
    """Keys and shapes of one weights file: a safetensors file's header only (no tensor data is
    read), any other format through :func:`read_tensors`.

    Raises:
        WeightsNotFoundError: missing, unreadable or corrupt file.
    """
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {key: tuple(value.shape) for key, value in read_tensors(path, what, hint).items()}
    tail = f" {hint}" if hint else ""
    if not path.is_file():
        raise WeightsNotFoundError(f"{what} not found: {path} is not a file.{tail}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - every reading failure means "unusable file"
        raise _unreadable(path, error, what, tail) from None


def weight_files(folder: str | os.PathLike, what: str, hint: str = "") -> tuple[list[Path], bool]:
    """The weight files that diffusers' ``from_pretrained`` reads in ``folder`` (the shards a
    ``*.index.json`` names, or the one file) and whether they are safetensors.

    Raises:
        WeightsNotFoundError: no weights, an unreadable index, or a shard it names is missing.
    """
    folder = Path(folder)
    tail = f" {hint}" if hint else ""
    for name, safetensors in DIFFUSERS_WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path], safetensors
        try:
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
            if not shards or not all(isinstance(shard, str) for shard in shards):
                raise ValueError("its weight_map names no shard files")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise WeightsNotFoundError(
                f"cannot read {path}, the shard index of {what} ({_first_line(error)}); download it again.{tail}"
            ) from None
        files = []
        for shard in shards:
            if Path(shard).name != shard or not (folder / shard).is_file():  # a file of this folder, nothing else
                raise WeightsNotFoundError(
                    f"{what}: the shard {shard!r} that {name} lists is not a file in {folder}; "
                    f"the download is incomplete: download the folder again.{tail}"
                )
            files.append(folder / shard)
        return files, safetensors
    raise WeightsNotFoundError(
        f"{what}: {folder} holds no diffusers weights ({DIFFUSERS_WEIGHTS[1][0]}, its sharded "
        f"{DIFFUSERS_WEIGHTS[0][0]}, or the .bin equivalents).{tail}"
    )


def folder_layout(folder: str | os.PathLike, what: str, hint: str = "") -> tuple[dict[str, tuple[int, ...]], bool]:
    """Keys and shapes of every tensor diffusers would load from ``folder`` (all shards
    together), and whether the files are safetensors.

    Raises:
        WeightsNotFoundError: as :func:`weight_files`, or a key stored in two shards.
    """
    files, safetensors = weight_files(folder, what, hint)
    layout: dict[str, tuple[int, ...]] = {}
    for path in files:
        shapes = read_shapes(path, what, hint)
        twice = layout.keys() & shapes.keys()
        if twice:
            raise WeightsNotFoundError(
                f"{what}: {path.name} repeats keys of another shard: {_first(twice, 5)}; download the folder again."
                + (f" {hint}" if hint else "")
            )
        layout.update(shapes)
    return layout, safetensors


def hub_snapshot(repo_id: str, allow_patterns: list[str], what: str, hint: str) -> Path:
    """``huggingface_hub.snapshot_download`` of the files of ``repo_id`` matching
    ``allow_patterns``: the local folder, or one :class:`WeightsNotFoundError` that says why
    (offline and not cached, network, authentication) and what to pass instead (``hint``)."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as error:  # noqa: BLE001 - offline, network, authentication: one message
        reason = (
            "HF_HUB_OFFLINE is set and the files are not in the local cache"
            if constants.HF_HUB_OFFLINE
            else (str(error).strip().splitlines() or [type(error).__name__])[0]
        )
        raise WeightsNotFoundError(f"could not get {what}: {reason}. {hint}") from None


def meta_model(model_cls, config: Mapping):
    """``model_cls.from_config(config)`` with its parameters and buffers on the meta device (no
    memory, no initialisation; what accelerate's ``init_empty_weights`` does, without needing
    accelerate): the keys and shapes that a checkpoint for this config must hold."""
    with torch.device("meta"):
        return model_cls.from_config(dict(config))


def check_layout(
    model_cls, config: Mapping, layout: Mapping[str, tuple[int, ...]], what: str, hint: str = ""
) -> None:
    """Strict key and shape check of a checkpoint's ``{key: shape}`` against ``model_cls`` built
    from ``config`` (on the meta device), as :func:`check_state_dict` words it.

    Raises:
        WeightsNotFoundError: the config cannot build the model, or keys are missing or
            unexpected, or shapes differ; the message names (the first of) them.
    """
    try:
        model = meta_model(model_cls, config)
    except Exception as error:  # noqa: BLE001 - a config.json of wrong values, whatever diffusers raises
        raise WeightsNotFoundError(
            f"{what}: its config.json does not describe a {model_cls.__name__} ({_first_line(error)})"
            + (f". {hint}" if hint else "")
        ) from None
    shapes = {key: torch.empty(shape, device="meta") for key, shape in layout.items()}
    check_state_dict(model, shapes, what, hint)


def load_diffusers_model(model_cls, folder: str | os.PathLike, what: str, hint: str = "", dtype=None):
    """A diffusers model from a local folder (``config.json`` and weights), strictly.

    The weights' keys and shapes (read from the safetensors headers, all shards of a sharded
    folder) are checked against the model that ``config.json`` builds before anything is
    loaded; the model is then loaded with ``from_pretrained`` from exactly those files, and a
    parameter or buffer left on the meta device is refused too.

    Args:
        model_cls: the diffusers model class (``ControlNetModel``, ``FluxControlNetModel``).
        folder: the local folder.
        what: the model's name in messages ("IdentityNet").
        hint: a sentence saying what to pass instead.
        dtype: the torch dtype to load in (None: as stored).

    Raises:
        WeightsNotFoundError: no config or weights, unreadable files, a config of another
            class, missing, unexpected or reshaped keys (named), or a failed load.
    """
    folder = Path(folder).expanduser()
    tail = f" {hint}" if hint else ""
    if not (folder / "config.json").is_file():
        raise WeightsNotFoundError(f"{what} not found: {folder} has no config.json.{tail}")
    try:
        config = model_cls.load_config(folder)
    except Exception as error:  # noqa: BLE001 - diffusers raises EnvironmentError/ValueError/JSON errors
        raise WeightsNotFoundError(
            f"cannot read {folder / 'config.json'} for {what} ({_first_line(error)}).{tail}"
        ) from None
    kind = config.get("_class_name")
    if kind is not None and kind != model_cls.__name__:
        raise WeightsNotFoundError(
            f"{what}: {folder / 'config.json'} describes a {kind}, not a {model_cls.__name__}.{tail}"
        )
    layout, safetensors = folder_layout(folder, what, hint)
    check_layout(model_cls, config, layout, f"{what}: the weights in {folder} do not match its config.json", hint)
    try:
        model = model_cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=safetensors)
    except (OSError, ValueError, RuntimeError) as error:
        raise WeightsNotFoundError(f"could not load {what} from {folder}: {_first_line(error)}.{tail}") from None
    unloaded = [name for name, value in (*model.named_parameters(), *model.named_buffers()) if value.is_meta]
    if unloaded:
        raise WeightsNotFoundError(f"{what}: {folder} left {_first(unloaded, 5)} unloaded.{tail}")
    return model
