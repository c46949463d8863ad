"""Writes that land whole or not at all, and a lock for folders one process owns.

Every file and folder freecure writes goes through here:

- :func:`atomic_folder`: build a folder under a temporary sibling name and rename it into
  place (``freecure generate``); replacing an earlier folder swaps it whole, so no file of
  the old run survives next to the new ones. A folder that holds files is replaced only when
  the caller allows it, checked again at the final rename.
- :func:`write_files`: write several files of one folder to temporary names first and
  rename them only when all are written (``freecure report``'s tables): a full disk leaves
  all old files or all new ones.
- :func:`write_file` / :func:`write_json`: one file, the same way; JSON is written with
  ``allow_nan=False`` (a bare ``NaN`` is not JSON) and a message naming the bad field.
- :class:`FolderLock`: an exclusive ``flock`` on a lock file or a folder, released when the
  process ends however it ends.

Temporary names carry the writer's process id (``.NAME.partial-PID``); a later writer
removes those whose process is gone (:func:`remove_stale`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import time
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


def _holds_cwd(folder: Path) -> bool:
    """Whether ``folder`` is the current folder or one that holds it."""
    try:
        here, folder = Path.cwd().resolve(), folder.resolve()
    except OSError:  # the current folder was removed
        return False
    return folder == here or folder in here.parents


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


@contextmanager
def atomic_folder(
    target: str | os.PathLike, replace: bool = False, check: Callable[[Path], None] | None = None
) -> Iterator[Path]:
    """Yield an empty staging folder that becomes ``target`` when the block ends without error.

    On an error (a full disk, an exception, Ctrl-C) the staging folder is removed and
    ``target`` is untouched. A missing or empty ``target`` is always written. A ``target`` that
    holds files is swapped out whole (none of its files remain) only with ``replace``, and only
    if ``check`` (given the folder) does not raise: ``freecure.outputs.check_earlier_run`` lets
    only an earlier freecure run be replaced.

    Both are checked twice: before the work starts and again at the swap, under a lock on
    ``target``'s parent folder (:class:`FolderLock`), so that of two writers of one ``target``
    the second to finish finds the first's files: without ``replace`` it fails and they stay.
    Without ``replace`` the final rename cannot replace a folder that holds files either
    (``rename(2)`` refuses it), so a folder filled meanwhile by any other program is kept.

    Raises:
        InputError: ``target`` is the current folder (or holds it), is not a folder, or holds
            files and ``replace`` is False or ``check`` refuses it, at the start or at the swap.
    """
    shown, target = Path(target), Path(os.path.abspath(target))  # the user's spelling, for messages
    if _holds_cwd(target):
        raise InputError(
            f"{shown} is the current folder or holds it, and would be replaced whole; write to a sub-folder instead"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, target.name)

    taken = f"{shown} already exists and holds files; choose another folder or pass --overwrite"
    filled = (
        f"{shown} was filled by another process (another run?) while this run worked, and is kept; this run's "
        "files were not saved: run again with another --out, or with --overwrite to replace that run"
    )

    def may_write(finished: bool) -> None:
        if not target.exists() and not target.is_symlink():
            return
        if target.is_symlink() or not target.is_dir():
            raise InputError(f"{shown} is not a folder; refusing to replace it")
        if not _entries(target):
            return  # an empty folder: nothing to lose
        if not replace:
            raise InputError(filled if finished else taken)
        if check is not None:
            check(shown)

    may_write(finished=False)
    staging = temporary_name(target, "partial")
    _remove(staging)
    staging.mkdir()
    old = None
    try:
        yield staging
        for path in staging.iterdir():
            _fsync(path)
        with FolderLock(target.parent, wait=LOCK_WAIT_SECONDS):  # writers of one parent take turns
            may_write(finished=True)
            if target.exists():
                old = temporary_name(target, "old")
                os.rename(target, old)
                try:
                    os.rename(staging, target)
                except BaseException:
                    os.rename(old, target)
                    old = None
                    raise
            else:
                try:
                    os.rename(staging, target)  # never replaces a folder that holds files
                except OSError as error:
                    if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    raise InputError(filled) from None
        _fsync(target.parent)
    except BaseException:
        _remove(staging)
        raise
    if old is not None:
        _remove(old)


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


#: How long a writer waits for another one's final renames in the same parent folder (they
#: take milliseconds; only a stuck file system makes this run out).
LOCK_WAIT_SECONDS = 60.0


class FolderLock:
    """An exclusive lock on ``path``, held until :meth:`release` or exit.

    ``path`` is a lock file (created; it holds the holder's process id) or an existing folder
    (locked itself: nothing is written into it). ``flock`` locks belong to the open file, so
    they vanish when the process dies: a killed run never leaves a lock behind. Where
    ``fcntl`` does not exist (Windows), or a folder's file system cannot lock it, it does
    nothing. ``wait``: seconds to wait for the holder to release it (0: fail at once).

    Raises:
        InputError: (on :meth:`acquire`) another process holds the lock; ``message`` says what
            to do.
    """

    def __init__(self, path: str | os.PathLike, message: str = "", wait: float = 0.0):
        self.path = Path(path)
        self.message = message
        self.wait = wait
        self._descriptor = None

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        folder = self.path.is_dir()
        if folder:
            try:
                descriptor = os.open(self.path, os.O_RDONLY)
            except OSError as error:  # a folder one may write but not list: go on unlocked
                logger.debug("cannot open %s to lock it (%s); going on without the lock", self.path, error)
                return self
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                held = error.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)
                if folder and not held:  # a file system that cannot lock folders: go on unlocked
                    logger.debug("cannot lock %s (%s); going on without the lock", self.path, error)
                    os.close(descriptor)
                    return self
                if held and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = "" if folder else os.pread(descriptor, 64, 0).decode("ascii", "replace").strip()
                os.close(descriptor)
                by = f" (held by process {holder})" if holder else ""
                where = self.path if folder else self.path.parent
                raise InputError((self.message or f"{where} is in use by another freecure process") + by) from None
        if not folder:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing drops the flock
            self._descriptor = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
