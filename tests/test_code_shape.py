"""The shape of the shipped code, checked on every CI run: no import cycle between modules (type-only imports
count: they are dependencies too), no package folder with more than 12 modules, no module over 400 lines, no
function over 60 lines (tests and benchmarks excepted). A newcomer can read any module top to bottom, follow
any function on one screen and find a subsystem by its folder; dependencies point one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"tledge": ROOT / "tledge", "tledge_export": ROOT / "export" / "tledge_export",
            "tledge_runtime": ROOT / "runtime" / "tledge_runtime"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_FOLDER_MODULES = 12  # __init__.py included


def _modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([pkg, *parts])] = path
    return found


MODULES = _modules()


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _imports(name: str, path: Path) -> set[str]:
    """Modules of the three packages that ``name`` imports, at module level, inside functions (a lazy import
    still makes a cycle) or under ``if TYPE_CHECKING:`` (a type is a dependency: it must live below both)."""
    tree = ast.parse(path.read_text())
    package = _package_of(name, path)
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = {f"{base}.{alias.name}" for alias in node.names}
            targets.update(names)
            if names - set(MODULES):  # `from pkg import name` runs pkg/__init__ unless every name is a submodule
                targets.add(base)
    return {t for t in targets if t in MODULES and t != name}


def _cycles(modules: dict[str, Path] = MODULES) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    graph = {name: _imports(name, path) & set(modules) for name, path in modules.items()}
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _crowded_folders(folders: list[Path]) -> dict[str, int]:
    """Package folders holding more than MAX_FOLDER_MODULES modules of their own (subfolders not counted)."""
    counts = {str(d): len(list(d.glob("*.py"))) for root in folders for d in [root, *root.rglob("*")]
              if d.is_dir() and (d / "__init__.py").exists()}
    return {d: n for d, n in counts.items() if n > MAX_FOLDER_MODULES}


def test_no_import_cycles():
    assert _cycles() == []


def test_no_folder_is_crowded():
    crowded = _crowded_folders(list(PACKAGES.values()))
    assert not crowded, f"split these folders into subpackages by subsystem: {crowded}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_readable(name):
    path = MODULES[name]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by what its parts do"
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_checks_find_what_they_look_for(tmp_path):
    """The walkers are not vacuous: they see the imports the code really has, a type-only cycle and a crowded
    folder."""
    assert "tledge_runtime.model.meta" in _imports("tledge_runtime.classifier", MODULES["tledge_runtime.classifier"])
    assert "tledge_runtime.backends.loader" in _imports("tledge_runtime.model_check", MODULES["tledge_runtime.model_check"])
    assert len(MODULES) > 60

    pkg = tmp_path / "tledge_runtime"
    (pkg / "sub").mkdir(parents=True)
    for f in ("__init__", "sub/__init__"):
        (pkg / f"{f}.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tledge_runtime.sub.b import B\n")
    (pkg / "sub" / "b.py").write_text("from tledge_runtime import a\n")
    fake = {"tledge_runtime.a": pkg / "a.py", "tledge_runtime.sub.b": pkg / "sub" / "b.py"}
    original = dict(MODULES)
    MODULES.update(fake)
    try:
        assert _cycles(fake) == [["tledge_runtime.a", "tledge_runtime.sub.b"]]
    finally:
        MODULES.clear()
        MODULES.update(original)
    for i in range(MAX_FOLDER_MODULES - 1):  # with __init__ and b: one too many
        (pkg / "sub" / f"m{i}.py").write_text("")
    assert _crowded_folders([pkg]) == {str(pkg / "sub"): MAX_FOLDER_MODULES + 1}
