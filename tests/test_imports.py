"""The exporter's modules form no import cycle, so each can be read, tested and imported on its own."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"


def module_name(path: Path) -> str:
    """``exporter/collectors/bloat.py`` -> ``exporter.collectors.bloat``; a package is its ``__init__``."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_level_imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """Exporter modules imported at module level, including under ``if TYPE_CHECKING:`` (not inside functions)."""
    found: set[str] = set()
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                # ``from exporter import catalog`` imports the module exporter.catalog.
                found.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.If | ast.Try):
            pending.extend(node.body)
            pending.extend(node.orelse)
            if isinstance(node, ast.Try):
                for handler in node.handlers:
                    pending.extend(handler.body)
                pending.extend(node.finalbody)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    """Each exporter module mapped to the exporter modules it imports at module level."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {}
    for path in paths:
        name = module_name(path)
        graph[name] = module_level_imports(ast.parse(path.read_text(encoding="utf-8")), modules) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by a depth-first search (empty when the graph is acyclic)."""
    found: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_graph_sees_the_imports_it_must_see() -> None:
    graph = import_graph()
    assert "exporter.catalog" in graph["exporter.snapshot"]  # from exporter.catalog import ...
    assert "exporter.catalog" in graph["exporter.cli"]  # from exporter import catalog
    assert "exporter.hooks" in graph["exporter.catalog"]  # under TYPE_CHECKING
    assert "exporter.db" in graph["exporter.catalog"]  # under TYPE_CHECKING too
    assert "exporter.catalog" not in graph["exporter.config"]  # imported inside functions only: not counted


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The shape the exporter had before RunContext left the engine: catalog -> engine -> catalog.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_exporter_modules() -> None:
    assert cycles(import_graph()) == []
