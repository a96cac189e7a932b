"""The files between stages are named in one place, ``saets_utils/paths.py``: no other module of the
package and no notebook spells a run file's name, the pipeline's steps and the manifest's step files
come from its table, and ``docs/files.md`` shows that table as it is."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from saets_utils.paths import STEPS, RunPaths, StageFile, WorkPaths, markdown_table

ROOT = Path(__file__).resolve().parent.parent
ENTRIES: list[StageFile] = [*RunPaths.files(), *(v for v in vars(WorkPaths).values() if isinstance(v, StageFile))]
# File names (``effects.safetensors``, ``summary.csv``) anywhere in a string; folder names only as a
# path part (``x / "eval"``), since "eval" or "study" are also params sections and plain words.
FILE_NAMES = sorted({e.filename for e in ENTRIES if not e.is_folder})
FOLDER_NAMES = sorted({e.filename for e in ENTRIES if e.is_folder})
FILE_RE = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, FILE_NAMES)) + r")(?![\w-])")
# Files of the same name that are not a run's (module -> names).
NOT_RUN_FILES = {"saets_utils/models/assets.py": {"manifest.json"}}  # the corpus asset's manifest in the cache


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module, its classes and functions (documentation may name files)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def stage_literals(source: str, allowed: set[str] = frozenset()) -> list[str]:
    """Run file names spelled in ``source`` outside docstrings and comments: string constants (f-string
    parts included) naming a file, and ``path / "<folder>"`` with a run folder's name (not under
    ``REPO_ROOT``: the repo's ``notebooks/`` is not a run's)."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            hits += [f"{node.lineno}: {m}" for m in FILE_RE.findall(node.value) if m not in allowed]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right, left = node.right, node.left
            while isinstance(left, ast.BinOp):
                left = left.left
            in_repo = isinstance(left, ast.Name) and left.id == "REPO_ROOT"
            if isinstance(right, ast.Constant) and right.value in FOLDER_NAMES and not in_repo:
                hits.append(f"{node.lineno}: / {right.value!r}")
    return hits


def _notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


SOURCES = [p for p in sorted((ROOT / "saets_utils").rglob("*.py")) if p.name != "paths.py"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", SOURCES + NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_run_file_name_outside_paths(path):
    source = _notebook_code(path) if path.suffix == ".ipynb" else path.read_text()
    hits = stage_literals(source, NOT_RUN_FILES.get(str(path.relative_to(ROOT)), set()))
    assert not hits, f"{path.relative_to(ROOT)} names run files; use saets_utils.paths.RunPaths (run.paths): {hits}"


def test_the_check_finds_what_it_looks_for():
    found = stage_literals('p = run.results_dir / "eval" / "summary.csv"\nq = f"{d}/effects_meta.json"\n')
    assert sorted(found) == ["1: / 'eval'", "1: summary.csv", "2: effects_meta.json"]
    assert (
        stage_literals('"""Reads effects.safetensors."""\nx = "diagnosis_summary.csv"  # effects.safetensors\n') == []
    )
    assert stage_literals('n = REPO_ROOT / "notebooks" / name\n') == []


def test_every_entry_is_named_once_and_relative():
    rels = [e.rel for e in RunPaths.files()]
    assert len(rels) == len(set(rels))
    assert all(not Path(r).is_absolute() and ".." not in Path(r).parts for r in rels)
    assert all(e.step in (*STEPS, "study", "pipeline", "publish") for e in ENTRIES)
    for e in RunPaths.files():  # a step reads only files of steps before it
        if e.step in STEPS:
            assert all(STEPS.index(r) > STEPS.index(e.step) for r in e.read_by), e


def test_paths_are_under_the_run_folder(tmp_path):
    p = RunPaths(tmp_path)
    assert p.effects == tmp_path / RunPaths.effects.rel
    assert p.plan == p.work.plan == tmp_path / "effects_work" / "plan.safetensors"
    assert p.figure("pareto").parent == p.figures_dir
    assert p.report("01_effects").parent == p.index_page.parent == p.reports_dir


def test_pipeline_and_manifest_read_the_table():
    from saets_utils.manifest import STEP_OUTPUTS
    from saets_utils.report.pipeline import STEPS as PIPELINE

    assert [s.name for s in PIPELINE] == list(STEPS)
    for s in PIPELINE:
        assert s.outputs == RunPaths.written_by(s.name, marks_done=True)
        assert s.inputs == RunPaths.read_by_step(s.name)
    assert set(STEP_OUTPUTS) == set(STEPS[:3])
    assert all(STEP_OUTPUTS[s] == RunPaths.written_by(s, recorded=True) for s in STEP_OUTPUTS)


def test_docs_files_table_is_the_paths_table():
    doc = (ROOT / "docs" / "files.md").read_text()
    assert markdown_table() in doc, "docs/files.md is stale: paste `python -m saets_utils.paths` into it"


def test_readme_names_only_files_of_the_step_in_its_row():
    table = {e.rel: e for e in RunPaths.files()}
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if re.match(r"\| `0[1-5]_\w+` \|", line)]
    assert len(rows) == 5
    for row in rows:
        step = re.match(r"\| `(\w+)`", row).group(1)
        writes = row.rstrip(" |").rsplit("|", 1)[1]
        for name in re.findall(r"`([^`]+)`", writes):
            if name.endswith("/*.png"):
                name = name.removesuffix("/*.png")
            assert name in table, f"README's {step} row names {name}, not a file of saets_utils/paths.py"
            assert table[name].step == step, f"README's {step} row names {name}, which {table[name].step} writes"
