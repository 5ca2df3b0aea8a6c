"""The library's import graph has no cycle, function-level imports included.

Every `import` and `from ... import` anywhere in a module of daychat/ counts (at the top, inside a function,
under `if TYPE_CHECKING`): a cycle that only closes at run time is still a floor leaning on the rooms above
it. Importing `a.b.c` also runs the package `a.b`'s `__init__`, so that counts as an edge to `a.b` too,
except from a module inside that package (its `__init__` has run, or is running, before the module does).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def library_modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """daychat's modules by dotted name -> (file, is a package's __init__)."""
    modules = {}
    for path in sorted((root / "daychat").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (path, package)
    return modules


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the daychat modules it imports (whatever the import's place in the file)."""
    modules = library_modules(root)
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        here = name.split(".") if package else name.split(".")[:-1]  # the package relative imports start from
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]) if node.level else node.module
                base = base.rstrip(".")
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        deps: set[str] = set()
        for target in targets:
            while target and target not in modules:  # `from m import function` -> m
                target = target.rpartition(".")[0]
            while target:
                if target != name and not name.startswith(target + "."):
                    deps.add(target)
                target = target.rpartition(".")[0] if target != "daychat" else ""
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, colouring the nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_library_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in daychat/: " + " -> ".join(cycle)


def test_the_checker_sees_function_level_imports_and_package_inits(tmp_path):
    # A cycle closed by an import inside a function, and one closed through a package's __init__.
    package = tmp_path / "daychat"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from daychat.high import g\n")
    (package / "high.py").write_text("from daychat import low\n")
    (package / "sub" / "__init__.py").write_text("from daychat.sub.inner import x\nfrom daychat.base import y\n")
    (package / "sub" / "inner.py").write_text("x = 1\n")
    (package / "base.py").write_text("from .sub.inner import x as y\n")
    graph = import_graph(tmp_path)
    assert graph["daychat.low"] == {"daychat.high"} and "daychat.low" in graph["daychat.high"]
    assert graph["daychat.base"] == {"daychat.sub", "daychat.sub.inner"}
    assert graph["daychat.sub.inner"] == set()  # its own package's __init__ is no edge
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    (package / "low.py").write_text("")
    assert find_cycle(import_graph(tmp_path)) == ["daychat.base", "daychat.sub", "daychat.base"]
    (package / "sub" / "__init__.py").write_text("")
    assert find_cycle(import_graph(tmp_path)) is None
