"""The files between stages: every file a run writes in ``results/<run>/``, which step writes it and
which later steps read it, in one table.

The names here are the stages' contract (notebook 01 writes ``effects.safetensors``, 02 reads it);
the rest of the package asks :class:`RunPaths` for a path instead of spelling a file name, so a
renamed file changes in one place. The pipeline's steps (``report/pipeline.py``), the manifest's
record of each step's files, ``publish`` and the table in ``docs/files.md`` are read from it.

Example:
    >>> paths = RunPaths(run.results_dir)  # or run.paths
    >>> paths.effects                      # results/<run>/effects.safetensors
    >>> RunPaths.effects.rel               # "effects.safetensors", relative to results/<run>/
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, overload

STEPS = ("01_effects", "02_train", "03_eval", "04_plots")


class _Rooted(Protocol):
    root: Path


class StageFile:
    """One file (or folder) of a run: ``rel`` (relative to its root), the step that writes it, a line
    saying what it holds, and its roles. Read on an instance of :class:`RunPaths` (or
    :class:`WorkPaths`) it is that file's :class:`~pathlib.Path`; read on the class it is this entry.

    ``read_by``: later pipeline steps that read it (its content enters their stamp, so a change re-runs
    them). ``marks_done``: the pipeline takes its step as current only while this output is unchanged.
    ``recorded``: the step's manifest entry records its digest (``manifest.record_step``).
    """

    attr: str  # the attribute's name in its class

    def __init__(
        self,
        rel: str,
        step: str,
        what: str,
        *,
        read_by: tuple[str, ...] = (),
        marks_done: bool = False,
        recorded: bool = False,
    ) -> None:
        self.rel, self.step, self.what = rel, step, what
        self.read_by, self.marks_done, self.recorded = read_by, marks_done, recorded

    @property
    def is_folder(self) -> bool:
        return not Path(self.rel).suffix

    @property
    def filename(self) -> str:
        """The last part of ``rel`` (e.g. ``targets.json`` of ``eval/targets.json``)."""
        return Path(self.rel).name

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> StageFile: ...
    @overload
    def __get__(self, obj: _Rooted, owner: type | None = None) -> Path: ...
    def __get__(self, obj: _Rooted | None, owner: type | None = None) -> StageFile | Path:
        return self if obj is None else obj.root / self.rel

    def __repr__(self) -> str:
        return f"StageFile({self.rel!r}, {self.step!r})"


_E, _T, _V, _P = STEPS
_STUDY = "study"  # python -m saets_utils.report.study (or 02's learning-curve cell), the diagnosis
_PIPE = "pipeline"  # python -m saets_utils.report.pipeline
_PUBLISH = "publish"  # python -m saets_utils.report.publish (in results/published/<run>/ only)
EFFECTS_WORK = "effects_work"


class WorkPaths:
    """01's resumable work folder, ``results/<run>/effects_work/`` (deleted by a restart): the plan,
    and the claims, shards and heartbeats of its workers. Workers know only this folder."""

    plan = StageFile(
        "plan.safetensors",
        _E,
        "what 01 measures: vector ids and vectors, loss chunks, baseline, unsteered loss, fingerprint",
    )
    run_config = StageFile("run_config.json", _E, "the validated params, read by worker subprocesses")
    attempts = StageFile("attempts", _E, "one JSON per attempt (plan id, inputs) and its workers")
    workers = StageFile("workers", _E, "heartbeats, one JSON per worker")
    claims = StageFile("claims", _E, "leases on blocks of vectors (a shared filesystem is enough)")
    shards = StageFile("shards", _E, "measured blocks, one safetensors file per block and worker")
    logs = StageFile("logs", _E, "worker subprocesses' logs")
    slurm = StageFile("slurm", _E, "submitit's logs of Slurm jobs (default effects.slurm.log_folder)")

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def attempt(self, attempt: str) -> Path:
        return self.attempts / f"{attempt}.json"

    def attempt_workers(self, attempt: str) -> Path:
        return self.attempts / f"{attempt}.workers.json"

    def heartbeat(self, worker: str) -> Path:
        return self.workers / f"{worker}.json"

    def shard(self, block: str, worker: str) -> Path:
        """A measured block: ``shards/<block key>.<worker>.safetensors``."""
        return self.shards / f"{block}.{worker}.safetensors"

    def log(self, worker: str) -> Path:
        return self.logs / f"{worker}.log"


class RunPaths:
    """Every file of ``results/<run>/`` by what it is; ``RunPaths.files()`` lists them with their
    roles. Build it from a folder (``RunPaths(run.results_dir)``, or ``run.paths``)."""

    # 01_effects
    effects = StageFile(
        "effects.safetensors",
        _E,
        "per vector: unit direction, calibrated scale, measured SAE effect and its two halves, calibration losses",
        read_by=(_T, _V, _P),
        marks_done=True,
        recorded=True,
    )
    baseline = StageFile(
        "baseline.safetensors",
        _E,
        "mean activation, density and halves of the SAE features on the unsteered rollouts",
        read_by=(_T, _V, _P),
        recorded=True,
    )
    effects_samples = StageFile(
        "effects_samples.safetensors",
        _E,
        "the token ids of each vector's steered rollouts (the effect explorer)",
        recorded=True,
    )
    effects_table = StageFile(
        "effects_table.csv",
        _E,
        "per vector: calibrated scale, status, seconds",
        read_by=(_T, _V, _P),
        marks_done=True,
        recorded=True,
    )
    effects_meta = StageFile(
        "effects_meta.json",
        _E,
        "settings, counts, unsteered loss, timing; names the merge the files above belong to",
        read_by=(_T, _V, _P),
        marks_done=True,
        recorded=True,
    )
    effects_work = StageFile(EFFECTS_WORK, _E, "01's resumable work: plan, claims, shards (WorkPaths)")
    effects_lock = StageFile(".effects_lock", _E, "01's lock (a lease): one parent process measures a run at a time")
    plan = StageFile(
        f"{EFFECTS_WORK}/{WorkPaths.plan.rel}",
        _E,
        "01's plan: its loss chunks and baseline calibrate and measure 03's targeting",
        read_by=(_V,),
    )
    features_dir = StageFile("features", _E, "feature statistics and labels (01's feature_stats), for dashboards")
    feature_stats = StageFile(
        "features/feature_stats.safetensors",
        _E,
        "the dashboards' numbers: density, max activation, top tokens and logits per feature",
    )
    feature_labels = StageFile(
        "features/labels.csv", _E, "per feature: label, density, max activation, top tokens and logits"
    )
    # 02_train
    approximator = StageFile(
        "approximator.safetensors",
        _T,
        "the effect approximator: W, b, correction, rotation",
        read_by=(_V, _P),
        marks_done=True,
        recorded=True,
    )
    approximator_metrics = StageFile(
        "approximator_metrics.json",
        _T,
        "held-out fit quality: MSE, R2 with its interval, noise ceiling, the fit's choices",
        read_by=(_V, _P),
        marks_done=True,
        recorded=True,
    )
    approximator_history = StageFile(
        "approximator_history.csv", _T, "the fit's history: ridge path, rank CV curve or Adam's epochs", recorded=True
    )
    approximator_holdout = StageFile(
        "approximator_holdout.safetensors",
        _T,
        "held-out vectors' predicted and measured effects (04's diagnostics)",
        read_by=(_V, _P),
        recorded=True,
    )
    # study: 02's learning-curve cell or python -m saets_utils.report.study; the diagnosis
    study_dir = StageFile("study", _STUDY, "design study and diagnosis tables")
    learning_curve = StageFile(
        "study/learning_curve.csv", _STUDY, "held-out R2 per training size and fit", read_by=(_P,)
    )
    reliability = StageFile("study/reliability.json", _STUDY, "split-half reliability and noise ceiling of the effects")
    extrapolation = StageFile(
        "study/extrapolation.csv", _STUDY, "training vectors each fit needs to reach half the ceiling"
    )
    learning_curve_plot = StageFile("study/learning_curve.png", _P, "the learning curve")
    # 03_eval
    eval_dir = StageFile("eval", _V, "03's outputs")
    samples = StageFile(
        "eval/samples.jsonl",
        _V,
        "every generation with its judge scores",
        read_by=(_P,),
        marks_done=True,
        recorded=True,
    )
    judge_stats = StageFile("eval/judge_stats.json", _V, "judge requests, failures, cache hits, notices", recorded=True)
    by_scale = StageFile(
        "eval/by_scale.csv",
        _V,
        "per task, method and scale: behaviour, coherence, product",
        read_by=(_P,),
        marks_done=True,
        recorded=True,
    )
    summary = StageFile(
        "eval/summary.csv",
        _V,
        "per task and method: the best product and its scale",
        read_by=(_P,),
        marks_done=True,
        recorded=True,
    )
    vectors = StageFile("eval/vectors.safetensors", _V, "every method's steering vector per task", recorded=True)
    targets = StageFile("eval/targets.json", _V, "each task's target features", recorded=True)
    targeting = StageFile(
        "eval/targeting.csv",
        _V,
        "per task and method: measured effect on the targets, target rank",
        read_by=(_P,),
        recorded=True,
    )
    targeting_summary = StageFile(
        "eval/targeting_summary.csv", _V, "targeting per method with bootstrap intervals", recorded=True
    )
    targeting_differences = StageFile(
        "eval/targeting_differences.csv", _V, "paired targeting differences between methods", recorded=True
    )
    targeting_effects = StageFile(
        "eval/targeting_effects.safetensors", _V, "the measured effects behind targeting.csv", recorded=True
    )
    battles = StageFile("eval/battles.jsonl", _V, "pairwise judge battles", recorded=True)
    battle_ratings = StageFile(
        "eval/battle_ratings.csv", _V, "Bradley-Terry ratings of the methods from the battles", recorded=True
    )
    battle_stats = StageFile("eval/battle_stats.json", _V, "battle counts and errors", recorded=True)
    judge_cache = StageFile("eval/judge_cache", _V, "the judge's reply cache (SQLite)")
    method_differences = StageFile(
        "eval/method_differences.csv", _PUBLISH, "paired method differences over tasks with intervals"
    )
    pooled_method_differences = StageFile(
        "eval/pooled_method_differences.csv",
        _PUBLISH,
        "the same, each task's value averaged over this run and the runs of --pool-with (replications)",
    )
    # 04_plots
    figures_dir = StageFile("figures", _P, "the paper's figures, one PNG each", marks_done=True)
    # the pipeline, the manifest, publish
    manifest = StageFile("manifest.json", _PIPE, "params, commit, versions, device; each step's files' digests")
    notebooks_dir = StageFile("notebooks", _PIPE, "the executed notebooks")
    reports_dir = StageFile("reports", _PIPE, "HTML reports: one per notebook, index.html, features.html")
    index_page = StageFile("reports/index.html", _PIPE, "settings, provenance, headline tables and figures")
    features_page = StageFile("reports/features.html", _PIPE, "feature dashboards")
    stamps_dir = StageFile("reports/.stamps", _PIPE, "one JSON per step: the inputs' and outputs' digests")
    published_list = StageFile("MANIFEST.txt", _PUBLISH, "every published file with its size")

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def work(self) -> WorkPaths:
        return WorkPaths(self.effects_work)

    def figure(self, name: str) -> Path:
        """``figures/<name>.png``."""
        return self.figures_dir / f"{name}.png"

    def report(self, step: str) -> Path:
        """``reports/<step>.html``: the executed notebook rendered."""
        return self.reports_dir / f"{step}.html"

    def executed_notebook(self, step: str) -> Path:
        return self.notebooks_dir / f"{step}.ipynb"

    def stamp(self, step: str) -> Path:
        return self.stamps_dir / f"{step}.json"

    def diagnosis(self, part: str = "", tag: str = "") -> Path:
        """``study/diagnosis{part}{tag}.csv`` (part: "", "_offline", "_summary", "_differences", with
        "_features" for the single-feature targets; tag: a replication's suffix)."""
        return self.study_dir / f"diagnosis{part}{tag}.csv"

    @classmethod
    def files(cls) -> Iterator[StageFile]:
        """Every entry, in the order of the stages."""
        return (v for v in vars(cls).values() if isinstance(v, StageFile))

    @classmethod
    def written_by(cls, step: str, *, recorded: bool = False, marks_done: bool = False) -> tuple[str, ...]:
        """``rel`` of the files ``step`` writes (only those it records, or that mark it done)."""
        return tuple(
            f.rel
            for f in cls.files()
            if f.step == step and (f.recorded or not recorded) and (f.marks_done or not marks_done)
        )

    @classmethod
    def read_by_step(cls, step: str) -> tuple[str, ...]:
        """``rel`` of the earlier steps' files that ``step`` reads."""
        return tuple(f.rel for f in cls.files() if step in f.read_by)


def markdown_table() -> str:
    """The table of ``docs/files.md``: every file of ``results/<run>/``, who writes and reads it."""
    lines = ["| file | written by | read by | what |", "|---|---|---|---|"]
    for f in RunPaths.files():
        name = f"`{f.rel}/`" if f.is_folder else f"`{f.rel}`"
        lines.append(f"| {name} | {f.step} | {', '.join(f.read_by) or '—'} | {f.what} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
