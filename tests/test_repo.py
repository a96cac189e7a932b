"""Repository contracts: notebooks carry no outputs, each has a papermill parameters cell and plain
imports from the package, the package exports what they use without importing anything heavy, the
two README commands and CI agree, params files validate."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from saets_utils.config import load_config

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_effects", "02_train", "03_eval", "04_plots", "05_playground"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_no_outputs_and_a_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{path.name} carries outputs in code cells {dirty}; run `make strip`"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    src = "".join(params[0]["source"])
    assert re.search(r"^params_file\s*=", src, re.M)
    if path.stem == "01_effects":
        assert re.search(r"^gpus\s*=", src, re.M)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_cells_stay_thin(path):
    nb = json.loads(path.read_text())
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            n = len("".join(c["source"]).splitlines())
            assert n <= 15, f"{path.name}: a code cell has {n} lines; move the logic into saets_utils"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_import_the_package_plainly(path):
    """No os.chdir (papermill and load_config resolve paths from the repo root), no autoreload in
    headless runs, and the package's names from its top level."""
    code = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    for src in code:
        assert "chdir" not in src and "autoreload" not in src and not re.search(r"^import (os|sys)\b", src, re.M)
        assert not re.search(r"^from saets_utils\.", src, re.M), f"{path.name}: import notebook names from saets_utils"


def test_package_exports_load_lazily_and_match_their_types():
    import saets_utils

    tree = ast.parse((ROOT / "saets_utils" / "__init__.py").read_text())
    typed = {
        a.asname or a.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saets_utils")
        for a in node.names
    }
    assert typed == saets_utils._EXPORTS  # the TYPE_CHECKING imports name the same modules as the lazy table
    assert set(saets_utils.__all__) == {"__version__", *saets_utils._EXPORTS}
    probe = (
        "import sys, saets_utils; print(sorted({'torch', 'pandas', 'openai', 'saets_utils.config'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]", f"importing saets_utils imported {out.strip()}"
    for name in saets_utils._EXPORTS:
        assert getattr(saets_utils, name) is not None


@pytest.mark.parametrize("path", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.stem)
def test_params_files_validate(path):
    run = load_config(path)
    assert run.name == path.stem
    assert run.results_dir == ROOT / "results" / path.stem


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_layout_doc_names_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text().split("# Layout", 1)[1].split("```")[1]
    package = ROOT / "saets_utils"
    for sub in sorted(p.parent for p in package.glob("*/__init__.py")):
        assert f"{sub.name}/" in layout, f"docs/layout.md lacks the subpackage {sub.name}/"
    for module in sorted(package.rglob("*.py")):
        if module.name != "__init__.py":
            assert re.search(rf"\b{module.stem}\b", layout), f"docs/layout.md lacks {module.relative_to(ROOT)}"


def test_tests_mirror_the_package():
    """Each subpackage of saets_utils has its test folder, and every test file sits either in such a
    folder, in tests/notebooks/, or in tests/ itself (top-level modules and repository-wide checks)."""
    tests = ROOT / "tests"
    subpackages = {p.parent.name for p in (ROOT / "saets_utils").glob("*/__init__.py")}
    folders = subpackages | {"notebooks"}
    missing = sorted(s for s in subpackages if not list((tests / s).glob("test_*.py")))
    assert not missing, f"subpackages without a test folder under tests/: {missing}"
    misplaced = sorted(
        str(p.relative_to(tests))
        for p in tests.rglob("test_*.py")
        if p.parent != tests and (p.parent.parent != tests or p.parent.name not in folders)
    )
    assert not misplaced, f"test files outside tests/<subpackage>/, tests/notebooks/ or tests/: {misplaced}"
    assert not list(tests.rglob("__init__.py")), "test folders are rootdir-imported: no __init__.py"
