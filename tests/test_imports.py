"""Every name the package imports exists, lazy imports inside functions included, and the
whole package imports only downwards through its layers, without cycles (issue 9: an exception
class renamed between safetensors versions broke the token-fusion path without any test noticing)."""

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


#: The package's layers, lowest first: a module may import its own layer and those below it,
#: never one above (docs/architecture.md). The root ``freecure/__init__.py`` is layer 0.
LAYERS = (
    ("core",),
    ("parsing",),
    ("attention",),
    ("families",),
    ("backends",),
    ("stages",),
    ("pipeline",),
    ("build", "cost", "outputs", "analysis", "evaluation"),
    ("cli", "demo", "__main__"),
)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS and to docs/architecture.md")


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports, imports inside functions included."""
    modules = {module_name(p): p for p in FILES}
    graph = {}
    for name, path in modules.items():
        targets = {f"{m}.{n}" if f"{m}.{n}" in modules else m for m, n, _ in imports(path)}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = import_graph()
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_the_demo_does_not_import_the_cli():
    """The demo and the CLI are both built from the backend registry; neither goes through the other
    (``freecure demo`` itself, in cli/, may start the demo)."""
    graph = import_graph()
    found = [f"{m} imports {t}" for m, ts in sorted(graph.items()) if m.startswith("freecure.demo") for t in sorted(ts)]
    assert [line for line in found if ".cli" in line.split(" imports ")[1]] == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    """Over every module, imports inside functions included (they hid two cycles before 0.2)."""
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
