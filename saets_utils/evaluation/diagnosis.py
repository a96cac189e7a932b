"""Why SAE-TS wins or loses: task vectors built from several effect approximators, scored offline and
by measured targeting, on one run's effects.

For every task of the run (the targets 03 recorded) this builds, from fits on 02's *training*
vectors only:

- ``SAE-TS[fit]`` for fits ``reduced_rank`` (rank and penalty by CV, as 02 used to), ``ridge`` (full rank,
  CV penalty), ``rank<k>`` (reduced rank at fixed ranks) and ``decoder_prior`` (decoder prior + low rank,
  :mod:`saets_utils.approximator.fits.decoder_prior`); ``SAE-TS[fit] lam0``: without the bias correction;
- ``pinverse[fit]`` and ``rotation[fit]`` (rank-aware, see :mod:`evaluation.methods`);
- ``xcorr``: ``Xc^T Yc t``, the direction whose training vectors moved the target most, no inversion;
- controls: ``SAE`` (the decoder row), ``random`` (a seeded isotropic unit vector per task), ``-bias``
  (``-norm(W b)`` of the reduced-rank fit), and 03's own vectors (e.g. ``CAA``) when 03 has run.

Offline columns: cosine with the SAE vector, the target rank the vector's own approximator predicts
and the one the decoder-prior fit predicts, ``cos(W t, W b)``. Then every vector is calibrated and
measured as 01 measures decoder rows (:func:`effects.runner.calibrate_and_measure`), once per seed, and
scored with :func:`targeting.targeting_metrics`. Writes ``study/diagnosis.csv`` (one row per task,
variant and seed), ``study/diagnosis_summary.csv`` (median ranks with CIs over tasks) and
``study/diagnosis_differences.csv`` (paired against SAE). Command line::

    python -m saets_utils.evaluation.diagnosis params/<run>.yaml --seeds 0,1
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from saets_utils.approximator.fits import choose_ridge_lambda, fit_decoder_prior, fit_reduced_rank, fit_ridge
from saets_utils.approximator.model import EffectApproximator, split_holdout
from saets_utils.config import RunConfig
from saets_utils.evaluation import methods as M

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

__all__ = ["Variant", "build_variants", "diagnosis_fits", "feature_targets", "main", "offline_rows", "run_diagnosis"]

FIXED_RANKS = (4, 16, 64)
# Variants scored on single-feature targets (features whose decoder rows 01 never measured): the
# plain decoder row, SAE-TS from the two fits that matter, and the random control.
FEATURE_VARIANTS = ("SAE", "SAE-TS[reduced_rank]", "SAE-TS[decoder_prior]", "SAE-TS[decoder_prior] lam0", "random")


@dataclass
class Variant:
    """One vector of the diagnosis: ``task``, ``variant`` name, unit ``vector [d_model]``, the fit it
    came from (``fit``, None for fit-free vectors) and the task's ``targets``."""

    task: str
    variant: str
    vector: Tensor
    fit: str | None
    targets: list[tuple[int, float]]


def diagnosis_fits(
    X: Tensor, Y: Tensor, W_dec: Tensor, *, seed: int = 0, ranks: Sequence[int] = FIXED_RANKS
) -> dict[str, EffectApproximator]:
    """The approximators compared, all fitted on ``X [n, d_model]``, ``Y [n, d_sae]`` (training vectors)."""
    fits: dict[str, EffectApproximator] = {}
    fits["reduced_rank"], _ = fit_reduced_rank(X, Y, lam="cv", rank="cv", seed=seed)
    ridge_lam, _ = choose_ridge_lambda(X, Y, "cv", folds=5, seed=seed)
    fits["ridge"] = fit_ridge(X, Y, ridge_lam)
    for k in ranks:
        if k < min(X.shape):
            fits[f"rank{k}"], _ = fit_reduced_rank(X, Y, lam="cv", rank=k, seed=seed)
    fits["decoder_prior"], _ = fit_decoder_prior(X, Y, W_dec, seed=seed)
    return fits


def build_variants(
    task: str,
    targets: list[tuple[int, float]],
    fits: dict[str, EffectApproximator],
    W_dec: Tensor,
    *,
    X: Tensor,
    Y: Tensor,
    seed: int = 0,
    extra: dict[str, Tensor] | None = None,
    inverses: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> list[Variant]:
    """Every diagnosis vector of one task (module docstring). ``extra``: vectors of 03 (e.g. CAA);
    ``inverses``: per fit name, its ``(pinverse [d_sae, d_model], rotation [d_model, d_model])``,
    computed once for all tasks (:func:`fit_inverses`; computed here when absent).

    A variant that cannot be built is left out (e.g. SAE-TS from a rank-0 fit, whose ``W t`` is zero;
    a rotation whose span misses the target's decoder direction): the tables then lack its row.
    """
    out: list[Variant] = []

    def add(name: str, fit: str | None, build: Callable[..., Tensor], *args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(ValueError):
            out.append(Variant(task, name, build(*args, **kwargs).float(), fit, targets))

    add("SAE", None, M.build_sae_vector, W_dec, targets)
    for name, approx in fits.items():
        add(f"SAE-TS[{name}]", name, M.build_sae_ts_vector, approx, targets)
    for name in ("reduced_rank", "decoder_prior"):
        if name in fits:
            a = fits[name]
            add(f"SAE-TS[{name}] lam0", name, M.build_sae_ts_vector, a, targets, lam=0.0)
            P_inv, R = (inverses or {}).get(name) or (M.pinverse(a.W), M.rotation_matrix(a, W_dec))
            add(f"pinverse[{name}]", name, M.build_pinverse_vector, a, targets, P_inv)
            add(f"rotation[{name}]", name, M.build_rotation_vector, a, W_dec, targets, R=R)
    t = M.target_vector(targets, Y.shape[1], torch.float64)
    Xc, Yc = X.double() - X.double().mean(0), Y.double() - Y.double().mean(0)
    xc = Xc.T @ (Yc @ t)
    add("xcorr", None, M._unit, xc, "Xc^T Yc t")
    add("random", None, M.build_random_vector, X.shape[1], task, seed)
    if "reduced_rank" in fits:
        add("-bias", "reduced_rank", M._unit, -fits["reduced_rank"].correction, "-W b")
    for name, v in (extra or {}).items():
        add(name, None, M._unit, v, name)
    return out


def fit_inverses(fits: dict[str, EffectApproximator], W_dec: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Pseudoinverse and rotation of the fits pinverse/rotation variants are built from (once per fit)."""
    return {
        n: (M.pinverse(fits[n].W), M.rotation_matrix(fits[n], W_dec))
        for n in ("reduced_rank", "decoder_prior")
        if n in fits
    }


def _is_feature_task(task: str) -> bool:
    """Tasks named ``feature<id>`` are :func:`feature_targets`' single-feature targets."""
    return task.startswith("feature") and task[len("feature") :].isdigit()


def feature_targets(
    density: Tensor, measured_ids: Tensor, n: int, *, seed: int = 0, lo: float = 1e-4, hi: float = 0.01
) -> list[int]:
    """``n`` seeded single-feature targets: features whose decoder rows were never measured (not in
    ``measured_ids``), alive and sparse in the unsteered baseline (``lo < density [d_sae] < hi``)."""
    ok = (density > lo) & (density < hi)
    ok[measured_ids.long()[measured_ids < density.numel()]] = False
    pool = ok.nonzero()[:, 0]
    if pool.numel() < n:
        raise ValueError(f"only {pool.numel()} unmeasured features have {lo} < density < {hi}; ask for fewer targets")
    g = torch.Generator().manual_seed(seed)
    return sorted(pool[torch.randperm(pool.numel(), generator=g)[:n]].tolist())


def offline_rows(variants: Sequence[Variant], fits: dict[str, EffectApproximator]) -> pd.DataFrame:
    """Per variant: cosine with the task's SAE vector, the target rank its own fit predicts, the rank
    the decoder-prior fit predicts, and ``cos(W t, W b)`` of its fit."""
    from saets_utils.evaluation.targeting import targeting_metrics

    sae = {v.task: v.vector for v in variants if v.variant == "SAE"}
    judge = fits.get("decoder_prior")
    rows = []
    for v in variants:
        row: dict[str, Any] = {"task": v.task, "variant": v.variant, "fit": v.fit}
        row["cos_sae"] = float(torch.nn.functional.cosine_similarity(v.vector, sae[v.task], dim=0))
        if v.fit is not None:
            a = fits[v.fit]
            row["pred_rank_own"] = targeting_metrics(a.predict(v.vector), v.targets)["target_rank"]
            t = M.target_vector(v.targets, a.d_sae, torch.float64)
            row["cos_Wt_Wb"] = float(
                torch.nn.functional.cosine_similarity(a.W.double() @ t, a.W.double() @ a.b.double(), dim=0)
            )
        if judge is not None:
            row["pred_rank_prior"] = targeting_metrics(judge.predict(v.vector), v.targets)["target_rank"]
        rows.append(row)
    return pd.DataFrame(rows)


def measure_variants(
    run: RunConfig, model: HookedTransformer, sae: SAE, jobs: Sequence[tuple[Variant, Sequence[int]]]
) -> pd.DataFrame:
    """Calibrate and measure each variant once per seed it is listed with (01's recipe, through
    :func:`targeting.measure_vectors`); one row per (variant, seed)."""
    from saets_utils.evaluation.targeting import load_plan, measure_vectors, targeting_metrics, targeting_vector_id

    by_seed: dict[int, list[Variant]] = {}
    for v, seeds in jobs:
        for s in seeds:
            by_seed.setdefault(int(s), []).append(v)
    if not by_seed:
        return pd.DataFrame()
    work = {
        s: (torch.stack([v.vector for v in vs]), [targeting_vector_id(v.task, v.variant) for v in vs])
        for s, vs in by_seed.items()
    }
    got = measure_vectors(run, model, sae, load_plan(run, sae), work, desc="diagnosis (vectors)")
    rows = []
    for s, vs in by_seed.items():
        m = got[s]
        for i, v in enumerate(vs):
            metrics = targeting_metrics(m.effects[i], v.targets, m.halves[i])
            rows.append({"task": v.task, "method": v.variant, "seed": s, "scale": float(m.scales[i]), **metrics})
    return pd.DataFrame(rows)


def run_diagnosis(
    run: RunConfig,
    model: HookedTransformer,
    sae: SAE,
    *,
    seeds: Sequence[int] = (0, 1),
    measure: bool = True,
    n_boot: int = 1000,
    n_feature_targets: int = 0,
    only: Sequence[str] | None = None,
    feature_seeds: Sequence[int] | None = None,
    target_seed: int | None = None,
    tag: str = "",
) -> dict[str, pd.DataFrame]:
    """Fit on 02's training split of the run's effects, build, score and (``measure``) measure every
    variant for every task; write the tables under ``study/`` (module docstring).

    ``n_feature_targets``: also that many single-feature targets (:func:`feature_targets`, tasks named
    ``feature<id>``), with the :data:`FEATURE_VARIANTS` only; summarised apart (``*_features.csv``),
    measured with ``feature_seeds`` (default: ``seeds``) and drawn with ``target_seed`` (default: the
    run's seed; another seed draws other features). ``only``: measure these variants only. ``tag``:
    appended to every file name (a second measurement beside the first)."""
    from saets_utils.effects.store import load_effects
    from saets_utils.evaluation.targeting import collect_items, targeting_differences, targeting_summary
    from saets_utils.io_utils import atomic_write_text

    eff = load_effects(run.results_dir)
    ok = eff.valid
    X, Y, ids = eff.vectors[ok].float(), eff.effects[ok].float(), eff.vector_ids[ok]
    train, _ = split_holdout(ids, run.approximator.holdout, run.seed)
    X, Y = X[train], Y[train]
    W_dec = sae.W_dec.detach().float().cpu()
    fits = diagnosis_fits(X, Y, W_dec, seed=run.seed)
    inverses = fit_inverses(fits, W_dec)
    items = collect_items(run, model, sae)
    tasks: dict[str, tuple[list[tuple[int, float]], dict[str, Tensor]]] = {}
    for it in items:
        _, extra = tasks.setdefault(it.task, (it.targets, {}))
        if it.method in ("CAA", "FGAA"):
            extra[it.method] = it.vector
    variants = [
        v
        for task, (targets, extra) in tasks.items()
        for v in build_variants(task, targets, fits, W_dec, X=X, Y=Y, seed=run.seed, extra=extra, inverses=inverses)
    ]
    if n_feature_targets:
        from safetensors.torch import load_file

        density = load_file(run.paths.baseline)["density"]
        draw = run.seed if target_seed is None else target_seed
        for j in feature_targets(density, eff.vector_ids, n_feature_targets, seed=draw):
            built = build_variants(f"feature{j}", [(j, 1.0)], fits, W_dec, X=X, Y=Y, seed=run.seed, inverses=inverses)
            variants += [v for v in built if v.variant in FEATURE_VARIANTS]
    out = run.paths
    out.study_dir.mkdir(parents=True, exist_ok=True)
    offline = offline_rows(variants, fits)
    atomic_write_text(out.diagnosis("_offline", tag), offline.to_csv(index=False))
    res = {"offline": offline}
    if measure:
        jobs = [
            (v, feature_seeds or seeds if _is_feature_task(v.task) else seeds)
            for v in variants
            if only is None or v.variant in only
        ]
        df = measure_variants(run, model, sae, jobs)
        df = df.merge(offline.rename(columns={"variant": "method"}), on=["task", "method"], how="left")
        atomic_write_text(out.diagnosis("", tag), df.to_csv(index=False))
        res["measured"] = df
        is_feature = df["task"].map(_is_feature_task)
        for suffix, part in (("", df[~is_feature]), ("_features", df[is_feature])):
            if not len(part):
                continue
            summary = targeting_summary(part, n_boot=n_boot, seed=run.seed)
            diffs = targeting_differences(part, baseline="SAE", n_boot=n_boot, seed=run.seed)
            atomic_write_text(out.diagnosis(f"_summary{suffix}", tag), summary.to_csv(index=False))
            atomic_write_text(out.diagnosis(f"_differences{suffix}", tag), diffs.to_csv(index=False))
            res.update({f"summary{suffix}": summary, f"differences{suffix}": diffs})
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params", help="params/<run>.yaml of a run whose 01, 02 and 03 have finished")
    ap.add_argument("--seeds", default="0,1", help="comma-separated rollout seeds of the measurement")
    ap.add_argument("--offline-only", action="store_true", help="skip the measurement (offline columns only)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--feature-targets", type=int, default=0, help="also N single-feature targets never measured in 01")
    ap.add_argument("--feature-seeds", default=None, help="seeds of the single-feature targets (default: --seeds)")
    ap.add_argument("--only", default=None, help="comma-separated variants to measure (default: all)")
    ap.add_argument(
        "--target-seed", type=int, default=None, help="draws the single-feature targets (default: run seed)"
    )
    ap.add_argument("--tag", default="", help="suffix of every output file name, e.g. _replication")
    a = ap.parse_args(argv)
    from saets_utils.session import load_model_and_sae, start_run

    run, device = start_run(a.params)
    model, sae = load_model_and_sae(run, device)
    seeds = [int(s) for s in a.seeds.split(",")]
    fseeds = [int(s) for s in a.feature_seeds.split(",")] if a.feature_seeds else None
    only = [v.strip() for v in a.only.split(",")] if a.only else None
    res = run_diagnosis(
        run,
        model,
        sae,
        seeds=seeds,
        measure=not a.offline_only,
        n_boot=a.bootstrap,
        n_feature_targets=a.feature_targets,
        only=only,
        feature_seeds=fseeds,
        target_seed=a.target_seed,
        tag=a.tag,
    )
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(res["offline"].groupby("variant")[["cos_sae", "pred_rank_own", "pred_rank_prior"]].median())
        for k in ("summary", "differences", "summary_features", "differences_features"):
            if k in res:
                print(res[k].to_string(index=False))


if __name__ == "__main__":
    main()
