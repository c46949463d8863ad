"""Every name the package imports exists, lazy imports inside functions included, and the
backends import each other without cycles (issue 9: an exception class renamed between
safetensors versions broke the token-fusion path without any test noticing)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import freecure

SRC = Path(freecure.__file__).resolve().parent  # the package under test, wherever it is installed
#: Optional packages that a CPU test environment may lack; their imports are checked when present.
OPTIONAL = {"insightface", "onnxruntime", "open_clip", "facenet_pytorch", "dlib", "lpips", "skimage", "facexlib"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(absolute module, imported name or None, line) of every import statement in a file."""
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(base, alias.name, node.lineno) for alias in node.names if alias.name != "*"]
    return found


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_every_imported_name_exists(path):
    missing = []
    for module, name, line in imports(path):
        if module.split(".")[0] in OPTIONAL or module == "__future__":
            continue
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name and error.name.split(".")[0] in OPTIONAL:
                continue
            missing.append(f"line {line}: module {module} ({error})")
            continue
        if name is not None and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"line {line}: {module} has no {name}")
    assert not missing, f"{path.relative_to(SRC)}: " + "; ".join(missing)


def test_backends_import_without_cycles():
    """photomaker ↔ photomaker_v2 used to import each other; shared pieces live in photomaker_id."""
    backends = {module_name(p): p for p in (SRC / "backends").glob("*.py")}
    graph = {}
    for name, path in backends.items():
        targets = {f"{m}.{n}" if f"{m}.{n}" in backends else m for m, n, _ in imports(path)}
        graph[name] = targets & set(backends)

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    cycles = sorted(name for name in graph if not name.endswith("__init__") and reaches(name, name))
    cycles = [name for name in cycles if name != "freecure.backends"]
    assert cycles == []
