"""Reusable argparse option types and output-folder checks for every sub-command.

Each type checks one option at parse time, before any model loads, and raises
``argparse.ArgumentTypeError`` with a message that says what was wrong and what to give
instead; argparse turns it into one line and exit code 2. Use them as ``type=``::

    parser.add_argument("--steps", type=steps, default=50)
    parser.add_argument("--guidance-scale", type=finite_float(minimum=0.0), default=None)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--height", type=image_size, default=None)
    parser.add_argument("--device", type=device, default=None)

:func:`check_output_folder` checks that an ``--out`` folder can be written (and is free, or
``--overwrite`` was given and it holds an earlier freecure run) before the work starts;
:func:`check_inputs_outside` that no input file lies where the run will replace files
(:func:`record_inputs` marks a parser's input options for it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..core.errors import InputError
from ..core.options import _number, finite_float, int_range, non_negative_int, positive_int  # noqa: F401 (cli option types)

#: Training steps of every supported scheduler (``configs.SD_SCHEDULER``): more inference
#: steps than this cannot be scheduled.
MAX_STEPS = 1000
#: torch generators take seeds in [0, 2⁶⁴).
MAX_SEED = 2**64 - 1
#: Image sides: at least a few latent pixels, at most what one GPU can hold (SDXL at 4096²
#: already needs tens of GiB). The model's own multiple (64 for SD/SDXL) is checked later.
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE, IMAGE_SIDE_MULTIPLE = 16, 4096, 8
#: ``generate --num-images``: all N images share one batch, 4N denoiser rows per call after
#: injection (2N before, 3N-4N in a FASA pass), and every image's stages, masks and maps are
#: held until the run is written. 64 images are 256 rows per call, about what one 80 GB GPU
#: holds for SD1.5 at 512 px; more only fails later (10000 tiny images took 21 GB of RAM
#: and the out-of-memory killer): make several runs with consecutive --seed values instead.
MAX_NUM_IMAGES = 64


#: T: at least 2 (inversion needs a step to invert), at most the scheduler's training steps.
steps = int_range(2, MAX_STEPS, "a number of steps")
#: A torch generator seed: 0 … 2⁶⁴−1.
seed = int_range(0, MAX_SEED, "a seed (a whole number)")
#: Images of one batch (``generate --num-images``, ``eval --batch-size``): 1 … MAX_NUM_IMAGES.
num_images = int_range(1, MAX_NUM_IMAGES, "a number of images")


def image_size(text: str) -> int:
    """An image side in pixels: a multiple of 8 in [16, 4096] (zero is not "default")."""
    value = _number(text.strip(), int, "a size in pixels")
    if not MIN_IMAGE_SIDE <= value <= MAX_IMAGE_SIDE or value % IMAGE_SIDE_MULTIPLE:
        raise argparse.ArgumentTypeError(
            f"{value} px cannot be generated: give a multiple of {IMAGE_SIDE_MULTIPLE} between "
            f"{MIN_IMAGE_SIDE} and {MAX_IMAGE_SIDE} (omit the option for the model's default)"
        )
    return value


def device(text: str) -> str:
    """A torch device that exists on this machine: cpu, cuda, cuda:N, mps."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; give cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
            )
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError(f"{text}: Apple MPS is not available here; use --device cpu")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: freecure runs on cpu, cuda or mps devices")
    return text


def existing_file(text: str) -> Path:
    """A path that must be an existing file (weights, embeddings)."""
    path = Path(text).expanduser()
    if not path.is_file():
        reason = "is a folder" if path.is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{path} {reason}; give the path of a file")
    return path


def check_output_folder(out: Path, overwrite: bool = False, option: str = "--out", resumable: bool = False) -> None:
    """Refuse an output folder that cannot be written, before any work is done.

    Args:
        out: the folder (created later).
        overwrite: an existing folder that holds an earlier freecure run may be replaced
            (:func:`freecure.outputs.check_earlier_run`); nothing else is ever replaced.
        option: the option's name, for the message.
        resumable: the folder is written in place, file by file (``eval``, ``parse``,
            ``report``, ``analyze``): no "free" check, and it may be the current folder.

    Raises:
        InputError: ``out`` is a file, lies under a file, is not writable; or (unless
            ``resumable``) is the current folder or holds it, or holds files and ``overwrite``
            is not set or they are not an earlier freecure run's.
    """
    out = Path(out)
    if out.is_symlink() and not resumable:  # replaced whole by a rename, which would replace the link
        raise InputError(f"{option} {out} is a symbolic link; give the folder it points to ({out.resolve()})")
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} must be a folder, but {out} is a file; choose another {option}")
    if not resumable:
        check_not_current_folder(out, option)
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise InputError(
                    f"{option} {out} already exists and holds files; choose another {option}, or pass --overwrite "
                    "to replace the earlier freecure run there"
                )
            from ..outputs import check_earlier_run

            check_earlier_run(out, option)
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option} {out} cannot be created: {existing} is a file")
    # the folder itself is replaced by a sibling (atomic writes), so its parent must be writable too
    writable = [existing] if existing != out else [out, out.parent if out.parent.exists() else out]
    for folder in writable:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(
                f"{option} {out} is not writable ({folder} does not allow writing); choose another {option}"
            )


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_current_folder(out: Path, option: str = "--out") -> None:
    """Refuse ``out`` when it is the current folder or holds it: a run that replaces its folder
    whole (by renaming a new one into place) cannot replace the folder it works in.

    Raises:
        InputError: one line suggesting a sub-folder.
    """
    here, folder = _resolved(Path.cwd()), _resolved(out)
    if folder == here or folder in here.parents:
        what = "the current folder" if folder == here else f"a folder that holds the current folder ({here})"
        raise InputError(
            f"{option} {out} is {what}; the run is written to a new folder that replaces {option} whole, so give "
            f"a sub-folder, e.g. {option} {Path(out) / 'run1'}"
        )


#: Metavars of options that name an input file or folder.
INPUT_METAVARS = frozenset({"PATH", "FILE", "DIR", "FOLDER", "IMAGE", "PHOTO"})
#: Options whose value may be a local folder though they name none in their metavar.
INPUT_DESTS = frozenset({"base_model"})


def record_inputs(parser: argparse.ArgumentParser) -> None:
    """Mark which of ``parser``'s options (so far) name input files or folders, for
    :func:`check_inputs_outside`: those of type ``Path`` or :func:`existing_file`, those
    whose metavar is PATH, FILE, DIR, FOLDER, IMAGE or PHOTO, and ``--base-model``; never
    ``--out``. Call it at the end of a command's ``register``."""
    inputs = {}
    for action in parser._actions:
        if action.dest in ("out", "help") or action.default == argparse.SUPPRESS:
            continue
        if action.type in (Path, existing_file) or action.metavar in INPUT_METAVARS or action.dest in INPUT_DESTS:
            inputs[action.dest] = action.option_strings[0] if action.option_strings else action.metavar or action.dest
    parser.set_defaults(input_options=inputs)


def _paths(value) -> list[Path]:
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in _paths(item)]
    return [Path(value)] if isinstance(value, (str, os.PathLike)) and str(value) else []


def check_inputs_outside(
    args: argparse.Namespace,
    folders=(),
    files=(),
    extra=(),
    option: str = "--out",
) -> None:
    """Refuse an input that the run would replace or remove: one that lies inside one of
    ``folders`` (replaced whole) or is one of ``files`` (overwritten). Inputs are the options
    :func:`record_inputs` marked on the command's parser, plus ``extra`` ((what, path) pairs,
    e.g. ``eval``'s identity photos). Paths are compared with symbolic links resolved; an
    input that does not exist (a Hub id) cannot be lost and is not checked.

    Raises:
        InputError: one line naming the input and the folder, and what to do.
    """
    named = [
        (name, path)
        for dest, name in getattr(args, "input_options", {}).items()
        for path in _paths(getattr(args, dest, None))
    ]
    named += [(what, Path(path)) for what, path in extra]
    folders = [(Path(folder), _resolved(folder)) for folder in folders]
    files = {_resolved(path): Path(path) for path in files}
    for what, path in named:
        if not os.path.lexists(path.expanduser()):
            continue
        real = _resolved(path)
        for folder, real_folder in folders:
            if real == real_folder or real_folder in real.parents:
                raise InputError(
                    f"{what} {path} lies inside {folder}, which this run would replace; copy it elsewhere or "
                    f"choose another {option}"
                )
        if real in files:
            raise InputError(
                f"{what} {path} is {files[real]}, a file this run would overwrite; copy it elsewhere or choose "
                f"another {option}"
            )


# --------------------------------------------------------------------------- added for issue 20
# (new types only; appended so that edits above do not collide)


def compile_mode(text: str) -> str:
    """A ``torch.compile`` mode this torch accepts (``freecure.runtime.compile_modes``, read
    from torch itself), checked at parse time instead of after every model loaded."""
    from ..core.runtime import compile_modes

    modes = compile_modes()
    if text not in modes:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch.compile mode; choose one of {', '.join(modes)}")
    return text


#: ``freecure analyze --cell``: the side of one grid cell in pixels. Below 16 px a cell shows
#: no readable map; 512 px (SD1.5's image side) already makes the grid of a 77-token prompt
#: (a row per token, two columns per block group) ≈ 78 × 6 cells ≈ 0.37 GB of RGB, where
#: 60000 px cells asked for 10 GB each.
MIN_CELL, MAX_CELL = 16, 512
cell_size = int_range(MIN_CELL, MAX_CELL, "a cell size in pixels")
_unit = finite_float(0.0, 1.0)


def unit_interval(text: str) -> float:
    """A number in [0, 1] such as eq. 3's α (``-0`` is read as 0)."""
    return _unit(text) + 0.0
