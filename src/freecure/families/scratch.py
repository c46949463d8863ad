"""Scratch folders of tiny random models: ``freecure-tiny-PID-XXXXXXXX`` in the temp directory,
removed once the models are loaded, on SIGTERM, or at the next start when their process is gone.
Used by :mod:`freecure.families.tiny` and :mod:`freecure.families.tiny_flux2` (moved out of the
former so that the two import it without importing each other)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

#: ``freecure-tiny-PID-XXXXXXXX``: the scratch folders of tiny models, named after the process that
#: owns them (``tempfile``'s 8 random characters follow), so that a later start can tell a
#: leftover of a killed run from a folder still in use.
TINY_SCRATCH_PREFIX = "freecure-tiny-"
_TINY_SCRATCH = re.compile(r"^freecure-tiny-(?P<pid>[1-9][0-9]{0,9})-[a-z0-9_]{8}$")


def remove_stale_tiny_folders(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the ``freecure-tiny-PID-XXXXXXXX`` folders in ``root`` (the temp directory) whose
    owner process is gone: an out-of-memory kill (or any end that runs no handler) during
    ``--tiny`` start-up leaves ≈ 30 MB behind. Only folders of exactly that name, owned by this
    user and not symbolic links, are ever touched, and never one whose process still runs.

    Returns:
        The folders removed.
    """
    # freecure.atomic's private liveness test (that module has its own owner): imported, not copied
    from ..core.atomic import _alive

    root = Path(root if root is not None else tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    removed = []
    for path in entries:
        match = _TINY_SCRATCH.match(path.name)
        if not match or int(match["pid"]) >= 2**31 or _alive(int(match["pid"])):
            continue
        try:
            info = path.lstat()
        except OSError:
            continue
        own_uid = os.getuid() if hasattr(os, "getuid") else info.st_uid
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != own_uid:
            continue  # no links, no files, no other user's folders
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextmanager
def _removed_on_sigterm(path: str):
    """While the block runs, a SIGTERM (``kill``, ``timeout``) first removes ``path``, then ends
    the process as the signal would have. Only where nothing else handles SIGTERM and only in
    the main thread (the only one that may set handlers); the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        shutil.rmtree(path, ignore_errors=True)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _save_and_reload(pipeline, pipeline_cls, directory: str | os.PathLike | None):
    """Save and reload through diffusers' own files. Without ``directory`` the files live in a
    temporary directory ``freecure-tiny-PID-*`` that is removed once loaded (every ``--tiny`` run
    used to leave ≈ 30 MB), or when a SIGTERM ends the process meanwhile; those that processes
    killed otherwise left behind are removed first."""
    if directory is not None:
        pipeline.save_pretrained(directory)
        return pipeline_cls.from_pretrained(directory)
    with tiny_scratch() as scratch:
        return _save_and_reload(pipeline, pipeline_cls, scratch)


@contextmanager
def tiny_scratch() -> Iterator[str]:
    """A temporary folder ``freecure-tiny-PID-XXXXXXXX`` for tiny random models saved to be
    reloaded (the pipelines here, ``eval``'s tiny CLIP): removed when the block ends or a
    SIGTERM ends the process meanwhile; the folders of killed processes are removed first."""
    for path in remove_stale_tiny_folders():
        logger.info("removed %s, left by a tiny start-up that was killed", path)
    with tempfile.TemporaryDirectory(prefix=f"{TINY_SCRATCH_PREFIX}{os.getpid()}-") as scratch:
        with _removed_on_sigterm(scratch):
            yield scratch
