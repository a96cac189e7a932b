"""The pipeline's stamps: a step is current only while its inputs' content (earlier steps' files,
task files, the package and the notebook) and its own outputs are what they were when it last
succeeded; a failed step is re-run; stale figures never reach the next report.

The notebooks are replaced by fakes that write their outputs, so these tests take a second.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from helpers import HOOK
from saets_utils.config import REPO_ROOT, load_config
from saets_utils.report import pipeline


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake repo root (package + notebooks) for the code digest, params with a task given by path,
    and fake notebooks; returns (params path, log of executed steps, results dir, root)."""
    root = tmp_path / "root"
    (root / "saets_utils").mkdir(parents=True)
    (root / "saets_utils" / "mod.py").write_text("x = 1\n")
    (root / "notebooks").mkdir()
    for s in pipeline.STEPS:
        (root / "notebooks" / f"{s.name}.ipynb").write_text("{}")
    monkeypatch.setattr(pipeline, "REPO_ROOT", root)
    task = tmp_path / "mytask.yaml"
    shutil.copy(REPO_ROOT / "params" / "tasks" / "anger.yaml", task)
    task.write_text(task.read_text().replace("name: anger", "name: mytask"))
    params = tmp_path / "run.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "sae": {"hook_name": HOOK},
                "eval": {"tasks": [str(task)]},
                "results_root": str(tmp_path / "results"),
                "approximator": {"holdout": 10},
            }
        )
    )
    results = load_config(params).results_dir
    log: list[str] = []
    content = {"value": "a"}
    fail = {"step": None}

    def execute(run, step, params_file, parameters, timeout_s):
        log.append(step.name)
        for out in step.outputs:
            p = run.results_dir / out
            if out == "figures":
                p.mkdir(parents=True, exist_ok=True)
                (p / "f.png").write_text(content["value"])
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(f"{step.name} {content['value']}")
            if fail["step"] == step.name:  # dies half-way: the first output rewritten, then an error
                raise pipeline.StepFailed(f"notebook {step.name}.ipynb failed in cell 2")
        return run.results_dir / "notebooks" / f"{step.name}.ipynb"

    monkeypatch.setattr(pipeline, "execute_notebook", execute)
    monkeypatch.setattr(pipeline, "render_html", lambda executed, reports: reports / f"{executed.stem}.html")
    monkeypatch.setattr(pipeline, "write_index", lambda run: run.results_dir / "reports" / "index.html")
    return params, log, results, root, task, content, fail


def run(params: Path, log: list[str], **kw) -> list[str]:
    log.clear()
    pipeline.run_pipeline(str(params), **kw)
    return list(log)


ALL = [s.name for s in pipeline.STEPS]


def test_current_steps_are_skipped(fake):
    params, log, *_ = fake
    assert run(params, log) == ALL
    assert run(params, log) == []


def test_code_change_reruns(fake):
    params, log, _, root, *_ = fake
    run(params, log)
    (root / "saets_utils" / "mod.py").write_text("x = 2\n")  # a change of the package: every step
    assert run(params, log) == ALL
    (root / "notebooks" / "03_eval.ipynb").write_text('{"cells": []}')  # of 03's notebook: 03 and after
    assert run(params, log) == ["03_eval", "04_plots"]


def test_task_file_given_by_path_reruns_03(fake):
    params, log, _, _, task, *_ = fake
    run(params, log)
    task.write_text(task.read_text().replace("anger", "rage"))
    assert run(params, log) == ["03_eval", "04_plots"]


def test_upstream_rerun_alone_makes_later_steps_stale(fake):
    params, log, results, _, _, content, _ = fake
    run(params, log)
    content["value"] = "b"  # e.g. 01 run by hand with papermill after a change of the SAE files
    (results / "effects.safetensors").write_text("01_effects b")
    assert run(params, log) == ALL  # 01's outputs no longer match its stamp; 02-04 read new inputs
    content["value"] = "c"
    (results / "approximator.safetensors").write_text("02_train c")  # 02 re-run alone
    assert run(params, log) == ["02_train", "03_eval", "04_plots"]


def test_failed_step_drops_its_stamp_and_reruns(fake):
    params, log, results, _, _, content, fail = fake
    run(params, log)
    content["value"] = "b"
    fail["step"] = "03_eval"
    with pytest.raises(pipeline.StepFailed):
        run(params, log, force=True)
    assert not (results / "reports" / ".stamps" / "03_eval.json").exists()
    fail["step"] = None
    # same params, code and inputs as the stamp that 03 had before it failed: still re-run
    assert run(params, log) == ["03_eval", "04_plots"]
    assert run(params, log) == []


def test_stale_figures_do_not_survive(tmp_path):
    from saets_utils.report.figures import make_all_figures

    params = tmp_path / "run.yaml"
    params.write_text(yaml.safe_dump({"sae": {"hook_name": HOOK}, "results_root": str(tmp_path / "results")}))
    cfg = load_config(params)
    figs = cfg.results_dir / "figures"
    figs.mkdir(parents=True)
    for name in ("effect_profile_99.png", "published_comparison.png", "product_vs_scale.png"):
        (figs / name).write_bytes(b"old run")
    assert make_all_figures(cfg) == []  # this run has no files yet: nothing drawn, nothing stale kept
    assert list(figs.glob("*.png")) == []
