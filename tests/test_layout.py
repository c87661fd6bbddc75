"""The library's shape (issue 14), checked so it stays: no import cycle inside `threeds/`, no library
module importing the CLI or the UI, no function longer than 70 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

LIBRARY = ROOT / "threeds"
ENTRY_POINTS = {"threeds.cli", "threeds.__main__"}


def _module(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every `threeds...` module imported anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


GRAPH = {_module(p): _imports(p) for p in LIBRARY.rglob("*.py")}


def _cycle_from(start: str) -> list[str] | None:
    stack = [(start, [start])]
    while stack:
        node, path = stack.pop()
        for dep in GRAPH.get(node, ()):
            if dep == start:
                return [*path, dep]
            if dep in GRAPH and dep not in path:
                stack.append((dep, [*path, dep]))
    return None


def test_no_import_cycle_inside_the_library():
    cycles = [c for m in GRAPH if (c := _cycle_from(m))]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_library_imports_neither_cli_nor_ui():
    library = {m: deps for m, deps in GRAPH.items() if not m.startswith("threeds.commands") and m not in ENTRY_POINTS}
    bad = {m: sorted(d for d in deps if d.startswith(("threeds.commands", "streamlit")) or d == "threeds.cli")
           for m, deps in library.items()}  # fmt: skip
    assert not {m: d for m, d in bad.items() if d}


def test_no_function_over_70_lines():
    files = [*LIBRARY.rglob("*.py"), ROOT / "app.py", *(ROOT / "app_pages").glob("*.py")]
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in files
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 70
    ]
    assert not long, long


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """A planted cycle is found (the graph walk is not vacuous)."""
    monkeypatch.setitem(GRAPH, "threeds.a", {"threeds.b"})
    monkeypatch.setitem(GRAPH, "threeds.b", {"threeds.a"})
    assert _cycle_from("threeds.a") == ["threeds.a", "threeds.b", "threeds.a"]


# The sub-packages in dependency order: a module may import from its own layer or an earlier one, never
# a later one. "core" is the top-level modules below everything (config, errors, names); the CLI and
# `commands` sit above the library.
LAYERS = ["core", "io", "model", "rundir", "selection", "stages", "views", "outcomes", "commands", "cli"]
TOP = {"threeds.cli": "cli", "threeds.__main__": "cli"}


def _layer(module: str) -> str | None:
    if not module.startswith("threeds"):
        return None
    if module in TOP:
        return TOP[module]
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (LIBRARY / parts[1]).is_dir()):
        return parts[1]
    return "core"


def _backward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(
        f"{module} ({_layer(module)}) imports {dep} ({_layer(dep)})"
        for module, deps in graph.items()
        for dep in deps
        if _layer(dep) is not None and rank[_layer(dep)] > rank[_layer(module)]
    )


def test_sub_packages_import_only_downwards():
    assert {_layer(m) for m in GRAPH} <= set(LAYERS)
    assert not _backward_imports(GRAPH)


def test_a_backward_import_is_found():
    planted = {**GRAPH, "threeds.io.data": {"threeds.stages.score"}}
    assert _backward_imports(planted) == ["threeds.io.data (io) imports threeds.stages.score (stages)"]
