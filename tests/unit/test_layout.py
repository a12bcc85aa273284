"""The shape of the package (see the architecture notes): no import cycles between modules,
the library rooms never import the flows, the service or the CLI, the package root holds only
the public names, the configuration and the errors, and no source file grows past 400 lines.

The import graph comes from the source, not from importing it: every absolute ``tunesmith``
import, inside functions too, is an edge to the module it names; ``from tunesmith.x import y``
is an edge to ``tunesmith.x.y`` where that is a module, else to ``tunesmith.x``. Importing a
submodule also runs its package's ``__init__`` first, but that is no edge: Python has the
package in ``sys.modules`` before the submodule runs, so a package whose ``__init__`` re-exports
its submodules only forms a cycle when a submodule imports a name from that ``__init__``, and
then the explicit edge shows it. Imports under ``if TYPE_CHECKING:`` never run, so they form no
cycle; they still count as a room's dependencies.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "src" / "tunesmith"
LIBRARY = ("tunesmith.data", "tunesmith.models", "tunesmith.training", "tunesmith.evaluation",
           "tunesmith.compress")
APPLICATIONS = ("tunesmith.flows", "tunesmith.service", "tunesmith.cli")
ROOT_ENTRIES = {"__init__.py", "config.py", "errors.py", "py.typed", "resources"}
MAX_LINES = 400


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    runtime: bool  # False under `if TYPE_CHECKING:`

    def __str__(self) -> str:
        return f"{self.source} (line {self.line}) imports {self.target}"


def source_files() -> Iterator[Path]:
    return (p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _within(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every ``tunesmith`` import of one module, as edges to the modules it names."""

    def __init__(self, module: str, is_package: bool, modules: set[str]) -> None:
        self.module, self.modules, self.edges = module, modules, []
        self.package = module if is_package else module.rpartition(".")[0]
        self.runtime = True

    def _add(self, target: str, node: ast.stmt) -> None:
        while target not in self.modules and "." in target:  # `import tunesmith.x.Name`
            target = target.rpartition(".")[0]
        if target in self.modules and target != self.module:
            self.edges.append(Edge(self.module, target, node.lineno, self.runtime))

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            return self.generic_visit(node)
        outer, self.runtime = self.runtime, False
        for child in node.body:
            self.visit(child)
        self.runtime = outer
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _within(alias.name, "tunesmith"):
                self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            anchor = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        if not _within(base, "tunesmith"):
            return
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.modules else base, node)


def import_edges() -> list[Edge]:
    files = {module_name(p): p for p in source_files()}
    edges: list[Edge] = []
    for name, path in files.items():
        visitor = _Imports(name, path.name == "__init__.py", set(files))
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges += visitor.edges
    return edges


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One shortest cycle through each module that is on a cycle, each cycle reported once."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        if e.runtime:
            graph.setdefault(e.source, {}).setdefault(e.target, e)
    cycles, seen = [], set()
    for start in sorted(graph):
        cycle = _shortest_cycle(graph, start)
        key = frozenset((e.source, e.target) for e in cycle)
        if cycle and key not in seen:
            seen.add(key)
            cycles.append(cycle)
    return cycles


def _shortest_cycle(graph: dict[str, dict[str, Edge]], start: str) -> list[Edge]:
    """The shortest path of imports from ``start`` back to itself (breadth first), or []."""
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target, edge in sorted(graph.get(node, {}).items()):
                if target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    return path
                if target not in came_by:
                    came_by[target] = edge
                    following.append(target)
        frontier = following
    return []


def describe(cycle: list[Edge]) -> str:
    names = " -> ".join([cycle[0].source] + [e.target for e in cycle])
    return names + "\n      " + "\n      ".join(str(e) for e in cycle)


def test_no_import_cycles_between_modules() -> None:
    cycles = find_cycles(import_edges())
    assert not cycles, (f"{len(cycles)} import cycle(s); break each, e.g. by moving what both "
                        "modules need into a third:\n  " + "\n  ".join(map(describe, cycles)))


def test_the_library_never_imports_the_flows_service_or_cli() -> None:
    wrong = [e for e in import_edges()
             if any(_within(e.source, room) for room in LIBRARY)
             and any(_within(e.target, app) for app in APPLICATIONS)]
    assert not wrong, ("the library (data, models, training, evaluation, compress) must not "
                       "depend on the flows, the service or the CLI:\n  "
                       + "\n  ".join(map(str, wrong)))


def test_the_package_root_holds_only_the_public_names_config_and_errors() -> None:
    extra = sorted(p.name for p in PACKAGE.iterdir()
                   if p.name not in ROOT_ENTRIES and p.name != "__pycache__"
                   and not (p.is_dir() and (p / "__init__.py").is_file()))
    assert not extra, f"move these into a room (a subpackage): {extra}"


def test_no_source_file_is_over_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE.parent)): n for p in source_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these files (at most {MAX_LINES} lines each): {long}"


def test_the_graph_sees_imports_inside_functions_and_resolves_submodules() -> None:
    # the checks above are only as good as the graph: known edges must be found
    edges = {(e.source, e.target) for e in import_edges()}
    assert ("tunesmith.service.plan", "tunesmith.flows.steps") in edges  # inside a function
    assert ("tunesmith.service.routes", "tunesmith.service.audit") in edges  # `from pkg import mod`
    assert ("tunesmith.flows.run", "tunesmith.config") in edges


def test_a_cycle_is_named_once_with_the_imports_that_make_it() -> None:
    edges = [Edge("a", "b", 3, True), Edge("b", "c", 5, True), Edge("c", "a", 7, True),
             Edge("c", "d", 1, True), Edge("d", "a", 2, runtime=False)]
    cycles = find_cycles(edges)
    assert [describe(c).splitlines() for c in cycles] == [[
        "a -> b -> c -> a", "      a (line 3) imports b", "      b (line 5) imports c",
        "      c (line 7) imports a"]]
