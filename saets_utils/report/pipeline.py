"""Run notebooks 01 -> 04 for one params file with papermill and render HTML reports.

``python -m saets_utils.report.pipeline params/demo.yaml`` executes each notebook into
``results/<run>/notebooks/``, renders it to ``results/<run>/reports/<name>.html`` and writes
``reports/index.html`` (settings and provenance, links, headline tables, figures; see
:mod:`saets_utils.report.index_page`) and ``reports/features.html`` (feature dashboards). A step is skipped when its outputs
are unchanged since it last succeeded and its inputs are the same as then. Its stamp hashes the
inputs' content: the params the step reads (and, chained, those of the steps before), the files of
earlier steps it reads, its task files, files the params point to, and the code (every module of
the package and the notebook). A step drops its stamp when it starts, so one that fails half-way is
re-run next time. ``--force`` re-runs everything, ``--steps`` picks steps. A failure names the
notebook, the cell and the error, and points at the executed copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saets_utils.config import REPO_ROOT, RunConfig, load_config
from saets_utils.io_utils import atomic_write_json, atomic_write_text
from saets_utils.paths import STEPS as NOTEBOOKS
from saets_utils.paths import RunPaths


@dataclass(frozen=True)
class Step:
    name: str
    outputs: tuple[str, ...]
    params_keys: tuple[str, ...]  # sections of the params this step's numbers depend on
    inputs: tuple[str, ...] = ()  # files of earlier steps it reads (content enters the stamp; may be absent)


# The sections of the params each step's numbers depend on; its outputs and inputs come from the
# table of a run's files (saets_utils/paths.py).
PARAMS_KEYS = {
    "01_effects": ("seed", "model", "sae", "text", "effects"),
    "02_train": ("approximator",),
    "03_eval": ("eval",),
    "04_plots": (),
}
STEPS = tuple(
    Step(s, RunPaths.written_by(s, marks_done=True), PARAMS_KEYS[s], RunPaths.read_by_step(s)) for s in NOTEBOOKS
)


class StepFailed(RuntimeError):
    """A notebook failed; the message names it, the cell and the error."""


def file_digest(path: Path) -> str:
    """sha256 of a file's content ("missing" if absent); a folder: of its files' names and digests."""
    if path.is_dir():
        parts = [f"{p.relative_to(path)}:{file_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    if not path.is_file():
        return "missing"
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_digest(step: Step) -> str:
    """sha256 of every module of the package and of the step's notebook: a code change re-runs it."""
    files = sorted((REPO_ROOT / "saets_utils").rglob("*.py")) + [REPO_ROOT / "notebooks" / f"{step.name}.ipynb"]
    return hashlib.sha256("".join(f"{p.relative_to(REPO_ROOT)}:{file_digest(p)}\n" for p in files).encode()).hexdigest()


def _params_files(run: RunConfig) -> list[str]:
    """Files and folders the params point to (a local model or SAE, a vectors file)."""
    return [p for p in (run.model.path, run.sae.path, run.effects.vectors.path) if p]


def _stamp_key(run: RunConfig, step: Step, previous: str) -> str:
    from saets_utils.config import task_file

    data = json.loads(run.model_dump_json())
    blob: dict[str, object] = {k: data.get(k) for k in step.params_keys}
    if step.name == "01_effects":  # where and how workers run does not change 01's numbers
        from saets_utils.effects.plan import NOT_FINGERPRINTED

        blob["effects"] = {k: v for k, v in data["effects"].items() if k not in NOT_FINGERPRINTED}
        blob["sae"] = {k: v for k, v in data["sae"].items() if k != "targets_key"}
        blob["files"] = {p: file_digest(REPO_ROOT / p) for p in _params_files(run)}
    if step.name == "03_eval":  # by name or by path, the content counts
        blob["tasks"] = {t: file_digest(task_file(t)) for t in run.eval.tasks}
    blob["inputs"] = {f: file_digest(run.results_dir / f) for f in step.inputs}
    blob["code"] = code_digest(step)
    return hashlib.sha256((previous + json.dumps(blob, sort_keys=True, default=str)).encode()).hexdigest()[:16]


def _stamp_path(run: RunConfig, step: Step) -> Path:
    return run.paths.stamp(step.name)


def _outputs_digest(run: RunConfig, step: Step) -> dict[str, str]:
    return {o: file_digest(run.results_dir / o) for o in step.outputs}


def is_current(run: RunConfig, step: Step, key: str) -> bool:
    """Outputs exist, are the ones the step wrote when it last succeeded, and its stamp key (the
    inputs' content) is the same as now."""
    outs = [run.results_dir / o for o in step.outputs]
    if not all(p.exists() and (p.is_file() or any(p.iterdir())) for p in outs):
        return False
    sp = _stamp_path(run, step)
    if not sp.is_file():
        return False
    stamp = json.loads(sp.read_text())
    return stamp.get("key") == key and stamp.get("outputs") == _outputs_digest(run, step)


def kernel_manager_kwargs() -> dict[str, Any]:
    """papermill's ``kernel_manager_class``: one that encrypts the kernel's local ZMQ channels with
    CurveZMQ where the kernel supports it (``transport_encryption = "auto"``), so ipykernel >= 7.3 does
    not warn "running over TCP without encryption" for every notebook; {} where jupyter_client has no
    such setting (older versions, which do not warn either)."""
    import traitlets
    from jupyter_client.manager import AsyncKernelManager

    if "transport_encryption" not in AsyncKernelManager.class_trait_names():
        return {}

    class EncryptedKernelManager(AsyncKernelManager):
        transport_encryption = traitlets.CaselessStrEnum(["disabled", "auto", "required"], default_value="auto").tag(
            config=True
        )

    return {"kernel_manager_class": EncryptedKernelManager}


def execute_notebook(run: RunConfig, step: Step, *, params_file: str, parameters: dict, timeout_s: int | None) -> Path:
    """Execute ``notebooks/<step>.ipynb`` with papermill into ``results/<run>/notebooks/``."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    out = run.paths.executed_notebook(step.name)
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
            **kernel_manager_kwargs(),
        )
    except PapermillExecutionError as e:
        raise StepFailed(
            f"notebook {step.name}.ipynb failed in cell {e.cell_index} (execution count {e.exec_count}): "
            f"{e.ename}: {e.evalue}\nexecuted copy with the traceback: {out}"
        ) from None
    return out


def render_html(executed: Path, path: Path) -> Path:
    """An executed notebook as a standalone HTML page (widgets' state included) at ``path``."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    atomic_write_text(path, body)
    return path


def write_index(run: RunConfig) -> Path:
    """``reports/index.html`` (settings, links, headline tables, figures) and the feature dashboards."""
    from saets_utils.report.index_page import write_index as write

    return write(run)


def run_pipeline(
    params_file: str,
    *,
    steps: list[str] | None = None,
    force: bool = False,
    gpus: int = 0,
    timeout_s: int | None = None,
    workers: dict | None = None,
) -> Path:
    """Execute the selected steps in order (skipping current ones), render reports, write the index.
    ``workers``: more of 01's worker parameters (``cpu_workers``, ``executor``, ``slurm``)."""
    from saets_utils.steering.tasks import load_tasks

    workers = workers or {}
    overrides = {"cpu_workers": workers.get("cpu_workers", 0), "effects": {"slurm": workers.get("slurm", {})}}
    if workers.get("executor"):
        overrides["effects"]["executor"] = workers["executor"]
    run = load_config(params_file, overrides)  # validates before anything runs
    load_tasks(run.eval.tasks)  # and every task file in full, before 01's hours
    reports = run.paths.reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in STEPS]
    unknown = set(steps or []) - set(names)
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)}; choose from {names}")
    key = ""
    for step in STEPS:
        key = _stamp_key(run, step, key)  # inputs as they are now, after the steps before ran
        if steps and step.name not in steps:
            continue
        if not force and is_current(run, step, key):
            print(f"[saets] {step.name}: up to date, skipped", flush=True)
            continue
        print(f"[saets] {step.name}: running", flush=True)
        t0 = time.perf_counter()
        _stamp_path(run, step).unlink(missing_ok=True)  # a step that fails half-way is not current
        run.paths.report(step.name).unlink(missing_ok=True)
        extra = {"gpus": gpus, **workers} if step.name == "01_effects" else {}
        try:
            executed = execute_notebook(run, step, params_file=params_file, parameters=extra, timeout_s=timeout_s)
        except BaseException:
            run.paths.index_page.unlink(missing_ok=True)  # no report of an earlier run stands beside a failure
            raise
        render_html(executed, run.paths.report(step.name))
        stamp = {"key": key, "outputs": _outputs_digest(run, step), "seconds": time.perf_counter() - t0}
        atomic_write_json(_stamp_path(run, step), stamp)
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
    ap.add_argument("--cpu-workers", type=int, default=0, help="01 on N CPU worker subprocesses instead")
    ap.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    sl = ap.add_argument_group("Slurm (01's workers as submitit jobs; docs/slurm.md)")
    sl.add_argument("--executor", choices=["local", "slurm"], help="default: effects.executor of the params")
    sl.add_argument("--partition")
    sl.add_argument("--account")
    sl.add_argument("--gpus-per-task", type=int)
    sl.add_argument("--tasks", type=int, help="number of worker jobs (a job array)")
    sl.add_argument("--time-min", type=int, help="time limit per job, minutes")
    sl.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE", help="extra sbatch option")
    sl.add_argument("--log-folder", help="submitit logs (default results/<run>/effects_work/slurm)")
    a = ap.parse_args(argv)
    slurm = {
        k: getattr(a, k)
        for k in ("partition", "account", "gpus_per_task", "tasks", "time_min", "log_folder")
        if getattr(a, k) is not None
    }
    bad = [o for o in a.sbatch if "=" not in o]
    if bad:
        ap.error(f"--sbatch takes KEY=VALUE, got {bad}")
    if a.sbatch:
        slurm["sbatch"] = dict(o.split("=", 1) for o in a.sbatch)
    workers = {"cpu_workers": a.cpu_workers, "executor": a.executor, "slurm": slurm}
    try:
        steps = a.steps.split(",") if a.steps else None
        run_pipeline(a.params_file, steps=steps, force=a.force, gpus=a.gpus, timeout_s=a.timeout, workers=workers)
    except (StepFailed, ValueError, FileNotFoundError) as e:  # ConfigError and TaskError are ValueErrors
        print(f"[saets] FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
