"""The package's shape (docs/api.md, "Layout"): one subpackage per layer with the same four
stage modules, imports that only go down the layers, and no import circles.

Read from the source with :mod:`ast` (function-level imports included), so it runs without
CuPy or Numba.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "unisparse_ref"
LAYERS = ("reference", "numba_backend", "cupy_backend")
STAGES = ("pooling", "scores", "selection", "attention")
#: Modules below the layers: what a layer may import from the package.
BOTTOM = {"config", "geometry", "blockmask", "masks", "_arrays", "_convert", "errors", "tolerance", "pagetable"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every ``unisparse_ref`` module ``path`` imports, at any depth of the file.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else
    ``pkg`` itself (Python also runs ``pkg/__init__`` first, but that direction, from a
    submodule to a package above it that is already being imported, is not a layering edge).
    """
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "unisparse_ref":
                continue
            for alias in node.names:  # "from . import reference" names a module
                sub = f"{mod}.{alias.name}"
                found.add(sub if sub in modules else mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "unisparse_ref")
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        graph[mod] = {m for m in _imports(path, set(files)) if m in files and m != mod}
    return graph


def test_every_layer_has_the_four_stage_modules():
    for layer in LAYERS:
        for stage in STAGES:
            assert (PKG / layer / f"{stage}.py").is_file(), f"{layer}/{stage}.py is missing"


def test_no_import_circles():
    graph = _graph()
    # A module's own package __init__ importing its submodules is the normal direction; a
    # submodule importing its package's __init__ back would be a circle and is caught here.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downward(layer):
    graph = _graph()
    for mod, deps in graph.items():
        if not (mod == f"unisparse_ref.{layer}" or mod.startswith(f"unisparse_ref.{layer}.")):
            continue
        for dep in deps:
            if dep.startswith(f"unisparse_ref.{layer}"):
                continue
            top = dep.split(".")[1] if "." in dep else dep
            assert top in BOTTOM, f"{mod} imports {dep}: a layer imports only {sorted(BOTTOM)} and itself"


@pytest.mark.parametrize("layer", ["numba_backend", "cupy_backend"])
def test_gpu_layers_use_no_importlib(layer):
    for path in (PKG / layer).rglob("*.py"):
        assert "importlib.import_module" not in path.read_text(encoding="utf-8"), path
