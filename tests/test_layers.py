"""The package's layers, read from the AST (function-level imports included).

One folder per concern, and no folder imports one above it:

    errors, base  <  study  <  training  <  record, stores  <  loop  <  commands, views  <  cli

``record`` (MLflow) and ``stores`` (Optuna, checkpoints) are peers and never import each other;
``record`` never imports optuna or torch, ``stores`` and ``loop`` never import mlflow. No import
circle anywhere in ``sweep/``, and importing ``sweep.record`` leaves optuna and torch unloaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sweep"

#: each part's floor; a module may import parts on a lower floor and its own part only
FLOORS = {"errors": 0, "base": 1, "study": 2, "training": 3, "record": 4, "stores": 4,
          "loop": 5, "commands": 6, "views": 6, "api": 7, "cli": 8}
#: third-party packages a part must never import
FORBIDDEN = {"base": {"optuna", "mlflow", "torch"}, "record": {"optuna", "torch"},
             "stores": {"mlflow"}, "loop": {"mlflow"}, "study": {"mlflow"},
             "training": {"optuna", "mlflow"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # ``from sweep.record import names`` may import a submodule
            found.update(f"{mod}.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def part_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "sweep":
        return None
    return parts[1] if len(parts) > 1 else "sweep"


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports_of(path) if m in known and m != name}
            for name, path in known.items()}


def layer_violations(graph: dict[str, set[str]], third_party: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        part = part_of(module)
        if part not in FLOORS:
            continue
        for target in sorted(targets):
            other = part_of(target)
            if other == part or other not in FLOORS:
                continue
            if FLOORS[other] >= FLOORS[part]:
                problems.append(f"{module} imports {target}: {part} may not import {other}")
    for module, found in sorted(third_party.items()):
        part = part_of(module)
        for top in sorted(found & FORBIDDEN.get(part, set())):
            problems.append(f"{module} imports {top}: {part} never imports {top}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def third_party_imports() -> dict[str, set[str]]:
    return {name: {m.split(".")[0] for m in imports_of(path)} for name, path in modules().items()}


def test_no_import_circles_in_the_package():
    found = cycles(internal_graph())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_part_imports_a_part_above_it_or_a_forbidden_library():
    problems = layer_violations(internal_graph(), third_party_imports())
    assert not problems, "\n".join(problems)


def test_the_orchestration_folder_is_gone_and_every_part_is_known():
    assert not (PACKAGE / "orchestration").exists()
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert parts <= set(FLOORS) | {"__main__"}, f"parts without a floor: {parts - set(FLOORS)}"


def test_importing_the_record_loads_neither_optuna_nor_torch():
    code = ("import sys, sweep.record, sweep.record.completeness; "
            "print(sorted(m for m in ('optuna', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# The rules must be able to fail: each stray import below is caught.
@pytest.mark.parametrize("module, stray, expected", [
    ("sweep.record.spool", "sweep.stores.storage", "record may not import stores"),
    ("sweep.stores.retry", "sweep.loop.worker", "stores may not import loop"),
    ("sweep.training.models", "sweep.loop.objective", "training may not import loop"),
    ("sweep.study.spec", "sweep.commands.launch", "study may not import commands"),
    ("sweep.loop.worker", "sweep.views.report", "loop may not import views"),
    ("sweep.base.urls", "sweep.study.spec", "base may not import study"),
])
def test_a_stray_import_breaks_the_rules(module, stray, expected):
    graph = internal_graph()
    graph[module] = graph[module] | {stray}
    problems = layer_violations(graph, {})
    assert any(expected in p and module in p for p in problems), problems


@pytest.mark.parametrize("module, library", [("sweep.record.spool", "optuna"),
                                             ("sweep.record.tracking", "torch"),
                                             ("sweep.loop.worker", "mlflow"),
                                             ("sweep.stores.checkpoints", "mlflow")])
def test_a_forbidden_library_breaks_the_rules(module, library):
    third = third_party_imports()
    third[module] = third[module] | {library}
    assert any(f"never imports {library}" in p for p in layer_violations({}, third))


def test_a_circle_is_found():
    graph = internal_graph()
    graph["sweep.base.urls"] = graph["sweep.base.urls"] | {"sweep.base.text"}
    assert ["sweep.base.text", "sweep.base.urls"] in cycles(graph)


@pytest.mark.parametrize("package", ["record", "stores", "loop"])
def test_code_outside_a_package_imports_it_through_its_public_names(package):
    """Each of these packages' ``__init__`` names its surface; nothing outside the package reaches
    behind it (the modules inside may move names between them freely). No public name is also a
    submodule's name: once that submodule is imported, the package attribute would be the module."""
    import importlib

    public = importlib.import_module(f"sweep.{package}")
    inside = f"sweep.{package}"
    behind = {f"{module} imports {target}" for module, targets in internal_graph().items()
              if not module.startswith(inside) for target in targets
              if target.startswith(inside + ".")}
    assert not behind, "\n".join(sorted(behind))
    missing = [name for name in public.__all__ if getattr(public, name, None) is None]
    assert not missing and len(set(public.__all__)) == len(public.__all__)
    submodules = {p.stem for p in (PACKAGE / package).glob("*.py")}
    assert not submodules & set(public.__all__), "public names that are also module names"


MODULE_LINES, CLASS_LINES = 500, 200  # the bounds of issue 31: past them a file holds two concerns


def sizes_over(limit_module: int, limit_class: int, sources: dict[str, str]) -> list[str]:
    """Modules longer than ``limit_module`` lines and classes longer than ``limit_class``."""
    over = []
    for name, text in sorted(sources.items()):
        if text.count("\n") > limit_module:
            over.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > limit_class:
                over.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    return over


def test_no_module_or_class_is_past_its_size_bound():
    sources = {name: path.read_text() for name, path in modules().items()}
    assert not sizes_over(MODULE_LINES, CLASS_LINES, sources)
    # the check itself: a class one line past the bound, and a module, are caught
    long_class = "class Big:\n" + "    x = 1\n" * CLASS_LINES
    assert sizes_over(MODULE_LINES, CLASS_LINES, {"m": long_class}) == [f"m.Big: {CLASS_LINES + 1} lines"]
    assert sizes_over(MODULE_LINES, CLASS_LINES, {"m": "x = 1\n" * (MODULE_LINES + 1)}) \
        == [f"m: {MODULE_LINES + 1} lines"]


def test_no_two_classes_in_sweep_share_a_name():
    """Two classes of one name (two ``_Slot``s once, two ``Heartbeat``s) read as one thing."""
    seen: dict[str, list[str]] = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                seen.setdefault(node.name, []).append(name)
    assert not {cls: where for cls, where in seen.items() if len(where) > 1}
