#!/usr/bin/env python3
"""The dependency rule of docs/architecture.md#layers-and-the-dependency-rule, checked.

    nextbest  <-  storage  <-  {pipelines, definitions, serving}  <-  launcher

Two checks over every `.py` file of the six layer packages, reading source with `ast`
(nothing is imported, so it runs with any Python 3.11 and no project dependencies):

1. layers: each import must point down the rule above; the three apps never import
   each other; nothing imports launcher. Imports inside functions count too (a lazy
   import is still a dependency).
2. cycles: no two modules import each other, directly or through others, counting
   module-level and function-level imports (imports under `if TYPE_CHECKING:` are
   skipped: they never run).
3. private names: no module imports another module's `_private` name (make it public
   where it is defined, or move it where both can import it).

Prints each problem and exits 1, or one summary line and exits 0. `make test` runs it
before ruff, so the rule holds in any clone.

Usage: python3 tools/check_layers.py [PROJECT_ROOT]
"""

import ast
import itertools
import sys
from pathlib import Path

LAYERS = ("nextbest", "storage", "pipelines", "definitions", "serving", "launcher")
ALLOWED = {
    "nextbest": set(),
    "storage": {"nextbest"},
    "pipelines": {"nextbest", "storage"},
    "definitions": {"nextbest", "storage"},
    "serving": {"nextbest", "storage"},
    "launcher": {"nextbest", "storage", "pipelines", "definitions", "serving"},
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:` (never executed)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                imported = (
                    n for n in ast.walk(child) if isinstance(n, ast.Import | ast.ImportFrom)
                )
                lines.update(n.lineno for n in imported)
    return lines


def imports(tree: ast.AST, package: str) -> list[tuple[int, list[str], str]]:
    """(line, candidate module names, imported name) for each import; `from a import b`
    yields both `a.b` (if b is a submodule) and `a`, with name `b`; `import a.b` yields
    `a.b` with name ""; relative imports resolve against `package`."""
    found: list[tuple[int, list[str], str]] = []
    skip = type_checking_lines(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and node.lineno not in skip:
            found.extend((node.lineno, [alias.name], "") for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.lineno not in skip:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.append((node.lineno, [f"{base}.{alias.name}", base], alias.name))
    return found


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    files = sorted(
        p for layer in LAYERS if (root / layer).is_dir() for p in (root / layer).rglob("*.py")
    )
    modules = {module_name(root, p): p for p in files}
    problems: list[str] = []
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for name, path in modules.items():
        rel = path.relative_to(root)
        layer = rel.parts[0]
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
        for line, candidates, imported in imports(tree, package):
            top = candidates[-1].split(".")[0]
            if top in LAYERS and top != layer and top not in ALLOWED[layer]:
                problems.append(f"{rel}:{line}: {layer} must not import {top}")
            target = next((c for c in candidates if c in modules), None)
            private = imported.startswith("_") and not imported.startswith("__")
            if private and target == candidates[-1] and target != name:
                problems.append(f"{rel}:{line}: imports the private name {imported} of {target}")
            if target is not None and target != name:
                graph[name].setdefault(target, line)
    for cycle in find_cycles(graph):
        steps = " -> ".join(f"{a}:{graph[a][b]}" for a, b in itertools.pairwise(cycle))
        problems.append(f"import cycle (module:line of the import): {steps} -> {cycle[-1]}")
    for msg in problems:
        print(msg)
    print(f"layers: {len(files)} files checked, {len(problems)} imports break the rule")
    return 1 if problems else 0


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a closed path of module names) per strongly connected component of
    more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
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
                    components.append(component)
    return [cycle_within(graph, set(c)) for c in components]


def cycle_within(graph: dict[str, dict[str, int]], members: set[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first)."""
    start = min(members)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    return [start, start]


if __name__ == "__main__":
    sys.exit(main())
