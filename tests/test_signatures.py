"""Long signatures are keyword-only: no public function or method of the package takes more than
``MAX_POSITIONAL`` positional parameters, so a call names what it passes
(``generate(model, prompt, 6, seeds, sampling=s, hook_name=HOOK)``, not eight bare values)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_POSITIONAL = 6


def long_signatures(source: str, limit: int = MAX_POSITIONAL) -> list[str]:
    """Public functions, and public or ``__init__`` methods of public classes, in ``source`` with
    more than ``limit`` positional parameters (``self``/``cls`` not counted)."""
    found = []

    def visit(node: ast.AST, owner: str = "") -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                visit(child, f"{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.name.startswith("_") and child.name != "__init__":
                    continue
                params = [a.arg for a in child.args.posonlyargs + child.args.args]
                if owner and params[:1] in (["self"], ["cls"]):
                    params = params[1:]
                if len(params) > limit:
                    found.append(f"{owner}{child.name} (line {child.lineno}): {len(params)} positional")

    visit(ast.parse(source))
    return found


MODULES = sorted((ROOT / "saets_utils").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_public_function_has_a_long_positional_signature(path):
    long = long_signatures(path.read_text())
    assert not long, f"make the options keyword-only (a `*` after the first few parameters): {long}"


def test_the_check_counts_positional_parameters_only():
    src = """
def f(a, b, c, d, e, f, g): ...
def g(a, b, c, *, d, e, f, g): ...
def _h(a, b, c, d, e, f, g): ...
class C:
    def __init__(self, a, b, c, d, e, f, g): ...
    def m(self, a, *, b, c, d, e, f, g): ...
"""
    assert [s.split(" ")[0] for s in long_signatures(src)] == ["f", "C.__init__"]
