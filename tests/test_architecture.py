"""The shape docs/ARCHITECTURE.md promises, checked on the source: no import circles, no import of the
coordinator by a site, no source file over 500 lines, no function over 60 without a reason."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("common", "client", "server")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
REASON = "Long:"  # a longer function says why in a docstring line starting with this


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()
# the size rules also bind the benchmarks (scripts, not imported by the packages)
SOURCES = [*MODULES.values(), *sorted((ROOT / "bench").glob("*.py"))]


def _imports(path: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _cycle_from(start: str) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, route = stack.pop()
        for nxt in GRAPH[node]:
            if nxt == start:
                return [*route, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*route, nxt]))
    return None


def test_the_checks_see_every_package_and_their_imports():
    assert {"common.config", "client.app", "server.coordinator"} <= set(MODULES)
    assert ROOT / "bench" / "bench_study.py" in SOURCES
    assert (
        "common.round" in GRAPH["server.coordinator"]
    )  # the walk finds imports, so the tests below can fail


def test_no_import_circles():
    circles = {" -> ".join(c) for m in GRAPH if (c := _cycle_from(m))}
    assert not circles, "import circles:\n" + "\n".join(sorted(circles))


@pytest.mark.parametrize(
    ("package", "forbidden"), [("common", ("client", "server")), ("client", ("server",))]
)
def test_imports_flow_one_way(package, forbidden):
    wrong = sorted(
        f"{m} imports {i}"
        for m, imports in GRAPH.items()
        if m.split(".")[0] == package
        for i in imports
        if i.split(".")[0] in forbidden
    )
    assert not wrong, f"{package}/ may not import {forbidden}: " + "; ".join(wrong)


def test_no_source_file_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in SOURCES
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_60_lines_without_a_reason():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > MAX_FUNCTION_LINES and not any(
                    line.strip().startswith(REASON) for line in doc.splitlines()
                ):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, (
        f"functions over {MAX_FUNCTION_LINES} lines without a '{REASON}' line in the docstring: {long}"
    )
