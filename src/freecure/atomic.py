"""Writes that land whole or not at all, and a lock for folders one process owns.

Every file and folder freecure writes goes through here:

- :func:`atomic_folder`: build a folder under a temporary sibling name and rename it into
  place (``freecure generate``); replacing an earlier folder swaps it whole, so no file of
  the old run survives next to the new ones.
- :func:`write_files`: write several files of one folder to temporary names first and
  rename them only when all are written (``freecure report``'s tables): a full disk leaves
  all old files or all new ones.
- :func:`write_file` / :func:`write_json`: one file, the same way; JSON is written with
  ``allow_nan=False`` (a bare ``NaN`` is not JSON) and a message naming the bad field.
- :class:`FolderLock`: an exclusive, non-blocking ``flock`` on a lock file, released when
  the process ends however it ends.

Temporary names carry the writer's process id (``.NAME.partial-PID``); a later writer
removes those whose process is gone (:func:`remove_stale`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import FreeCureError, InputError

logger = logging.getLogger(__name__)

_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")

#: A file's content: text, bytes, or a function that writes the file at the path it is given.
Content = str | bytes | Callable[[Path], None]


def temporary_name(path: Path, kind: str = "partial") -> Path:
    """``DIR/.NAME.KIND-PID``: hidden, next to ``path`` (same file system, so renames are atomic)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(folder: Path, name: str | None = None, any_process: bool = False) -> list[Path]:
    """Remove temporaries in ``folder`` left by writers that died (of ``name`` only, if given).

    A stale ``.NAME.old-PID`` whose ``NAME`` is missing is moved back (the writer died between
    its two renames); other stale temporaries are deleted. ``any_process``: also those of
    live processes (only for a caller that holds the folder's lock). Returns what it removed.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _STALE.match(path.name)
        if not match or (name is not None and match["name"] != name):
            continue
        if not any_process and _alive(int(match["pid"])):
            continue
        target = folder / match["name"]
        if match["kind"] == "old" and not target.exists():
            os.rename(path, target)
            logger.warning("restored %s from an interrupted replacement", target)
            continue
        _remove(path)
        removed.append(path)
        logger.info("removed %s, left by an interrupted write", path)
    return removed


def _fsync(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(descriptor)


@contextmanager
def atomic_folder(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder that becomes ``target`` when the block ends without error.

    On an error (a full disk, an exception, Ctrl-C) the staging folder is removed and
    ``target`` is untouched. With ``replace`` an existing ``target`` is swapped out whole:
    none of its files remain.

    Raises:
        InputError: ``target`` exists and ``replace`` is False.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, target.name)
    if target.exists() and not replace:
        raise InputError(f"{target} already exists; choose another folder or allow replacing it (--overwrite)")
    staging = temporary_name(target, "partial")
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
        for path in staging.iterdir():
            _fsync(path)
        if target.exists():
            if target.is_symlink() or not target.is_dir():
                raise InputError(f"{target} is not a folder; refusing to replace it")
            old = temporary_name(target, "old")
            os.rename(target, old)
            os.rename(staging, target)
            _remove(old)
        else:
            os.rename(staging, target)
        _fsync(target.parent)
    except BaseException:
        _remove(staging)
        raise


def write_files(folder: str | os.PathLike, files: Mapping[str, Content]) -> list[Path]:
    """Write every file of ``files`` (name → content) into ``folder``, all or none.

    Each is first written under a temporary name and fsync-ed; only when all are written are
    they renamed over the old ones (renames need no space, so a full disk fails before any
    rename). On an error every temporary is removed and the old files stay as they were.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale(folder)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, content in files.items():
            path = folder / name
            temporary = temporary_name(path)
            staged.append((temporary, path))
            if callable(content):
                content(temporary)
            else:
                temporary.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
            _fsync(temporary)
        for temporary, path in staged:
            os.replace(temporary, path)
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    _fsync(folder)
    return [path for _, path in staged]


def write_file(path: str | os.PathLike, content: Content) -> Path:
    """Write one file atomically (see :func:`write_files`)."""
    path = Path(path)
    return write_files(path.parent, {path.name: content})[0]


def non_finite_fields(data, where: str = "") -> list[str]:
    """Paths (``a.b[2]``) of the NaN and infinite numbers inside ``data``."""
    if isinstance(data, float):
        return [] if math.isfinite(data) else [where or "(top level)"]
    if isinstance(data, Mapping):
        return [p for key, value in data.items() for p in non_finite_fields(value, f"{where}.{key}".lstrip("."))]
    if isinstance(data, (list, tuple)):
        return [p for index, value in enumerate(data) for p in non_finite_fields(value, f"{where}[{index}]")]
    return []


class NonFiniteError(FreeCureError, ValueError):
    """Data to be written holds NaN or infinity, which JSON cannot hold."""


def json_text(data, **kwargs) -> str:
    """``json.dumps`` with ``allow_nan=False`` (and ``indent=2``, ``default=str`` unless given),
    ending in a newline.

    Raises:
        NonFiniteError: ``data`` holds NaN or ±inf; the message names the fields.
    """
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("default", str)
    try:
        return json.dumps(data, allow_nan=False, **kwargs) + "\n"
    except ValueError as error:
        fields = non_finite_fields(data)
        if not fields:
            raise
        raise NonFiniteError(
            f"not writing NaN or infinity as JSON (in {', '.join(fields[:5])}); the run produced non-finite "
            "numbers: check the guidance scale and the other numeric settings"
        ) from error


def write_json(path: str | os.PathLike, data, **kwargs) -> Path:
    """Write ``data`` as strict JSON (see :func:`json_text`), atomically."""
    return write_file(path, json_text(data, **kwargs))


class FolderLock:
    """An exclusive lock on ``path`` (a lock file, created), held until :meth:`release` or exit.

    ``flock`` locks belong to the open file, so they vanish when the process dies: a killed
    run never leaves a lock behind. Where ``fcntl`` does not exist (Windows) it does nothing.

    Raises:
        InputError: (on :meth:`acquire`) another process holds the lock; ``message`` says what
            to do.
    """

    def __init__(self, path: str | os.PathLike, message: str = ""):
        self.path = Path(path)
        self.message = message
        self._file = None

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip()
            file.close()
            held = f" (held by process {holder})" if holder else ""
            raise InputError(
                (self.message or f"{self.path.parent} is in use by another freecure process") + held
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
