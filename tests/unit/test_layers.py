"""The package's imports point one way: no module imports, even only for type
checking, a module that imports it back (directly or through others)."""

from __future__ import annotations

import ast
from pathlib import Path

import writeturn

PACKAGE = Path(writeturn.__file__).parent


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (every import statement, anywhere)."""
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for mod, path in paths.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            graph[mod] |= {n for n in names if n in paths and n not in (mod, "writeturn")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_write_lifecycle_depends_downwards_only() -> None:
    graph = import_graph()
    # The state machine knows nothing of who runs it; the transaction layer
    # (and the retry policy) knows no runner; the public serializer is imported
    # by nothing below it.
    assert not graph["writeturn._write"] & {
        "writeturn._transaction",
        "writeturn._batch",
        "writeturn._worker",
        "writeturn.serializer",
        "writeturn.handle",
    }
    parts = ["writeturn._calls", "writeturn._lease", "writeturn._commit_outcome"]
    for layer in ["writeturn._transaction", *parts, "writeturn._retry"]:
        assert not graph[layer] & {
            "writeturn._attempt",
            "writeturn._batch",
            "writeturn._worker",
            "writeturn.serializer",
        }, layer
    # The transaction's parts are given the few pieces of the runtime they use.
    for part in [*parts, "writeturn._retry"]:
        assert "writeturn._runtime" not in graph[part], part
    core = [
        m
        for m in graph
        if m.rpartition(".")[2].startswith("_") and m.count(".") == 1 and m != "writeturn.__main__"
    ]
    assert "writeturn._write" in core
    assert [m for m in core if "writeturn.serializer" in graph[m]] == []


#: Old import paths kept for the tools, each re-exporting from ``writeturn.tools``.
SHIMS = {"writeturn.bench"}


def _is_tool_side(module: str) -> bool:
    return any(
        module == p or module.startswith(p + ".") for p in ("writeturn.tools", "writeturn.cli")
    )


def test_the_library_does_not_import_the_tools() -> None:
    graph = import_graph()
    assert "writeturn.tools.demo" in graph
    offenders = {
        mod: sorted(m for m in deps if m.startswith("writeturn.tools"))
        for mod, deps in graph.items()
        if not _is_tool_side(mod) and mod not in SHIMS
    }
    assert {mod: deps for mod, deps in offenders.items() if deps} == {}


def test_a_re_export_imports_only_the_tools() -> None:
    for shim in SHIMS:
        path = PACKAGE.parent.joinpath(*shim.split(".")) / "__init__.py"
        if not path.exists():
            path = path.parent.with_suffix(".py")
        imported = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, shim
                imported.append(node.module or "")
            elif isinstance(node, ast.Import):
                imported += [a.name for a in node.names]
        assert imported, shim
        others = [m for m in imported if m != "__future__" and not m.startswith("writeturn.tools")]
        assert others == [], shim


def test_the_benchmark_keeps_its_documented_import_path() -> None:
    import writeturn.bench
    import writeturn.tools.bench

    assert writeturn.bench.run_bench is writeturn.tools.bench.run_bench
    assert sorted(writeturn.bench.__all__) == sorted(writeturn.tools.bench.__all__)
    assert all(
        getattr(writeturn.bench, n) is getattr(writeturn.tools.bench, n)
        for n in writeturn.bench.__all__
    )


def test_the_demo_checks_and_report_do_not_run_anything() -> None:
    graph = import_graph()
    # The checks are pure functions of what a run saw, and the report only renders:
    # neither reaches the run, nor the serializer it drives.
    for part in ["writeturn.tools.demo._plan", "writeturn.tools.demo._checks"]:
        assert not graph[part] & {
            "writeturn.tools.demo._run",
            "writeturn.tools.demo._report",
            "writeturn.serializer",
        }, part
    assert not graph["writeturn.tools.demo._report"] & {
        "writeturn.tools.demo._run",
        "writeturn.serializer",
    }
