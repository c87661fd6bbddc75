"""The library's shape (issue 14), checked so it stays: no import cycle inside `threeds/`, no library
module importing the CLI or the UI, no function longer than 70 lines."""

from __future__ import annotations

import ast
import re
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


# Every file threeds writes is named in threeds/rundir/layout.py only (issues 22, 29): a path built
# from a literal anywhere else would miss a rename. Docstrings and messages may mention the names; a
# string constant that IS a file name (a stem and a known extension, e.g. "loss.jsonl", whether
# layout.py knows it or not) is a path being built, and so is a layout name (a folder such as "arms")
# used as a path part. Names other programs gave their files are spelled once, by the module that
# reads them (NAMED_BY), below rundir in the layer order or beside their format's reader.
APP = [ROOT / "app.py", *(ROOT / "app_pages").glob("*.py")]
LAYOUT = LIBRARY / "rundir" / "layout.py"
FILE_NAME = re.compile(r"[\w.\-]*[\w\-]\.(?:json|jsonl|npy|npz|parquet|safetensors|bin|gguf|pt|pkl|md|csv|tsv|yaml|yml|log|txt|lock|html)")
NAMED_BY = {
    ".lock": LIBRARY / "io" / "lock.py",
    **dict.fromkeys(("config.json", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
                    LIBRARY / "model" / "files.py"),  # transformers'
    **dict.fromkeys(("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"), LIBRARY / "model" / "lora.py"),  # PEFT's
    **dict.fromkeys(("ori_pqal.json", "test_ground_truth.json"), LIBRARY / "outcomes" / "benchsets.py"),  # PubMedQA's release
    **dict.fromkeys(("_sharegpt.json", "_selected.json"), LIBRARY / "views" / "export.py"),  # files the user exports
}  # fmt: skip
PATH_CALLS = {"Path", "joinpath", "with_name", "glob", "rglob"}


def _layout_names() -> set[str]:
    from threeds.rundir import layout

    values = [v for k, v in vars(layout).items() if k.isupper() and not isinstance(v, dict)]
    values += [v for k, v in vars(layout).items() if k.isupper() and isinstance(v, dict) for v in v.values()]
    return {n for v in values for n in (v if isinstance(v, tuple) else (v,))}


def _string_constants(tree: ast.AST) -> list[ast.Constant]:
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _path_parts(tree: ast.AST) -> set[int]:
    """ids of the string constants that are path parts: an operand of `/`, an argument of Path(...) and its kin."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found |= {id(node.left), id(node.right)}
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in PATH_CALLS:
            found |= {id(a) for a in node.args}
    return found


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _file_name_literals(files: list[Path], names: set[str]) -> list[str]:
    found = []
    for path in files:
        if path == LAYOUT:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parts = _path_parts(tree)
        found += [f"{_where(path)}:{node.lineno} {node.value!r}" for node in _string_constants(tree)
                  if (FILE_NAME.fullmatch(node.value) or node.value in names and id(node) in parts)
                  and NAMED_BY.get(node.value) != path]  # fmt: skip
    return sorted(found)


def test_file_names_are_spelled_only_in_the_layout_module():
    assert {"metrics.parquet", "emb.npy", "experiments", "arms", "units.json", "loss.jsonl", "items.jsonl"} <= _layout_names()
    assert not _file_name_literals([*LIBRARY.rglob("*.py"), *APP], _layout_names())


def test_a_file_name_literal_is_found(tmp_path):
    """Any file name is found, known to layout.py or not; a layout folder only where it builds a path."""
    planted = tmp_path / "planted.py"
    planted.write_text('"""Reads metrics.parquet."""\nPATH = "metrics.parquet"\nNOTE = f"see {PATH}: metrics.parquet"\n'
                       'NEW = "weights.safetensors"\nfolder = exp / "arms" / f"seed{seed}"\nrows = described["arms"]\n'
                       'SUFFIX = ".json"\nNAME = f"{exp}-report.md"\nlock = Path(".lock")\n')  # fmt: skip
    found = [s.split(" ", 1)[1] for s in _file_name_literals([planted], _layout_names())]
    assert found == ["'metrics.parquet'", "'weights.safetensors'", "'arms'", "'-report.md'", "'.lock'"]


# The manifest's `stages` section has one writer (stages/pipeline.Stages) and one reader for everyone
# else (rundir/check.stage_part): no other module spells its name.
STAGES_OWNERS = {LIBRARY / "stages" / "pipeline.py", LIBRARY / "rundir" / "check.py"}


def _stages_literals(files: list[Path]) -> list[str]:
    return sorted(f"{_where(path)}:{node.lineno}" for path in files if path not in STAGES_OWNERS
                  for node in _string_constants(ast.parse(path.read_text(encoding="utf-8"))) if node.value == "stages")  # fmt: skip


def test_the_stages_section_is_read_through_one_reader(tmp_path):
    assert not _stages_literals([*LIBRARY.rglob("*.py"), *APP])
    planted = tmp_path / "planted.py"
    planted.write_text('cap = manifest.get("stages", {}).get("generate")\n')
    assert _stages_literals([planted]) == ["planted.py:1"]


# A name with a leading underscore is its module's own business: another module that imports it
# (or reaches it through the module) depends on what its owner may change without notice.
def _private_uses(path: Path) -> list[str]:
    nodes = list(ast.walk(ast.parse(path.read_text(encoding="utf-8"))))
    ours = [(n.module or "", a) for n in nodes if isinstance(n, ast.ImportFrom) for a in n.names
            if (n.module or "").startswith(("threeds", "app_pages"))]  # fmt: skip
    ours += [("", a) for n in nodes if isinstance(n, ast.Import) for a in n.names if a.name.startswith("threeds")]
    modules = {a.asname or a.name for _, a in ours if not _private(a.name)}  # modules and other names: `name._x` is private
    found = [f"{module}.{a.name}" for module, a in ours if _private(a.name)]
    found += [f"{n.value.id}.{n.attr}" for n in nodes
              if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules and _private(n.attr)]  # fmt: skip
    return [f"{_where(path)}: {f}" for f in found]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_used_across_modules():
    assert not [use for path in [*LIBRARY.rglob("*.py"), *APP] for use in _private_uses(path)]


def test_a_private_import_is_found(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from threeds.selection import kcenter\nfrom threeds.selection.kcenter import _centre, band_filter\n"
                       "x = kcenter._rows_float32\ny = kcenter.__name__\n")  # fmt: skip
    assert _private_uses(planted) == ["planted.py: threeds.selection.kcenter._centre", "planted.py: kcenter._rows_float32"]
