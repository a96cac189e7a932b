"""Notebook 04's work: draw every figure of a run from its files into ``results/<run>/figures/``
(and the design study's learning curve into ``results/<run>/study/``).

Each figure is drawn only when its inputs exist, so 04 also works on a partial run (e.g. after 01);
any other PNG in ``figures/`` (from an earlier run) is removed, so the report shows only this run's.
Before drawing, the run's files must be those its last finished steps recorded (manifest.json):
files of an interrupted, failed or since re-run step are refused, naming the step to re-run.
"""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to PNG (the notebook displays the files)
import matplotlib.pyplot as plt
import pandas as pd
from safetensors.torch import load_file

from saets_utils.config import RunConfig
from saets_utils.manifest import check_current
from saets_utils.report import plots
from saets_utils.report.features import load_labels

N_PROFILES = 4


def _save(fig, path: Path, made: list[Path]) -> None:
    made.append(plots.save_figure(fig, path))
    plt.close(fig)


def make_all_figures(run: RunConfig) -> list[Path]:
    """Write the run's figures (PNG) and return their paths; raises
    :class:`~saets_utils.manifest.StaleInputs` (naming the step to re-run) before drawing anything
    when the files of 01-03 are not those the steps recorded when they last finished."""
    check_current(run, ("01_effects", "02_train", "03_eval"), "notebook 04")
    d = run.paths
    fig_dir = d.figures_dir
    fig_dir.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    if d.by_scale.is_file():
        bs = pd.read_csv(d.by_scale)
        _save(plots.plot_product_vs_scale(bs), d.figure("product_vs_scale"), made)
        _save(plots.plot_behaviour_coherence(bs), d.figure("behaviour_coherence"), made)
        _save(plots.plot_pareto(bs), d.figure("pareto"), made)
        for method in sorted(set(bs["method"]) & {"SAE-TS", "SAE", "CAA"}):
            _save(plots.plot_metric_lines(bs, method), d.figure(f"metric_lines_{method}"), made)
    if d.battle_ratings.is_file():
        ratings = pd.read_csv(d.battle_ratings)
        if len(ratings):
            _save(plots.plot_battle_ratings(ratings), d.figure("battle_ratings"), made)
    if d.summary.is_file():
        from saets_utils.evaluation.scoring import compare_with_published

        sm = pd.read_csv(d.summary)
        _save(plots.plot_best_product(sm), d.figure("best_product"), made)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the mismatch goes into the figure's title instead
            cmp = compare_with_published(sm, run.model.name, run.eval.judge)
        if cmp is not None and cmp["published"].notna().any():
            fig = plots.plot_published_comparison(cmp)
            if cmp.attrs.get("warning"):
                fig.suptitle(textwrap.fill(cmp.attrs["warning"], 110), color="red", fontsize=9, y=1.02)
            _save(fig, d.figure("published_comparison"), made)
    if d.targeting.is_file():
        tg = pd.read_csv(d.targeting)
        if len(tg):
            _save(plots.plot_targeting(tg, seed=run.seed, n_boot=run.eval.bootstrap), d.figure("targeting"), made)
    else:  # targeting switched off (eval.targeting: false): no stale figure from an earlier run
        d.figure("targeting").unlink(missing_ok=True)
    if d.approximator_holdout.is_file():
        h = load_file(d.approximator_holdout)
        a = load_file(d.approximator)
        dens = load_file(d.baseline)["density"] if d.baseline.is_file() else None
        _save(
            plots.plot_approximator_diagnostics(
                h["pred"], h["measured"], a["b"], density=dens, labels=load_labels(d.root)
            ),
            d.figure("approximator_diagnostics"),
            made,
        )
    if d.effects.is_file():
        made += _effect_profiles(run)
    study = study_figure(run)
    if study is not None:
        made.append(study)
    for stale in fig_dir.glob(
        "*.png"
    ):  # an earlier run's figure (effect profiles, published comparison) never survives
        if stale not in made:
            stale.unlink()
    return made


def study_figure(run: RunConfig) -> Path | None:
    """``study/learning_curve.png`` from the design study's ``study/learning_curve.csv`` (and
    ``reliability.json`` for the title); None when the study has not run."""
    d = run.paths
    if not d.learning_curve.is_file():
        return None
    curve = pd.read_csv(d.learning_curve)
    rel = d.reliability
    n_vectors = json.loads(rel.read_text()).get("n_vectors") if rel.is_file() else None
    held = int(curve["n_val"].iloc[0]) if len(curve) else 0
    title = f"{run.name}: {n_vectors} vectors, {held} held out" if n_vectors is not None else ""
    made: list[Path] = []
    _save(plots.plot_learning_curve(curve, title), d.learning_curve_plot, made)
    return made[0]


def _effect_profiles(run: RunConfig) -> list[Path]:
    """Profiles of the first few measured vectors; for decoder rows the own feature is the target."""
    from saets_utils.effects.store import load_effects

    eff = load_effects(run.results_dir)
    is_rows = run.effects.vectors.source == "decoder_rows"
    labels = load_labels(run.results_dir)
    made: list[Path] = []
    valid = eff.valid.nonzero()[:, 0].tolist()[:N_PROFILES]
    for i in valid:
        vid = int(eff.vector_ids[i])
        fig = plots.plot_effect_profile(
            eff.effects[i],
            [vid] if is_rows else [],
            density=eff.baseline_density,
            title=f"vector {vid} at scale {float(eff.scales[i]):.1f}",
            labels=labels,
        )
        _save(fig, run.paths.figure(f"effect_profile_{vid}"), made)
    return made
