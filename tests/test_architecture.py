"""The layout keeps its promises: one-way imports, small modules, image sizes from the data.

Read from the source with ``ast`` (nothing is imported): every ``import`` of a
kmclust module — at module level or inside a function — is an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kmclust"
#: "no module over ~400 lines"
MAX_LINES = 420
#: what each sub-package may import, along the data flow stage → Lloyd → sweep, and the report
#: beside it reading only the results schema; every package may use the shared plumbing
ALLOWED = {
    "data": ("kmclust.data",),
    "lloyd": ("kmclust.lloyd", "kmclust.data"),
    "sweep": ("kmclust.sweep", "kmclust.lloyd", "kmclust.data", "kmclust.cluster"),
    "report": ("kmclust.report", "kmclust.sweep.schema"),
}
SHARED = {"kmclust", "kmclust.errors", "kmclust.cli", "kmclust.location"}
#: where a data source defines its image size (the only place the literal may appear)
IMAGE_SIZE_HOMES = {"kmclust/data/sources.py"}


def modules() -> dict[str, Path]:
    """Dotted name → file of every module in the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path, names: set[str]) -> set[str]:
    """The kmclust modules ``path`` imports (a ``from pkg import mod`` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kmclust"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "kmclust":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in names else node.module)
    return {name for name in found if name in names}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_imports_flow_one_way(graph: dict[str, set[str]]) -> None:
    wrong = []
    for name, deps in sorted(graph.items()):
        package = name.split(".")[1] if name.count(".") else ""
        allowed = ALLOWED.get(package)
        if allowed is None:
            continue
        for dep in sorted(deps - SHARED):
            if not any(dep == a or dep.startswith(a + ".") for a in allowed):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)


def test_no_module_is_too_long() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules().values()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_image_size_only_where_a_source_defines_it() -> None:
    """No literal 28 or 784 (MNIST's image side and size) outside the data sources."""
    found = []
    for path in modules().values():
        rel = str(path.relative_to(ROOT))
        if rel in IMAGE_SIZE_HOMES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Constant)
                and type(node.value) is int
                and node.value in (28, 784)
            ):
                found.append(f"{rel}:{node.lineno}: {node.value}")
    assert not found, "image sizes outside the data sources:\n" + "\n".join(found)


def test_graph_sees_known_edges(graph: dict[str, set[str]]) -> None:
    """The walker itself works: edges that must exist are found (a test that can fail)."""
    assert "kmclust.lloyd.driver" in graph["kmclust.estimator"]
    assert "kmclust.errors" in graph["kmclust.cli"]
