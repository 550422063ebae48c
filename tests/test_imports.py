"""The import graph DESIGN.md promises: `pipeline` -> `stages`, never back, and no circle, counting
every import (at the top, inside functions, under TYPE_CHECKING) and the modules named to
stages.lazy.lazy_module, read from the source with the ast module."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "pipeline")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules that `name` imports, each import resolved to the module it loads
    (`from stages.cache import layout` loads stages.cache.layout) and its packages, which Python
    runs first (a module's own packages aside: they are running already)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_module" and node.args:
            found.add(ast.literal_eval(node.args[0]))
    loaded = set()
    for target in found:
        parts = target.split(".")
        for end in range(1, len(parts) + 1):
            candidate = ".".join(parts[:end])
            if candidate in modules and not (name == candidate or name.startswith(candidate + ".")):
                loaded.add(candidate)
    return loaded


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for following in sorted(graph[node]):
            if state.get(following) == 1:
                return [*path[path.index(following):], following]
            if following not in state and (found := visit(following)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_in_a_circle():
    graph = _graph()
    assert len(graph) > 40 and graph["stages.cache.layout"] >= {"stages.kinds", "stages.config"}  # the graph is read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_library_never_imports_the_application():
    offending = {name: sorted(m for m in imports if m.startswith("pipeline")) for name, imports in _graph().items()
                 if name.startswith("stages")}
    assert not any(offending.values()), {name: found for name, found in offending.items() if found}


def test_the_check_finds_a_circle_and_an_import_inside_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"] and _cycle({"a": {"b"}, "b": set()}) is None
    config = _imported("stages.config", REPO / "stages" / "config.py", _modules())
    assert "stages.kinds" in config  # imported inside CacheTeacherConfig.options
    assert "stages.losses" in _imported("stages.kinds.topk", REPO / "stages" / "kinds" / "topk.py", _modules())  # lazy_module
