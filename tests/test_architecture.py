"""The house: no import circles, the server side never reaches ``clients/``, a small root.

The import graph is read from the code with :mod:`ast`: every ``import`` / ``from ... import``
in a file counts, at module level and inside functions, except under ``if TYPE_CHECKING:``
(never run). An edge goes to the module named; ``from pkg import name`` goes to ``pkg.name``
when that is a module, else to ``pkg`` (whose ``__init__`` runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedrac", "strategies", "clients")
# The server side: the run on the server and the strategies it drives.
SERVER_SIDE = ("fedrac.server", "strategies")
MAX_LOOSE = 10


def modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the three packages."""
    out = {}
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The in-repo modules ``name`` imports (see the module docstring for what counts)."""
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    edges = set()
    for target in found:
        parts = target.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        if parts and ".".join(parts) != name:
            edges.add(".".join(parts))
    return edges


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over fedrac/, strategies/ and clients/."""
    known = modules(root)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def reachable(graph: dict[str, set[str]], starts: list[str]) -> set[str]:
    """Every module the ``starts`` import, directly or not (the starts included)."""
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def test_the_graph_reader_sees_a_circle(tmp_path):
    for top in PACKAGES:
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    (tmp_path / "fedrac" / "a.py").write_text("def f():\n    from fedrac.b import g\n")
    (tmp_path / "fedrac" / "b.py").write_text("from fedrac import a\n")
    (tmp_path / "fedrac" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fedrac import a\n")
    graph = import_graph(tmp_path)
    assert graph["fedrac.a"] == {"fedrac.b"} and graph["fedrac.c"] == set()
    assert circles(graph) == [["fedrac.a", "fedrac.b"]]


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_server_side_never_imports_clients():
    graph = import_graph()
    server = [m for m in graph if any(m == s or m.startswith(s + ".") for s in SERVER_SIDE)]
    assert "fedrac.server.app" in server and "strategies.rac_lora" in server
    reached = sorted(m for m in reachable(graph, server) if m.split(".")[0] == "clients")
    assert not reached, f"the server side reaches clients/: {reached}"


def test_at_most_ten_modules_loose_at_the_root():
    loose = sorted(p.name for p in (ROOT / "fedrac").glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= MAX_LOOSE, f"{len(loose)} modules loose in fedrac/: {loose}"
