"""The benchmark modules import each other without a circle and without private names.

import-linter's contracts see ``oncoscope.bench`` as one layer; this looks inside it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import oncoscope.bench

BENCH = Path(oncoscope.bench.__file__).parent


def _bench_imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported bench module, names)] for ``from .x import ...`` anywhere in the module."""
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for path in sorted(BENCH.glob("*.py")):
        edges = out.setdefault(path.stem, [])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                edges.append((node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("oncoscope.bench."):
                edges.append((node.module.removeprefix("oncoscope.bench."), [a.name for a in node.names]))
    return out


def test_no_import_circle_inside_bench():
    graph = {m: {target for target, _ in edges} for m, edges in _bench_imports().items()}
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import circle: {' -> '.join(path + (m,))}"
        if m in done:
            return
        for target in graph.get(m, ()):
            visit(target, path + (m,))
        done.add(m)

    for m in graph:
        visit(m, ())


def test_no_private_name_imported_across_bench_modules():
    private = [(m, target, n) for m, edges in _bench_imports().items() for target, names in edges
               for n in names if n.startswith("_")]
    assert not private, private
