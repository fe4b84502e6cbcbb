"""The import graph of nodepert_dist (every import statement, lazy ones inside functions too):
no import cycle, settings at the bottom (config.py reaches neither train.py nor the experiments
package), presets a leaf module.

The one cycle still allowed is checkpoint.py <-> checkpoint_restore.py: splitting it is another
part of issue 18 (item 3), not this test's; drop it from ALLOWED once that lands.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "nodepert_dist"
ALLOWED = [{"nodepert_dist.checkpoint", "nodepert_dist.checkpoint_restore"}]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}, from the source (nothing is executed)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from pkg import mod` imports the submodule pkg.mod when there is one, else
                # a name defined in pkg
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_the_graph_sees_lazy_imports():
    # the checker can fail: a function-level import is an edge too
    graph = import_graph()
    assert "nodepert_dist.train" in graph["nodepert_dist.experiments.common"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycle():
    assert [c for c in cycles(import_graph()) if c not in ALLOWED] == []


def test_settings_sit_at_the_bottom():
    graph = import_graph()
    below = reachable(graph, "nodepert_dist.config")
    assert "nodepert_dist.train" not in below
    assert not [m for m in below if m.startswith("nodepert_dist.experiments")]
    # the leaf modules import nothing of the package
    assert graph["nodepert_dist.presets"] == set() and graph["nodepert_dist.settings"] == set()


@pytest.mark.parametrize("module", ["nodepert_dist.presets", "nodepert_dist.settings"])
def test_leaf_modules_import_only_the_standard_library(module):
    path = PACKAGE / (module.split(".")[-1] + ".py")
    imported = {a.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "dataclasses"}, imported
