"""The backend registry: the one place a backend's name is bound to its class.

A backend registers itself with one line in ``freecure/backends/__init__.py`` (or, outside the
package, by calling :func:`register`); the command line, the demo, ``freecure cost``, ``embed``
and the attention studies find it here and read everything else from the class
(docs/adding-a-backend.md).
"""

from __future__ import annotations

from ..core.errors import InputError
from .base import Backend

#: Backends by the name the CLI takes.
BACKENDS: dict[str, type[Backend]] = {}
#: The backend a command uses when ``--backend`` is not given: the checkpoint-free one.
DEFAULT_BACKEND = "token-fusion"


def register(cls: type[Backend]) -> type[Backend]:
    """Register a backend class under its ``name`` (usable as a class decorator).

    Raises:
        ValueError: the name is taken by another class.
    """
    if not cls.name or cls.name == Backend.name:
        raise ValueError(f"{cls.__name__} has no name of its own")
    taken = BACKENDS.get(cls.name)
    if taken is not None and taken is not cls:
        raise ValueError(f"backend name {cls.name!r} is taken by {taken.__name__}")
    BACKENDS[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a backend (tests that register their own)."""
    BACKENDS.pop(name, None)


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name``.

    Raises:
        InputError: no such backend, naming the registered ones.
    """
    try:
        return BACKENDS[name]
    except KeyError:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}") from None
