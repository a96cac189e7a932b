"""The package's import graph, read from the source: no import cycle between modules, and no module
imports a higher layer. Every import statement counts, also those inside functions and under
``TYPE_CHECKING``: a deferred import hides a cycle, it does not remove it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "saets_utils"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Bottom to top. A module may import modules of its own unit (a subpackage or a top-level module)
# and of units in lower layers, never a unit of its own layer or a higher one.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("registry", "io_utils", "progress", "paths"),
    ("config",),
    ("models",),
    ("session", "manifest"),
    ("steering",),
    ("effects",),
    ("approximator",),
    ("judges",),
    ("evaluation",),
    ("report",),
    ("__init__",),  # the package itself: the notebook-facing exports
)
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_in(source: str, module: str, package: str) -> set[str]:
    """Modules of the package that ``source`` (the text of ``module`` in ``package``) imports anywhere."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import saets_utils.a.b` names module a.b; an attribute names its module
                t = t.rpartition(".")[0]
            if t and t != module:
                found.add(t)
    return found


def imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(), module, package)


GRAPH = {m: imports(m) for m in MODULES}


def test_every_unit_has_a_layer():
    units = {unit(m) for m in MODULES}
    assert units == set(RANK), f"place new units in LAYERS (missing {units - set(RANK)}, stale {set(RANK) - units})"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_of_a_higher_or_sibling_layer(module):
    here = unit(module)
    bad = sorted(t for t in GRAPH[module] if unit(t) != here and RANK[unit(t)] >= RANK[here])
    assert not bad, f"{module} (layer {RANK[here]}) imports {bad} from its own or a higher layer; see LAYERS"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    cycles = [c for c in strongly_connected(GRAPH) if len(c) > 1]
    assert not cycles, f"modules that import each other (directly or through others): {cycles}"


def test_the_cycle_check_finds_cycles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"], ["d"]]


def test_imports_in_functions_and_under_type_checking_are_seen():
    source = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from saets_utils.config import RunConfig
def f():
    from ..registry import METHODS
    from . import plan
    import saets_utils.models.loading
    import torch
"""
    got = imports_in(source, "saets_utils.effects.runner", "saets_utils.effects")
    assert got == {
        "saets_utils.config",
        "saets_utils.registry",
        "saets_utils.effects.plan",
        "saets_utils.models.loading",
    }
