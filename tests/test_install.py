"""Install paths a new user takes: environment.yml (conda-forge only, Python dependencies from
pyproject.toml), the Makefile's project venv, CI's call of the README's test command, the licence
and the citation. Conda channels cannot be reached from CI, so the environment file is checked by
its structure."""

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
ENV = yaml.safe_load((ROOT / "environment.yml").read_text())
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _conda_specs() -> dict[str, str]:
    """Conda dependencies (the pip sub-list left out) as name -> version spec."""
    out = {}
    for dep in ENV["dependencies"]:
        if isinstance(dep, str):
            name, _, spec = dep.partition("=")
            out[name.strip()] = spec.strip("=")
    return out


def _pip_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_is_conda_forge_only():
    # the `pytorch` channel stopped at 2.5 and, listed first under strict priority, hid conda-forge's
    # builds; `cpuonly` belongs to that channel
    assert ENV["channels"][0] == "conda-forge"
    assert set(ENV["channels"]) <= {"conda-forge", "nodefaults"}
    assert "cpuonly" not in _conda_specs() and "pytorch-cuda" not in _conda_specs()


def test_environment_takes_python_dependencies_from_pyproject():
    pips = [d["pip"] for d in ENV["dependencies"] if isinstance(d, dict)]
    assert pips == [["-e .[test]"]], "pip installs the package with its test extra, nothing else"
    assert "test" in PROJECT["optional-dependencies"]
    conda = _conda_specs()
    assert {"python", "pytorch", "nodejs", "pip"} == set(conda), "conda only brings what pip cannot"
    # the versions conda pins satisfy what pyproject asks
    assert Version(conda["python"] + ".0") in SpecifierSet(PROJECT["requires-python"])
    torch_req = next(r for r in PROJECT["dependencies"] if _pip_name(r) == "torch")
    assert Version(conda["pytorch"] + ".0") in SpecifierSet(torch_req[len("torch") :])


def test_environment_pins_the_makefiles_torch():
    make = (ROOT / "Makefile").read_text()
    pinned = re.search(r"^TORCH \?= torch==(\S+)", make, re.M)
    assert pinned, "the Makefile's default TORCH is an exact pin"
    assert pinned.group(1).startswith(_conda_specs()["pytorch"])


def _make_dry_run(*args: str) -> str:
    # Not the variables of a make this test may run under (CI's `make test VENV=` exports them).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VENV", "PYTHON")}
    return subprocess.run(
        ["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, check=True, env=env
    ).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_makefile_installs_into_a_project_venv_by_default():
    out = _make_dry_run("install", "BASE_PYTHON=/usr/bin/python3")
    assert "/usr/bin/python3 -m venv" in out and ".venv/bin/python -m pip install" in out
    assert not re.search(r"^python3? -m pip", out, re.M)
    # VENV= uses the active interpreter (a conda env); PYTHON names it
    out = _make_dry_run("install", "VENV=", "PYTHON=/opt/conda/bin/python")
    assert "-m venv" not in out and "/opt/conda/bin/python -m pip install" in out
    # the PyTorch index for outside users
    out = _make_dry_run("install", "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert "--index-url https://download.pytorch.org/whl/cpu" in out


def test_ci_runs_the_readmes_test_command_with_a_browser():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    # CI runs the README's command in its image's interpreter (VENV=, the Makefile's own switch)
    assert "make test" in readme and re.search(r"^make test( VENV=)?$", ci, re.M)
    assert re.search(r"apt-get install .*chromium chromium-driver", ci)
    extras = [_pip_name(r) for r in PROJECT["optional-dependencies"]["test"]]
    assert "selenium" in extras


def test_licence_and_citation():
    assert PROJECT["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT"
    paper = cff["preferred-citation"]
    assert [a["family-names"] for a in paper["authors"]] == ["Chalnev", "Siu", "Conmy"]
    assert paper["year"] == 2024 and "2411.02193" in paper["url"]
