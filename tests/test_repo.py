"""Repository contracts: notebooks carry no outputs, each has a papermill parameters cell, the two
README commands and CI agree, params files validate."""

import json
import re
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


@pytest.mark.parametrize("path", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.stem)
def test_params_files_validate(path):
    run = load_config(path)
    assert run.name == path.stem
    assert run.results_dir == ROOT / "results" / path.stem


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
