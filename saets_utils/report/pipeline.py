"""Run notebooks 01 -> 04 for one params file with papermill and render HTML reports.

``python -m saets_utils.report.pipeline params/demo.yaml`` executes each notebook into
``results/<run>/notebooks/``, renders it to ``results/<run>/reports/<name>.html`` and writes
``reports/index.html`` (settings and provenance, links, headline tables, figures; see
:mod:`saets_utils.report.index_page`) and ``reports/features.html`` (feature dashboards). A step is skipped when its outputs
exist and were made from the same settings as now (a stamp per step hashes the params that step
reads, its task files and the stamp of the step before); ``--force`` re-runs everything, ``--steps``
picks steps. A failure names the notebook, the cell and the error, and points at the executed copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from saets_utils.config import REPO_ROOT, RunConfig, load_config
from saets_utils.io_utils import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class Step:
    name: str
    outputs: tuple[str, ...]
    params_keys: tuple[str, ...]  # sections of the params this step's numbers depend on


STEPS = (
    Step(
        "01_effects",
        ("effects.safetensors", "effects_table.csv", "effects_meta.json"),
        ("seed", "model", "sae", "text", "effects"),
    ),
    Step("02_train", ("approximator.safetensors", "approximator_metrics.json"), ("approximator",)),
    Step("03_eval", ("eval/summary.csv", "eval/by_scale.csv", "eval/samples.jsonl"), ("eval",)),
    Step("04_plots", ("figures",), ()),
)


class StepFailed(RuntimeError):
    """A notebook failed; the message names it, the cell and the error."""


def _stamp_key(run: RunConfig, step: Step, previous: str) -> str:
    data = json.loads(run.model_dump_json())
    blob = {k: data.get(k) for k in step.params_keys}
    if step.name == "03_eval":
        blob["tasks"] = {
            t: (REPO_ROOT / "params" / "tasks" / f"{t}.yaml").read_text()
            for t in run.eval.tasks
            if (REPO_ROOT / "params" / "tasks" / f"{t}.yaml").is_file()
        }
    return hashlib.sha256((previous + json.dumps(blob, sort_keys=True, default=str)).encode()).hexdigest()[:16]


def _stamp_path(run: RunConfig, step: Step) -> Path:
    return run.results_dir / "reports" / ".stamps" / f"{step.name}.json"


def is_current(run: RunConfig, step: Step, key: str) -> bool:
    """Outputs exist and the stamp says they were made with the same settings."""
    outs = [run.results_dir / o for o in step.outputs]
    if not all(p.exists() and (p.is_file() or any(p.iterdir())) for p in outs):
        return False
    sp = _stamp_path(run, step)
    return sp.is_file() and json.loads(sp.read_text()).get("key") == key


def execute_notebook(run: RunConfig, step: Step, params_file: str, parameters: dict, timeout_s: int | None) -> Path:
    """Execute ``notebooks/<step>.ipynb`` with papermill into ``results/<run>/notebooks/``."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    out = run.results_dir / "notebooks" / f"{step.name}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(
            str(REPO_ROOT / "notebooks" / f"{step.name}.ipynb"),
            str(out),
            parameters={"params_file": params_file, **parameters},
            cwd=str(REPO_ROOT),
            kernel_name="python3",
            progress_bar=False,
            log_output=True,
            execution_timeout=timeout_s,
        )
    except PapermillExecutionError as e:
        raise StepFailed(
            f"notebook {step.name}.ipynb failed in cell {e.cell_index} (execution count {e.exec_count}): "
            f"{e.ename}: {e.evalue}\nexecuted copy with the traceback: {out}"
        ) from None
    return out


def render_html(executed: Path, reports: Path) -> Path:
    """An executed notebook as a standalone HTML page (widgets' state included)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    path = reports / f"{executed.stem}.html"
    atomic_write_text(path, body)
    return path


def write_index(run: RunConfig) -> Path:
    """``reports/index.html`` (settings, links, headline tables, figures) and the feature dashboards."""
    from saets_utils.report.index_page import write_index as write

    return write(run)


def run_pipeline(
    params_file: str, steps: list[str] | None = None, force: bool = False, gpus: int = 0, timeout_s: int | None = None
) -> Path:
    """Execute the selected steps in order (skipping current ones), render reports, write the index."""
    run = load_config(params_file)  # validates before anything runs
    reports = run.results_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in STEPS]
    unknown = set(steps or []) - set(names)
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)}; choose from {names}")
    key = ""
    for step in STEPS:
        key = _stamp_key(run, step, key)
        if steps and step.name not in steps:
            continue
        if not force and is_current(run, step, key):
            print(f"[saets] {step.name}: up to date, skipped", flush=True)
            continue
        print(f"[saets] {step.name}: running", flush=True)
        t0 = time.perf_counter()
        extra = {"gpus": gpus} if step.name == "01_effects" else {}
        executed = execute_notebook(run, step, params_file, extra, timeout_s)
        render_html(executed, reports)
        atomic_write_json(_stamp_path(run, step), {"key": key, "seconds": time.perf_counter() - t0})
        print(f"[saets] {step.name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    index = write_index(run)
    print(f"[saets] reports: {index}", flush=True)
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params_file", help="params/<run>.yaml")
    ap.add_argument("--steps", help="comma-separated subset, e.g. 03_eval,04_plots")
    ap.add_argument("--force", action="store_true", help="re-run steps even when their outputs are current")
    ap.add_argument("--gpus", type=int, default=0, help="01's worker count (see notebooks/01_effects.ipynb)")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    a = ap.parse_args(argv)
    try:
        run_pipeline(a.params_file, a.steps.split(",") if a.steps else None, a.force, a.gpus, a.timeout)
    except (StepFailed, ValueError, FileNotFoundError) as e:
        print(f"[saets] FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
