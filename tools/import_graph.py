"""The package's import graph (issue 28): circles, imports of the package root from inside it,
and private names imported across modules. Imports inside functions count: a lazy import is
still a dependency.

    python tools/import_graph.py            # mlabel/
    python tools/import_graph.py --edges    # also every module's imports

Exits 1 when it finds any of the three, so a test (tests/test_architecture.py) can hold the line.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = here.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path) -> dict[str, list[tuple[str, str | None, int]]]:
    """Per module: (imported module, imported name or None, line) for each import of the package."""
    package = root.name
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    found: dict[str, list] = {}
    for name, path in modules.items():
        edges = found.setdefault(name, [])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == package]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node, name, path.name == "__init__.py")
                if target.split(".")[0] != package:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.append((sub, None, node.lineno) if sub in modules else (target, alias.name, node.lineno))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def problems(root: Path) -> dict[str, list[str]]:
    found = imports(root)
    package = root.name
    graph = {m: {t for t, _, _ in edges if t != m and t in found} for m, edges in found.items()}
    # the package root re-exports the API: a module importing it runs back up the layers
    upward = [f"{m}:{line} imports {package} itself ({name})" for m, edges in found.items()
              for t, name, line in edges if t == package and m != package]
    private = [f"{m}:{line} imports {t}.{name}" for m, edges in found.items() for t, name, line in edges
               if name and name.startswith("_") and not name.startswith("__") and t != m]
    return {"circles": [" <-> ".join(c) for c in cycles(graph)], "upward": upward, "private": private}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default="mlabel")
    parser.add_argument("--edges", action="store_true", help="print every module's imports")
    args = parser.parse_args()
    root = Path(args.package)
    if args.edges:
        for module, edges in sorted(imports(root).items()):
            print(module, "->", ", ".join(sorted({t for t, _, _ in edges})))
    found = problems(root)
    for kind, items in found.items():
        print(f"{kind}: {len(items)}")
        for item in items:
            print(f"  {item}")
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
