"""The project's import graph, read with `ast` (nothing is imported), and the
checks tests/unit/test_layering.py makes on it: imports that go against the
package DAG, module-level import cycles between files, modules over a size."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# What each top-level package may import besides itself: the DAG
# ipc <- common <- sdk <- {kernel, drivers, services} <- tools, with text on
# common, used by drivers, services and tools.
ALLOWED: Mapping[str, frozenset[str]] = {
    "ipc": frozenset(),
    "common": frozenset({"ipc"}),
    "text": frozenset({"ipc", "common"}),
    "sdk": frozenset({"ipc", "common"}),
    "kernel": frozenset({"ipc", "common", "sdk"}),
    "drivers": frozenset({"ipc", "common", "sdk", "text"}),
    "services": frozenset({"ipc", "common", "sdk", "text"}),
    "tools": frozenset({"ipc", "common", "sdk", "text", "kernel", "drivers", "services"}),
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    path: Path
    line: int
    module: str  # the project module it names (longest prefix that is one)
    top_level: bool  # runs when the importer is imported (not in a function or TYPE_CHECKING)


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted name -> file for every .py under `packages` (a package is its __init__)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(root: Path, packages: tuple[str, ...]) -> list[Import]:
    """Every import of a project module from a project module, absolute or
    relative, wherever it is written."""
    mods = modules(root, packages)
    found = []
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node, top in _import_nodes(ast.parse(path.read_text(), str(path)).body, True):
            for target in _targets(node, name, is_pkg):
                resolved = _resolve(target, mods)
                if resolved is not None and resolved != name:
                    found.append(Import(name, path, node.lineno, resolved, top))
    return found


def _import_nodes(body: list[ast.stmt], top: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _import_nodes(node.body, False)
        elif isinstance(node, ast.If):
            yield from _import_nodes(node.body, top and not _is_type_checking(node.test))
            yield from _import_nodes(node.orelse, top)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(node, field, []):
                    inner = child.body if isinstance(child, (ast.ExceptHandler, ast.match_case)) else [child]
                    yield from _import_nodes(inner, top)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_pkg: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_pkg else importer.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    # `from a import b` imports a.b when b is a module, else a name in a
    return [f"{base}.{a.name}" if base else a.name for a in node.names]


def _resolve(target: str, mods: Mapping[str, Path]) -> str | None:
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in mods:
            return name
        parts.pop()
    return None


def upward(found: list[Import]) -> list[str]:
    """Imports against the DAG, as `path:line: importer imports module`."""
    bad = []
    for imp in found:
        src, dst = imp.importer.split(".")[0], imp.module.split(".")[0]
        if src != dst and dst not in ALLOWED.get(src, frozenset()):
            bad.append(f"{imp.path}:{imp.line}: {imp.importer} ({src}) imports {imp.module} ({dst})")
    return bad


def cycles(found: list[Import]) -> list[list[str]]:
    """Module-level import cycles: strongly connected components (Tarjan) of
    the graph of top-level imports, each sorted, largest first. Importing
    a.b.c also runs a and a.b, so those count too, unless the importer is
    already inside them."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        if not imp.top_level:
            continue
        targets = graph.setdefault(imp.importer, set())
        parts = imp.module.split(".")
        for i in range(1, len(parts) + 1):
            target = ".".join(parts[:i])
            if target != imp.importer and not imp.importer.startswith(target + "."):
                targets.add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        # recursive Tarjan: the module graph is a few hundred nodes deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out, key=lambda c: (-len(c), c))


def package_cycles(root: Path, packages: tuple[str, ...]) -> list[list[str]]:
    """Cycles between packages (the directory a module sits in), counting
    every import: one deferred into a function still ties two packages."""
    mods = modules(root, packages)

    def package(module: str) -> str:
        if mods[module].name == "__init__.py" or "." not in module:
            return module
        return module.rsplit(".", 1)[0]

    between = []
    for imp in imports(root, packages):
        src, dst = package(imp.importer), package(imp.module)
        # a package using its own subpackages (or the reverse) is one unit
        if src != dst and not src.startswith(dst + ".") and not dst.startswith(src + "."):
            between.append(Import(src, imp.path, imp.line, dst, True))
    return cycles(between)


def too_long(root: Path, dirs: tuple[str, ...], limit: int) -> list[str]:
    """Python files over `limit` lines, as `path: N lines`."""
    out = []
    for d in dirs:
        for path in sorted((root / d).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if n > limit:
                out.append(f"{path.relative_to(root)}: {n} lines")
    return out
