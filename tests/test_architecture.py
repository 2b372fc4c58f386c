"""The structure docs/architecture.md describes, checked from the source (import-linter checks the
layers in `make test`; these catch what it does not): no import circle between modules, and imports
of the package's own modules inside functions are rare and say why."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oncoscope"
MAX_LATE_IMPORTS = 20


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        if "migrations" in p.parts:
            continue
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _target(module: str, path: Path, node: ast.ImportFrom, known: dict) -> list[str]:
    """The package modules an import statement names (``from . import x`` may name module x)."""
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        root = ".".join(base + ([node.module] if node.module else []))
    else:
        root = node.module or ""
    if not root.startswith("oncoscope"):
        return []
    names = [f"{root}.{a.name}" for a in node.names if f"{root}.{a.name}" in known]
    return names or [root]


def _imports(known: dict) -> tuple[dict[str, set[str]], list[tuple[str, int, bool]]]:
    """The import graph (every import, at module level or not), and every import inside a function:
    (where, line, whether a comment above says why)."""
    graph, late = {}, []
    for module, path in known.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        graph[module] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            targets = [t for t in _target(module, path, node, known) if t in known]
            if not targets:
                continue
            graph[module].update(t for t in targets if t != module)  # a late import still ties two modules
            if node.col_offset:
                before = lines[max(0, node.lineno - 4): node.lineno]
                late.append((f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", node.lineno,
                             any("#" in ln for ln in before)))
    return graph, late


def test_no_import_circle_between_modules():
    known = _modules()
    graph, _ = _imports(known)
    state, circles = {}, []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_imports_inside_functions_are_few_and_say_why():
    _, late = _imports(_modules())
    assert len(late) <= MAX_LATE_IMPORTS, [w for w, _, _ in late]
    assert [w for w, _, commented in late if not commented] == []
