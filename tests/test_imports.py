"""maild's import graph has no cycle, and reading the configuration loads no component.

The graph is built from the source with ast: module-level and function-level imports
alike (a function-level import is a cycle deferred, not removed), and
importlib.import_module calls with a literal name. Imports under `if TYPE_CHECKING:`
never run and are left out. A cycle makes what a module sees depend on who imported
first; a component imported by the config reader makes every tool that reads
policies.toml load the whole daemon.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "maild"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__)."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _under_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.AST]:
    """Import statements and import_module calls, anywhere but under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _under_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom | ast.Call):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.AST, name: str, is_package: bool, modules: dict[str, Path]) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            here = name.split(".") if is_package else name.split(".")[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join([*here, base] if base else here)
        yield base
        yield from (f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
    elif isinstance(node, ast.Call):
        f = node.func
        called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if (
            called == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports, with the packages whose __init__ that
    runs (but not the importer's own parents: they are always loaded before it)."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        for node in _imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, name, is_package, modules):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in modules and dep not in own_parents:
                        graph[name].add(dep)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components with more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc: set[str] = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    scc.add(m)
                    if m == node:
                        break
                if len(scc) > 1 or node in graph[node]:
                    found.append(scc)
    return found


def test_the_import_graph_of_maild_has_no_cycle() -> None:
    cycles = strongly_connected(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(
        " <-> ".join(sorted(c)) for c in sorted(cycles, key=len, reverse=True)
    )


def test_the_graph_sees_function_level_and_dynamic_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("import importlib\nimportlib.import_module('pkg.c')\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from pkg import b\nfrom . import a\n"
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert strongly_connected(graph) == [{"pkg.a", "pkg.b", "pkg.c"}]


def loaded_by(code: str) -> list[str]:
    """The maild modules a fresh interpreter has loaded after running code."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code + "\nimport sys\nprint('\\n'.join(sorted(m for m in sys.modules "
            "if m == 'maild' or m.startswith('maild.'))))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_reading_the_config_loads_no_component() -> None:
    assert loaded_by("import maild.config") == ["maild", "maild.config"]
    assert loaded_by("from maild.config import parse\nparse({})") == ["maild", "maild.config"]
