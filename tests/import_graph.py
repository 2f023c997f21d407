"""The import graph of efficient_dlm, read with `ast` (nothing is imported): cycles and function-local imports.

`python -m tests.import_graph [ROOT]` prints the counts. A cycle is a strongly connected component
of more than one module in the graph of all intra-package imports (top-level and function-local: a
function-local import is how a cycle is usually hidden). A function-local import is any `import`
inside a function body.
"""
from __future__ import annotations

import ast
import os
import sys


def modules(root: str) -> dict[str, str]:
    """{dotted module name: path} of every .py file under root/efficient_dlm."""
    out = {}
    base = os.path.join(root, "efficient_dlm")
    for folder, _, files in os.walk(base):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, root)[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = path
    return out


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The efficient_dlm modules an import statement loads (`from a import b` is a.b when b is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            parts = module.split(".")
            parts = parts if is_package else parts[:-1]
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    return [n for n in names if n in known]


def graph(root: str) -> tuple[dict[str, set[str]], list[tuple[str, int, bool]]]:
    """(module -> imported efficient_dlm modules, [(module, line, of an efficient_dlm module) of every
    function-local import])."""
    mods = modules(root)
    known, edges, local = set(mods), {}, []
    for module, path in mods.items():
        tree = ast.parse(open(path).read(), path)
        edges[module] = set()
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = set(_targets(node, module, path.endswith("__init__.py"), known)) - {module}
                edges[module] |= targets
                if id(node) in in_function:
                    local.append((module, node.lineno, bool(targets)))
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main(root: str) -> None:
    edges, local = graph(root)
    found = cycles(edges)
    ours = sum(1 for *_, internal in local if internal)
    print(f"modules: {len(edges)}; import cycles (SCCs > 1 module): {len(found)}; function-local imports: "
          f"{len(local)} ({ours} of efficient_dlm modules, {len(local) - ours} of other packages)")
    for component in found:
        print("  cycle:", " <-> ".join(component))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
