"""Import paths that moved in 0.2 (the layered package) keep working for one release.

``import freecure.fasa`` and ``from freecure.sampling import same_pass`` still work: the old
module is built on first import from the modules its names moved to, with a ``FutureWarning``
naming the new path. A package that kept its old name (``freecure.backends.photomaker``, now a
subpackage) forwards the names it no longer defines with :func:`moved_names`. Both go away in
0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Sequence

REMOVAL = "0.3"

#: Old module → the modules its public names live in now (the first is the main one).
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "freecure.errors": ("freecure.core.errors",),
    "freecure.terminal": ("freecure.core.terminal",),
    "freecure.configs": ("freecure.core.configs",),
    "freecure.checkpoints": ("freecure.core.checkpoints",),
    "freecure.images": ("freecure.core.images",),
    "freecure.runtime": ("freecure.core.runtime",),
    "freecure.tokenization": ("freecure.core.tokenization",),
    "freecure.atomic": ("freecure.core.atomic",),
    "freecure.attributes": ("freecure.core.attributes",),
    "freecure.parsing.labels": ("freecure.core.labels",),
    "freecure.projections": ("freecure.attention.projections",),
    "freecure.fasa": ("freecure.stages.fasa", "freecure.attention.fasa", "freecure.backends.base"),
    "freecure.sampling": ("freecure.stages.sampling", "freecure.stages.rofa", "freecure.core.guidance"),
    "freecure.masks": ("freecure.stages.masks",),
    "freecure.inversion": ("freecure.stages.expression",),
    "freecure.tiny": ("freecure.families.tiny",),
    "freecure.tiny_adapters": ("freecure.backends.ip_adapter.faceid", "freecure.backends.ip_adapter.instantid"),
    "freecure.backends.modules": ("freecure.backends.common.layers",),
    "freecure.backends.identity_files": ("freecure.backends.common.identity_files",),
    "freecure.backends.face_embedding": ("freecure.backends.common.face_embedding",),
    "freecure.backends.photomaker_id": ("freecure.backends.photomaker.id_encoder", "freecure.backends.common.layers"),
    "freecure.backends.photomaker_v2": (
        "freecure.backends.photomaker.v2",
        "freecure.backends.common.layers",
        "freecure.backends.photomaker.id_encoder",
    ),
    "freecure.backends.ip_adapter_faceid": ("freecure.backends.ip_adapter.faceid",),
    "freecure.backends.instantid": ("freecure.backends.ip_adapter.instantid",),
    "freecure.backends.pulid_flux": ("freecure.backends.pulid.flux",),
    "freecure.backends.pulid_embedding": ("freecure.backends.pulid.embedding",),
    "freecure.backends.pulid_encoder": ("freecure.backends.pulid.encoder",),
    "freecure.backends.pulid_idformer": ("freecure.backends.pulid.idformer",),
}


def _warn(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{old} moved to {new}; the old path stops working in freecure {REMOVAL}",
        FutureWarning,
        stacklevel=stacklevel,
    )


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Builds a moved module's old path from its new modules (a snapshot of their names)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # a plain module object

    def exec_module(self, module) -> None:
        targets = MOVED_MODULES[module.__name__]
        _warn(module.__name__, targets[0], stacklevel=8)
        for target in reversed(targets):  # the main module's names win
            names = vars(importlib.import_module(target))
            module.__dict__.update({k: v for k, v in names.items() if not k.startswith("__")})


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def moved_names(package: str, modules: Sequence[str]):
    """A module ``__getattr__`` for ``package`` that finds a name it no longer defines in
    ``modules`` (imported on first use), with a ``FutureWarning``."""

    def __getattr__(name: str):
        if not name.startswith("__"):
            for target in modules:
                module = importlib.import_module(target)
                if hasattr(module, name):
                    _warn(f"{package}.{name}", f"{target}.{name}")
                    return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
