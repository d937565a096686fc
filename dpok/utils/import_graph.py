"""The import graph of a package, read with ``ast`` (nothing is imported), and its cycles.

Used by the architecture test and ``benchmarks/architecture.py``. Every ``import`` statement
counts, at module level or inside a function (a function-local import is where a cycle hides);
only those under ``if TYPE_CHECKING:`` are left out, because they never run.

Edges: ``from pkg.mod import name`` and ``import pkg.mod`` go to ``pkg.mod``; ``from pkg import
mod`` goes to ``pkg.mod`` when that module exists, else to the package ``pkg`` itself. Importing
``pkg.mod`` from outside ``pkg`` also runs ``pkg/__init__.py`` first: an edge to ``pkg`` too. From
inside ``pkg`` that package is already being imported, so no such edge (a package's ``__init__``
re-exporting its own submodules would otherwise make every package a cycle).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path


def module_name(path: str) -> str:
    """``dpok/core/kl.py`` -> ``dpok.core.kl``; ``dpok/core/__init__.py`` -> ``dpok.core``."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_tree(root: str | Path, package: str = "dpok") -> dict[str, str]:
    """``{module name: source}`` of every ``.py`` file under ``root/package``."""
    root = Path(root)
    return {module_name(str(p.relative_to(root))): p.read_text()
            for p in sorted((root / package).rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks (they never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imported_modules(name: str, source: str, is_package: bool, known: Iterable[str]) -> dict[str, int]:
    """The modules of ``known`` that module ``name`` imports -> the line of the first such import."""
    known = set(known)
    tree = ast.parse(source)
    skipped = _type_checking_nodes(tree)
    # the package a relative import starts from: the module's own for a package's __init__
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target not in known or target == name:
            return
        found.setdefault(target, line)
        # the packages around the target that the importer is not inside run their __init__ first
        parts = target.split(".")
        for depth in range(1, len(parts)):
            package = ".".join(parts[:depth])
            if package in known and package != name and not name.startswith(package + "."):
                found.setdefault(package, line)

    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                origin = ".".join(anchor + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                add(sub if sub in known else origin, node.lineno)
    return found


def import_graph(sources: Mapping[str, str], packages: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` over ``sources`` (``{module name: source}``).

    ``packages``: the names that are packages (``__init__.py``); by default every name that is a
    prefix of another name.
    """
    names = set(sources)
    if packages is None:
        packages = {n for n in names if any(o.startswith(n + ".") for o in names)}
    packages = set(packages)
    return {n: imported_modules(n, src, n in packages, names) for n, src in sources.items()}


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself),
    each sorted, the list sorted: every cycle of the graph lies inside one of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        # iterative Tarjan: the graph of a large package would pass Python's recursion limit
        nonlocal counter
        work = [(start, iter(graph.get(start, ())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, ()))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def reachable(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or not (``start`` included)."""
    seen, todo = {start}, [start]
    while todo:
        for child in graph.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def imports_of(source: str, top: str) -> list[int]:
    """Lines of ``source`` that import the top-level package ``top`` (e.g. ``diffusers``), type-only
    imports left out."""
    tree = ast.parse(source)
    skipped = _type_checking_nodes(tree)
    lines = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == top for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == top:
            lines.append(node.lineno)
    return sorted(lines)
