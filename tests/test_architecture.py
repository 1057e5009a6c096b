"""The architecture, checked: one namespace (`cellar.*`, whatever directory Python starts in), and layers
without import cycles (the import-linter contracts in pyproject.toml, run here).

import-linter finds a package's modules by walking its folder, and `cellar.measure` lives in `measure/`, not
in `cellar/measure/` (pyproject.toml's `package-dir`). So the graph it checks is built here from that same
mapping: every module of every folder, and every import in it, those inside functions included (`ast`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest
from importlinter import configuration
from importlinter.application import use_cases
from importlinter.application.app_config import settings
from importlinter.application.ports.building import GraphBuilder

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("measure", "query", "schemas", "ngff", "viewer")


def _package_dirs() -> dict[str, Path]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    found = {}
    for package, folder in _package_dirs().items():
        assert not [p for p in folder.glob("*/__init__.py")], f"{folder}: a nested package the mapping misses"
        for path in folder.glob("*.py"):
            init = path.stem == "__init__"
            found[package if init else f"{package}.{path.stem}"] = (path, init)
    return found


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST, skip_type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if skip_type_checking and _type_checking(node):
            yield from (n for child in node.orelse for n in _imports(ast.Module([child], []), skip_type_checking))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node, skip_type_checking)


def _targets(name: str, init: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> Iterator[str]:
    """The project modules an import statement imports (a name imported from a package that is a module of
    it counts as that module)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = name if init else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    module = ".".join(p for p in (base if node.level else "", node.module or "") if p)
    for alias in node.names:
        yield f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module


class MappedGraphBuilder(GraphBuilder):
    """import-linter's graph of the `cellar` package as pyproject.toml maps its folders."""

    def build(self, root_package_names, cache_dir, include_external_packages=False,
              exclude_type_checking_imports=False) -> grimp.ImportGraph:
        assert root_package_names == ["cellar"]
        modules = _modules()
        graph = grimp.ImportGraph()
        for name in modules:
            graph.add_module(name)
        for name, (path, init) in modules.items():
            text = path.read_text()
            for node in _imports(ast.parse(text, str(path)), exclude_type_checking_imports):
                for target in _targets(name, init, node, set(modules)):
                    if target not in modules:  # another distribution's: as grimp does, its top-level name
                        if not include_external_packages or target.startswith(".") or target == "cellar":
                            continue
                        target = target.split(".")[0]
                        if target not in graph.modules:
                            graph.add_module(target, is_squashed=True)
                    if target != name:
                        graph.add_import(importer=name, imported=target, line_number=node.lineno,
                                         line_contents=ast.get_source_segment(text, node) or "")
        return graph


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return MappedGraphBuilder().build(["cellar"], None, include_external_packages=True,
                                      exclude_type_checking_imports=True)


def test_the_graph_holds_every_module_and_import(graph):
    """The builder's graph against facts of the tree: a module of each folder, a relative import across
    packages, one inside a function, a name imported from a package that is a module of it, and another
    distribution's module under its top-level name."""
    assert {"cellar.cli", "cellar.measure.run", "cellar.query.store", "cellar.schemas.log", "cellar.ngff.write",
            "cellar.viewer.server"} <= set(graph.modules)
    assert graph.direct_import_exists(importer="cellar.query.store", imported="cellar.schemas.log")
    assert graph.direct_import_exists(importer="cellar.cli", imported="cellar.viewer.server")  # in a function
    assert graph.direct_import_exists(importer="cellar.measure.run", imported="cellar.measure.store_write")
    assert graph.direct_import_exists(importer="cellar.query.pathviewer", imported="matplotlib")  # in a function


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_among_the_modules(graph):
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_one():
    graph = grimp.ImportGraph()
    for a, b in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")]:
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_the_layer_contracts_hold(capsys):
    """import-linter's own contract checks (pyproject.toml, [tool.importlinter]) on the mapped graph."""
    configuration.configure()
    settings.configure(GRAPH_BUILDER=MappedGraphBuilder())
    passed = use_cases.lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    out = capsys.readouterr().out
    assert passed is use_cases.SUCCESS and "BROKEN" not in out and "3 kept, 0 broken" in out, out


def test_cellar_imports_from_anywhere_and_its_parts_only_under_it(tmp_path):
    """After installation, from a directory that is not the repository: `cellar.query` and the rest import,
    `query` and the other folders' names do not."""
    ok = subprocess.run([sys.executable, "-c", "import cellar.query, cellar.measure, cellar.schemas, cellar.ngff, "
                         "cellar.viewer, cellar.cli"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    for part in PARTS:
        r = subprocess.run([sys.executable, "-c", f"import {part}"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 1 and f"No module named '{part}'" in r.stderr, (part, r.stderr)


def test_no_part_is_imported_twice_under_a_bare_name():
    """The suite imports every module as `cellar.*` (pytest's importlib mode keeps the repository root off
    the path): a bare `query` or `measure` in sys.modules would be a second copy of a module."""
    for name in _modules():
        if not name.endswith(".__main__"):  # runs its command
            __import__(name)
    assert not [m for m in sys.modules if m.split(".")[0] in PARTS]
