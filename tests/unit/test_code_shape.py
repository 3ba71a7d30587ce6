"""Shape rules of the code (issue 14), checked on every `make test`: no function over 60 lines in
operator/ and workers/, no `# type: ignore` in operator/, and the dependency direction core <- kinds <- controller (core/
imports neither kind, the kinds never import each other)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

OPERATOR = REPO / "operator" / "tuneserve"
MAX_FUNCTION_LINES = 60
WORKERS = REPO / "workers" / "tuneserve_workers"
SOURCES = sorted(OPERATOR.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in SOURCES + sorted(WORKERS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "split these functions: " + "; ".join(long)


def test_no_type_ignore():
    hits = [f"{p.relative_to(REPO)}:{i}" for p in SOURCES for i, line in enumerate(p.read_text().splitlines(), 1)
            if "type: ignore" in line]
    assert not hits, hits


@pytest.mark.parametrize("package, forbidden", [
    ("core", ("tuneserve.finetunejob", "tuneserve.modelserve", "tuneserve.controller")),
    ("finetunejob", ("tuneserve.modelserve", "tuneserve.controller")),
    ("modelserve", ("tuneserve.finetunejob", "tuneserve.controller")),
    ("api", ("tuneserve.core", "tuneserve.finetunejob", "tuneserve.modelserve", "tuneserve.controller")),
])
def test_dependency_direction(package, forbidden):
    bad = [f"{p.relative_to(REPO)} imports {m}" for p in sorted((OPERATOR / package).rglob("*.py"))
           for m in _imports(p) if m.startswith(forbidden)]
    assert not bad, bad
