"""The package's shape: no import cycle in nodepert_dist (imports at module level and inside
functions both count: a lazy import that closes a circle is still a circle), settings at the
bottom (config.py reaches neither train.py nor the experiments; presets and settings are leaves
of the standard library), and no module of nodepert_dist, launch or benchmarks over 400 lines
(split by concern instead)."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "nodepert_dist"
MAX_LINES = 400


def _modules() -> dict:
    """Module name -> source path, for every module of the package."""
    out = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set:
    """The package modules `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` folders up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b`: the submodule a.b if there is one, else a itself
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _path_through(graph: dict, component: list) -> str:
    """The shortest circle through the component's first module, as `a -> b -> a` (what to cut)."""
    start, members = component[0], set(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & members):
            if w == start:
                return " -> ".join(path + [start])
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no circle through {start}")


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = {name: {t for t in _imports(name, path, modules)} for name, path in modules.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles (cut each; lazy imports count): " + "; ".join(
        f"{{{', '.join(c)}}}: {_path_through(graph, c)}" for c in cycles
    )


def test_the_cycle_finder_sees_a_cycle():
    """The test above can fail: a lazy import closing a circle is found, and named."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _path_through(graph, ["a", "b", "c"]) == "a -> b -> c -> a"
    lazy = "def f():\n    from nodepert_dist import train\n"
    tree = ast.parse(lazy)
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))  # ast.walk sees inside f


def test_no_module_over_400_lines():
    too_long = []
    for folder in (PACKAGE, "launch", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                too_long.append(f"{rel} ({lines})")
    assert not too_long, f"modules over {MAX_LINES} lines (split by concern): " + ", ".join(
        too_long
    )


def _reachable(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_settings_sit_at_the_bottom():
    graph = _graph()
    assert "nodepert_dist.train" in graph["nodepert_dist.experiments.common"]  # edges are seen
    below = _reachable(graph, "nodepert_dist.config")
    assert "nodepert_dist.train" not in below
    assert not [m for m in below if m.startswith("nodepert_dist.experiments")]
    assert graph["nodepert_dist.presets"] == set() and graph["nodepert_dist.settings"] == set()


@pytest.mark.parametrize("module", ["presets", "settings"])
def test_leaf_modules_import_only_the_standard_library(module):
    tree = ast.parse((REPO / PACKAGE / f"{module}.py").read_text())
    imported = {
        a.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for a in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= {"__future__", "dataclasses"}, imported
