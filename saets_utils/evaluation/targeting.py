"""Judge-free targeting: does a task's steering vector move the task's target SAE features?

The paper's case for SAE-TS is that its vectors change the features they aim at and few others.
This module measures that directly, with notebook 01's machinery and no judge: every vector of
notebook 03 (one per task and vector-building method; ``prompt`` has none) is

1. calibrated to the run's common loss target exactly as 01 calibrates decoder rows
   (:func:`effects.calibration.calibrate_scales` on 01's loss chunks, ``effects.scale_grid``,
   ``effects.loss_target``), so all methods are compared at the same cost in LM loss;
2. measured with :func:`effects.measure.measure_effects` against 01's unsteered baseline (the run's plan,
   ``results/<run>/effects_work/plan.safetensors``), seeded with the run seed and a synthetic vector
   id per (task, method) that cannot collide with 01's ids (:func:`targeting_vector_id`; with
   ``effects.common_random_numbers`` the seeds do not depend on ids, as in 01);
3. scored against the task's target features with :func:`targeting_metrics`. All methods of a
   task are scored against one target list: the one the SAE-based methods use (SAE-TS's, which
   equals SAE's, pinverse's and rotation's unless the task file gives method-specific lists);
   FGAA is scored against it too, not against its own contrastive target.

Writes ``results/<run>/eval/``: ``targeting.csv`` (one row per task and method),
``targeting_summary.csv`` (per method: median and geometric-mean rank and median ratio over tasks,
with bootstrap CIs over tasks; the older arithmetic means beside them), ``targeting_differences.csv``
(each method against SAE, paired over tasks: :func:`targeting_differences`) and
``targeting_effects.safetensors`` (the measured effects, for profiles).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saets_utils.config import ConfigError, RunConfig, eval_seed
from saets_utils.paths import RunPaths
from saets_utils.registry import METHODS, REGISTRY

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from saets_utils.effects.plan import Plan
    from saets_utils.evaluation.task_vectors import TaskVectors


# Synthetic vector ids of targeting vectors: OFFSET + a hash of (task, method) below SPAN. Rollout
# seeds take integer keys modulo 2**32 (steering.generation.row_seed), so OFFSET + SPAN stays below 2**31: the
# ids never alias a decoder-row or file id of 01 (all below OFFSET) nor each other.
TARGETING_ID_OFFSET = 1_000_000_000
TARGETING_ID_SPAN = 2**30
# Where the task's single target list is taken from, in order of preference: SAE-TS's, then the
# other methods built from the task's target features in registry order (SAE, pinverse, rotation).
TARGET_SOURCE_ORDER: tuple[str, ...] = (
    "SAE-TS",
    *(m.name for m in REGISTRY if m.targets == "task" and m.name != "SAE-TS"),
)
_VECTORLESS = frozenset(m.name for m in REGISTRY if not m.vector)  # the prompt baseline
METRIC_COLUMNS = (
    "target_effect",
    "target_effect_se",
    "target_rank",
    "target_rank_mean",
    "best_target",
    "off_target_norm",
    "ratio",
)
COLUMNS = (
    "task",
    "method",
    "vector_id",
    "scale",
    "status",
    "targets",
    "targets_from",
    "n_targets",
    *METRIC_COLUMNS,
    "d_sae",
)
SUMMARY_COLUMNS = (
    "method",
    "n_tasks",
    "median_rank",
    "median_rank_ci_low",
    "median_rank_ci_high",
    "geomean_rank",
    "geomean_rank_ci_low",
    "geomean_rank_ci_high",
    "median_ratio",
    "median_ratio_ci_low",
    "median_ratio_ci_high",
    "mean_rank",
    "rank_ci_low",
    "rank_ci_high",
    "mean_rank_weighted",
    "mean_ratio",
    "ratio_ci_low",
    "ratio_ci_high",
    "mean_target_effect",
)
DIFFERENCE_COLUMNS = (
    "method",
    "baseline",
    "n_tasks",
    "mean_log_rank_diff",
    "rank_ratio",
    "rank_ratio_ci_low",
    "rank_ratio_ci_high",
    "rank_ratio_excludes_1",
    "n_tasks_ratio",
    "ratio_diff",
    "ratio_diff_ci_low",
    "ratio_diff_ci_high",
    "ratio_diff_excludes_0",
)
# The method every other one is compared with in targeting_differences.csv: plain SAE decoder rows,
# the vectors SAE-TS and the other SAE-based methods set out to improve on.
DIFFERENCE_BASELINE = "SAE"


# --- the metric ---------------------------------------------------------------------------------


def _ranks_desc(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """1-based rank of ``x[idx]`` when ``x`` is sorted descending; ties share the mean rank."""
    xs = np.sort(x)
    greater = len(x) - np.searchsorted(xs, x[idx], side="right")
    ties = np.searchsorted(xs, x[idx], side="right") - np.searchsorted(xs, x[idx], side="left")
    return 1.0 + greater + (ties - 1) / 2.0


def targeting_metrics(effect: Any, targets: Sequence[tuple[int, float]], halves: Any | None = None) -> dict[str, float]:
    """How well one measured effect ``[d_sae]`` hits ``targets`` ``[(feature id, weight), ...]``.

    Weights say which way each target should move: a negative weight asks for a decrease. With
    ``s_i = sign(w_i)`` and ``W = sum_i |w_i|``:

    - ``target_effect``: ``sum_i w_i * effect[i] / W``, the weighted mean effect on the targets (for
      positive weights exactly the weighted mean); positive = moved the way the targets ask;
    - ``target_rank``: rank (1 = largest) of the best target feature when all ``d_sae`` features are
      sorted by ``s_i * effect``, descending (for positive weights: by effect); ties share the
      mean rank, so a target among many unmoved features is not ranked 1 by accident;
      ``target_rank_mean``: the ``|w|``-weighted mean of the targets' ranks; ``best_target``: its id;
    - ``off_target_norm``: L2 norm of the effect with the target features set to 0;
    - ``ratio``: ``target_effect / off_target_norm`` (±inf if nothing moved off target, NaN if
      nothing moved at all); its sign is the sign of ``target_effect``;
    - ``target_effect_se`` (only with ``halves [2, d_sae]``, the effect measured on each half of the
      rollouts): ``|t0 - t1| / 2``, where ``t_h`` is ``target_effect`` of half ``h``. For the mean
      of two independent measurements ``(t0 - t1)^2 / 2`` estimates each one's variance, so
      ``|t0 - t1| / 2`` estimates the standard error of their mean. It rests on one degree of
      freedom: a crude, noisy SE, good for flagging effects that are mostly noise, not for tests.
      NaN without halves or when a half is missing (one sample per prompt).

    A NaN anywhere in ``effect`` (a vector that could not be calibrated) gives NaN metrics.
    """
    from saets_utils.evaluation.methods import target_vector

    e = _as_numpy(effect).ravel()
    d_sae = e.shape[0]
    w_dense = target_vector(list(targets), d_sae, dtype=torch.float64).numpy()  # validates ids and weights
    ids = np.nonzero(w_dense)[0]
    w = w_dense[ids]
    out: dict[str, float] = {k: math.nan for k in METRIC_COLUMNS}
    if halves is not None:
        h = _as_numpy(halves).reshape(2, d_sae)
        t_h = (h[:, ids] * w).sum(-1) / np.abs(w).sum()
        out["target_effect_se"] = float(abs(t_h[0] - t_h[1]) / 2)
    if not np.isfinite(e).all():
        return out
    target_effect = float((e[ids] * w).sum() / np.abs(w).sum())
    ranks = np.empty(len(ids))
    for sign in (1.0, -1.0):
        sel = np.sign(w) == sign
        if sel.any():
            ranks[sel] = _ranks_desc(sign * e, ids[sel])
    best = int(np.argmin(ranks))
    off = e.copy()
    off[ids] = 0.0
    off_norm = float(np.linalg.norm(off))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.float64(target_effect) / np.float64(off_norm))
    out.update(
        target_effect=target_effect,
        target_rank=float(ranks[best]),
        target_rank_mean=float((ranks * np.abs(w)).sum() / np.abs(w).sum()),
        best_target=float(ids[best]),
        off_target_norm=off_norm,
        ratio=ratio,
    )
    return out


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# --- which vectors, which targets ---------------------------------------------------------------


@dataclass
class TargetingItem:
    """One vector to score: ``task``, ``method``, unit ``vector [d_model]``, the task's ``targets``
    and which method's list they are (``targets_from``; ``resolved`` if none was given)."""

    task: str
    method: str
    vector: Tensor
    targets: list[tuple[int, float]]
    targets_from: str
    vector_id: int = -1


def targeting_vector_id(task: str, method: str) -> int:
    """Synthetic id (rollout seed key) of the vector of ``(task, method)``: stable across runs and
    subsets of tasks, never one of 01's ids (see ``TARGETING_ID_OFFSET``)."""
    return TARGETING_ID_OFFSET + zlib.crc32(f"{task}\0{method}".encode()) % TARGETING_ID_SPAN


def _assign_ids(items: list[TargetingItem]) -> None:
    used: set[int] = set()
    for it in items:
        vid = targeting_vector_id(it.task, it.method)
        while vid in used:  # a hash collision: the next free id (still in range, still not 01's)
            vid = TARGETING_ID_OFFSET + (vid - TARGETING_ID_OFFSET + 1) % TARGETING_ID_SPAN
        used.add(vid)
        it.vector_id = vid


def task_targets(tv: TaskVectors) -> tuple[list[tuple[int, float]], str] | None:
    """The task's one target list from the lists 03 recorded (see ``TARGET_SOURCE_ORDER``), or None."""
    for m in TARGET_SOURCE_ORDER:
        if tv.targets.get(m):
            return [(int(f), float(w)) for f, w in tv.targets[m]], m
    return None


def _read_eval_vectors(run: RunConfig, path: Path | None = None) -> dict[str, TaskVectors]:
    """TaskVectors rebuilt from 03's ``eval/vectors.safetensors`` and ``eval/targets.json``."""
    from safetensors.torch import load_file

    path = path or run.paths.vectors
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run notebooks/03_eval.ipynb (evaluate_run) first")
    return _from_flat(load_file(path), path.parent / RunPaths.targets.filename)


def _from_flat(vectors: Mapping[str, Any], targets_json: Path) -> dict[str, TaskVectors]:
    """``{"task/method": vector}`` plus 03's ``targets.json`` (if it exists) -> ``{task: TaskVectors}``."""
    from saets_utils.evaluation.task_vectors import TaskVectors

    out: dict[str, TaskVectors] = {}
    for key, v in vectors.items():
        task, method = key.rsplit("/", 1)
        out.setdefault(task, TaskVectors(task=task)).vectors[method] = torch.as_tensor(v).float()
    if targets_json.is_file():
        for rec in json.loads(targets_json.read_text()):
            if rec["task"] in out:
                out[rec["task"]].targets[rec["method"]] = [(int(f), float(w)) for f, w in json.loads(rec["targets"])]
    return out


def collect_items(
    run: RunConfig, model: HookedTransformer, sae: SAE, task_vectors: Mapping[str, Any] | str | Path | None = None
) -> list[TargetingItem]:
    """Every (task, method) vector to score, with the task's targets, in task then method order.

    ``task_vectors``: ``{task: TaskVectors}`` (what 03 built), ``{"task/method": vector}`` (the
    contents of ``eval/vectors.safetensors``; targets then come from ``eval/targets.json``), a path to
    such a file, or None for this run's file. A task with no recorded SAE-based targets (e.g. only
    CAA was evaluated) gets them from :func:`task_vectors.resolve_targets`, as 03 would have chosen them.
    """
    from saets_utils.evaluation.task_vectors import TaskVectors

    if task_vectors is None or isinstance(task_vectors, (str, Path)):
        tvs = _read_eval_vectors(run, None if task_vectors is None else Path(task_vectors))
    elif all(isinstance(v, TaskVectors) for v in task_vectors.values()):
        tvs = dict(task_vectors)
    else:
        tvs = _from_flat(task_vectors, run.paths.targets)
    order = {m: i for i, m in enumerate(METHODS)}
    ctx = None
    items: list[TargetingItem] = []
    for name, tv in tvs.items():
        methods = sorted((m for m in tv.vectors if m not in _VECTORLESS), key=lambda m: order.get(m, len(order)))
        if not methods:
            continue
        found = task_targets(tv)
        if found is None:
            from saets_utils.evaluation.task_vectors import load_context, resolve_targets
            from saets_utils.steering.tasks import load_task

            ctx = ctx or load_context(run, model, sae, require_approximator=False)
            found = (resolve_targets(load_task(name), ctx)[0][TARGET_SOURCE_ORDER[0]], "resolved")
        targets, source = found
        for m in methods:
            v = tv.vectors[m].detach().float().cpu()
            items.append(TargetingItem(name, m, v / v.norm(), targets, source))
    _assign_ids(items)
    return items


# --- measurement --------------------------------------------------------------------------------


def load_plan(run: RunConfig, sae: SAE) -> Plan:
    """01's plan (loss chunks, unsteered loss, baseline), checked against the current effects settings
    and inputs (``sae``: the run's SAE, whose weights the plan's fingerprint covers)."""
    from saets_utils.effects.plan import Plan, fingerprint, input_digests

    path = run.paths.plan
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: targeting reuses 01's loss chunks and baseline; run "
            "notebooks/01_effects.ipynb first (or set eval.targeting: false)"
        )
    plan = Plan.load(path)
    fp = fingerprint(run, input_digests(run, sae))
    if plan.fingerprint != fp:
        raise ConfigError(
            f"{path} was made with other effects settings or inputs (fingerprint {plan.fingerprint} != "
            f"{fp}); re-run notebooks/01_effects.ipynb with these params "
            "(or set eval.targeting: false)"
        )
    return plan


@dataclass
class Measured:
    """01's measurement of unit vectors: ``effects [n, d_sae]``, ``halves [n, 2, d_sae]``, calibrated
    ``scales [n]`` and calibration ``status`` (NaN effects where no scale was found)."""

    effects: Tensor
    halves: Tensor
    scales: Tensor
    status: list[str]


@torch.no_grad()
def measure_vectors(
    run: RunConfig,
    model: HookedTransformer,
    sae: SAE,
    plan: Plan,
    jobs: Mapping[int, tuple[Tensor, Sequence[int]]],
    *,
    progress: bool = True,
    desc: str = "targeting (vectors)",
) -> dict[int, Measured]:
    """Calibrate and measure unit vectors as 01 measures decoder rows, against 01's ``plan``.

    ``jobs``: per rollout seed, ``(vectors [n, d_model], vector ids)``; the loss chunks' activations
    and the calibration's starting scale are computed once for all of them. Blocks of
    ``effects.vectors_per_batch`` go through :func:`effects.runner.calibrate_and_measure`.
    """
    from saets_utils.effects.calibration import resid_at_hook
    from saets_utils.effects.runner import calibrate_and_measure, plan_scale_hint, rollout_spec
    from saets_utils.models.loading import bos_id
    from saets_utils.progress import progress as progress_bar

    d_sae = int(plan.baseline_mean.shape[0])
    out: dict[int, Measured] = {}
    total = sum(len(ids) for _, ids in jobs.values())
    if total:
        spec = rollout_spec(run, model, bos_id(model, run.model))
        resid = resid_at_hook(model, run.sae.hook_name, plan.loss_tokens)
        hint = plan_scale_hint(run, model, sae, plan, resid=resid)
        bar = progress_bar(total=total, desc=desc, unit="vec", disable=not progress)
    k = run.effects.vectors_per_batch
    for seed, (vectors, ids) in jobs.items():
        n = len(ids)
        m = Measured(
            torch.full((n, d_sae), float("nan")),
            torch.full((n, 2, d_sae), float("nan")),
            torch.full((n,), float("nan")),
            [""] * n,
        )
        run_s = run if seed == run.seed else run.model_copy(update={"seed": int(seed)})
        for lo in range(0, n, k):
            vecs = vectors[lo : lo + k].to(model.cfg.device)
            res = calibrate_and_measure(
                run_s,
                model,
                sae,
                plan,
                resid=resid,
                spec=spec,
                vectors=vecs,
                vector_ids=list(ids[lo : lo + k]),
                keep_samples=1,
                hint=hint,
            )
            hi = lo + vecs.shape[0]
            m.scales[lo:hi] = res.calibration.scales
            m.status[lo:hi] = res.calibration.status
            m.effects[lo:hi] = res.effects
            m.halves[lo:hi] = res.halves
            bar.update(vecs.shape[0])
        out[seed] = m
    if total:
        bar.close()
    return out


@torch.no_grad()
def measure_targeting(
    run: RunConfig,
    model: HookedTransformer,
    sae: SAE,
    *,
    task_vectors: Mapping[str, Any] | str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Calibrate, measure and score every (task, method) vector (module docstring); writes
    ``eval/targeting.csv``, ``eval/targeting_summary.csv``, ``eval/targeting_differences.csv`` and
    ``eval/targeting_effects.safetensors`` and returns the per-vector table (columns ``COLUMNS``)."""
    from saets_utils.io_utils import atomic_save_safetensors, atomic_write_text

    plan = load_plan(run, sae)
    items = collect_items(run, model, sae, task_vectors)
    out = run.paths
    out.eval_dir.mkdir(parents=True, exist_ok=True)
    d_sae = int(plan.baseline_mean.shape[0])
    vecs = torch.stack([it.vector for it in items]) if items else torch.zeros(0, model.cfg.d_model)
    seed = eval_seed(run)
    got = measure_vectors(run, model, sae, plan, {seed: (vecs, [it.vector_id for it in items])}, progress=progress)[
        seed
    ]
    effects, halves, scales, status = got.effects, got.halves, got.scales, got.status
    records = []
    for i, it in enumerate(items):
        m = targeting_metrics(effects[i], it.targets, halves[i])
        records.append(
            {
                "task": it.task,
                "method": it.method,
                "vector_id": it.vector_id,
                "scale": float(scales[i]),
                "status": status[i],
                "targets": json.dumps([[f, w] for f, w in it.targets]),
                "targets_from": it.targets_from,
                "n_targets": len(it.targets),
                **m,
                "d_sae": d_sae,
            }
        )
    df = pd.DataFrame(records, columns=list(COLUMNS))
    atomic_write_text(out.targeting, df.to_csv(index=False))
    summ = targeting_summary(df, n_boot=run.eval.bootstrap, seed=run.seed)
    atomic_write_text(out.targeting_summary, summ.to_csv(index=False))
    diff = targeting_differences(df, n_boot=run.eval.bootstrap, seed=run.seed)
    atomic_write_text(out.targeting_differences, diff.to_csv(index=False))
    atomic_save_safetensors(
        {
            "effects": effects.contiguous(),
            "effect_halves": halves.contiguous(),
            "scales": scales,
            "vector_ids": torch.tensor([it.vector_id for it in items], dtype=torch.int64),
        },
        out.targeting_effects,
        {"rows": json.dumps([[it.task, it.method] for it in items])},
    )
    return df


# --- summary ------------------------------------------------------------------------------------


def _boot_ci(
    x: np.ndarray, n_boot: int, rng: np.random.Generator, ci: float, stats: Mapping[str, Any]
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of several statistics of ``x`` (one value per task) from one set of
    resamples of the tasks: ``{name: (low, high)}`` for each ``stats[name]``, a reduction taking
    ``axis=1``. NaN bounds with fewer than 2 values or ``n_boot <= 0``."""
    if n_boot <= 0 or len(x) < 2:
        return {k: (math.nan, math.nan) for k in stats}
    resampled = x[rng.integers(0, len(x), size=(n_boot, len(x)))]
    out = {}
    for k, f in stats.items():
        lo, hi = np.percentile(f(resampled, axis=1), [50 * (1 - ci), 50 * (1 + ci)])
        out[k] = (float(lo), float(hi))
    return out


def _boot_mean_ci(x: np.ndarray, n_boot: int, rng: np.random.Generator, ci: float) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``x``, resampling its entries (NaN as in :func:`_boot_ci`)."""
    return _boot_ci(x, n_boot, rng, ci, {"mean": np.mean})["mean"]


def _geomean(x: np.ndarray, axis: int | None = None) -> Any:
    return np.exp(np.log(x).mean(axis=axis))


def _finite_mean(x: pd.Series) -> float:
    v = x.to_numpy(float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def _finite_geomean(x: pd.Series) -> float:
    v = x.to_numpy(float)
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) == 1:
        return float(v[0])  # exact, no round trip through log
    return float(_geomean(v)) if len(v) else math.nan


def per_task(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, task): several rows of a task and method (replicates, e.g. measurements
    with another seed) are averaged first, ranks on the log scale (``target_rank`` and
    ``target_rank_mean`` become their geometric means, ``log_rank`` the mean log rank), ``ratio`` and
    ``target_effect`` arithmetically; non-finite values are left out of each average (NaN if none is
    left). With one row per task and method this changes nothing but adds ``log_rank``."""
    how = {"target_rank": _finite_geomean, "target_rank_mean": _finite_geomean}
    how |= {"ratio": _finite_mean, "target_effect": _finite_mean}
    d = df[["method", "task", *(c for c in how if c in df)]].copy()
    for c in how:
        if c not in d:
            d[c] = math.nan
    out = d.groupby(["method", "task"], sort=False).agg(how).reset_index()
    out["log_rank"] = np.log(out["target_rank"].to_numpy(float))
    return out


def _method_order(df: pd.DataFrame) -> list[str]:
    present = list(pd.unique(df["method"])) if len(df) else []
    return [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]


def targeting_summary(df: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Per method (project order), over the tasks with a finite best-target rank (``n_tasks``;
    replicates of a task are averaged first, see :func:`per_task`):

    - ``median_rank`` and ``geomean_rank`` (``exp(mean(log rank))``), the headline numbers: ranks
      are heavy-tailed (a few tasks at rank ~10^4 drag an arithmetic mean far above the typical
      task), so these describe a method's typical task; ``median_ratio``: the median
      target/off-target ratio;
    - each with a percentile bootstrap CI (``*_ci_low``, ``*_ci_high``, level ``ci``) that resamples
      tasks; each method draws its own stream from ``seed``, and all rank statistics of a method share
      one set of resamples, as do all ratio statistics; NaN with fewer than 2 tasks or ``n_boot = 0``;
    - the arithmetic ``mean_rank`` (CI ``rank_ci_low``/``rank_ci_high``), ``mean_ratio`` (CI
      ``ratio_ci_low``/``ratio_ci_high``), ``mean_rank_weighted`` and ``mean_target_effect``, kept
      for continuity; read them with the tail in mind.

    Infinite ratios (nothing moved off target) are left out of the ratio statistics."""
    rows = []
    tasks = per_task(df)
    for m in _method_order(df):
        sub = tasks[tasks["method"] == m]
        rank = sub["target_rank"].to_numpy(float)
        rank = rank[np.isfinite(rank)]
        ratio = sub["ratio"].to_numpy(float)
        ratio = ratio[np.isfinite(ratio)]
        rng = np.random.default_rng([seed, zlib.crc32(f"targeting\0{m}".encode())])
        r_ci = _boot_ci(rank, n_boot, rng, ci, {"mean": np.mean, "median": np.median, "geomean": _geomean})
        q_ci = _boot_ci(ratio, n_boot, rng, ci, {"mean": np.mean, "median": np.median})
        wr = sub["target_rank_mean"].to_numpy(float)
        te = sub["target_effect"].to_numpy(float)
        has_rank, has_ratio = len(rank) > 0, len(ratio) > 0
        rows.append(
            {
                "method": m,
                "n_tasks": len(rank),
                "median_rank": float(np.median(rank)) if has_rank else math.nan,
                "median_rank_ci_low": r_ci["median"][0],
                "median_rank_ci_high": r_ci["median"][1],
                "geomean_rank": float(_geomean(rank)) if has_rank else math.nan,
                "geomean_rank_ci_low": r_ci["geomean"][0],
                "geomean_rank_ci_high": r_ci["geomean"][1],
                "median_ratio": float(np.median(ratio)) if has_ratio else math.nan,
                "median_ratio_ci_low": q_ci["median"][0],
                "median_ratio_ci_high": q_ci["median"][1],
                "mean_rank": float(rank.mean()) if has_rank else math.nan,
                "rank_ci_low": r_ci["mean"][0],
                "rank_ci_high": r_ci["mean"][1],
                "mean_rank_weighted": float(np.nanmean(wr)) if np.isfinite(wr).any() else math.nan,
                "mean_ratio": float(ratio.mean()) if has_ratio else math.nan,
                "ratio_ci_low": q_ci["mean"][0],
                "ratio_ci_high": q_ci["mean"][1],
                "mean_target_effect": float(np.nanmean(te)) if np.isfinite(te).any() else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def _paired_mean_ci(d: np.ndarray, n_boot: int, rng: np.random.Generator, ci: float) -> tuple[float, float, float]:
    """Mean of the per-task differences ``d`` and its percentile bootstrap CI over tasks."""
    lo, hi = _boot_mean_ci(d, n_boot, rng, ci)
    return (float(d.mean()) if len(d) else math.nan), lo, hi


def targeting_differences(
    df: pd.DataFrame, *, baseline: str = DIFFERENCE_BASELINE, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> pd.DataFrame:
    """Each method (project order) against ``baseline``, paired over the tasks both were scored on.

    Replicates of a (task, method) (e.g. two measurement seeds) are averaged first (:func:`per_task`:
    the mean of their log ranks, the mean of their ratios). Then, over the tasks where both methods
    have a finite value:

    - ``mean_log_rank_diff``: mean over tasks of ``log rank[method] - log rank[baseline]``, and
      ``rank_ratio = exp(mean_log_rank_diff)``, the ratio of the two geometric-mean ranks over the
      paired tasks (``n_tasks``): 2 = the method's targets rank twice as far down (worse), 0.5 =
      twice as high (better); CI ``rank_ratio_ci_low``/``high`` = exp of the CI of the mean log
      difference; ``rank_ratio_excludes_1``: the CI lies wholly above or below 1;
    - ``ratio_diff``: mean over tasks (``n_tasks_ratio``; infinite ratios left out) of
      ``ratio[method] - ratio[baseline]`` (target/off-target ratio; positive = the method is better
      targeted), CI ``ratio_diff_ci_low``/``high``, ``ratio_diff_excludes_0``.

    CIs are percentile bootstraps (level ``ci``) that resample tasks and keep each task's pair
    together; each method draws its own stream from ``seed``. With fewer than 2 paired tasks or
    ``n_boot = 0`` the CIs are NaN and the ``excludes`` columns False. The baseline gets no row; the
    table is empty if the baseline was not scored."""
    tasks = per_task(df)
    rows = []
    if baseline in set(tasks["method"]):
        base = tasks[tasks["method"] == baseline].set_index("task")
        for m in _method_order(df):
            if m == baseline:
                continue
            sub = tasks[tasks["method"] == m].set_index("task")
            common = sub.index.intersection(base.index)
            rng = np.random.default_rng([seed, zlib.crc32(f"targeting-diff\0{m}\0{baseline}".encode())])
            out: dict[str, Any] = {"method": m, "baseline": baseline}
            d = (sub.loc[common, "log_rank"] - base.loc[common, "log_rank"]).to_numpy(float)
            d = d[np.isfinite(d)]
            mean, lo, hi = _paired_mean_ci(d, n_boot, rng, ci)
            out.update(
                n_tasks=len(d),
                mean_log_rank_diff=mean,
                rank_ratio=math.exp(mean) if len(d) else math.nan,
                rank_ratio_ci_low=math.exp(lo) if np.isfinite(lo) else math.nan,
                rank_ratio_ci_high=math.exp(hi) if np.isfinite(hi) else math.nan,
                rank_ratio_excludes_1=bool(lo > 0 or hi < 0),
            )
            q = (sub.loc[common, "ratio"] - base.loc[common, "ratio"]).to_numpy(float)
            q = q[np.isfinite(q)]
            mean, lo, hi = _paired_mean_ci(q, n_boot, rng, ci)
            out.update(
                n_tasks_ratio=len(q),
                ratio_diff=mean,
                ratio_diff_ci_low=lo,
                ratio_diff_ci_high=hi,
                ratio_diff_excludes_0=bool(lo > 0 or hi < 0),
            )
            rows.append(out)
    return pd.DataFrame(rows, columns=list(DIFFERENCE_COLUMNS))


def load_targeting(results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """``(targeting.csv, targeting_summary.csv)`` of a run, or None if targeting was not measured."""
    d = RunPaths(results_dir)
    if not d.targeting.is_file():
        return None
    df = pd.read_csv(d.targeting)
    s = d.targeting_summary
    return df, pd.read_csv(s) if s.is_file() else targeting_summary(df)
