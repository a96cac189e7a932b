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
    d = run.results_dir
    fig_dir = d / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    ev = d / "eval"
    if (ev / "by_scale.csv").is_file():
        bs = pd.read_csv(ev / "by_scale.csv")
        _save(plots.plot_product_vs_scale(bs), fig_dir / "product_vs_scale.png", made)
        _save(plots.plot_behaviour_coherence(bs), fig_dir / "behaviour_coherence.png", made)
        _save(plots.plot_pareto(bs), fig_dir / "pareto.png", made)
        for method in sorted(set(bs["method"]) & {"SAE-TS", "SAE", "CAA"}):
            _save(plots.plot_metric_lines(bs, method), fig_dir / f"metric_lines_{method}.png", made)
    if (ev / "battle_ratings.csv").is_file():
        ratings = pd.read_csv(ev / "battle_ratings.csv")
        if len(ratings):
            _save(plots.plot_battle_ratings(ratings), fig_dir / "battle_ratings.png", made)
    if (ev / "summary.csv").is_file():
        from saets_utils.evaluation.scoring import compare_with_published

        sm = pd.read_csv(ev / "summary.csv")
        _save(plots.plot_best_product(sm), fig_dir / "best_product.png", made)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the mismatch goes into the figure's title instead
            cmp = compare_with_published(sm, run.model.name, run.eval.judge)
        if cmp is not None and cmp["published"].notna().any():
            fig = plots.plot_published_comparison(cmp)
            if cmp.attrs.get("warning"):
                fig.suptitle(textwrap.fill(cmp.attrs["warning"], 110), color="red", fontsize=9, y=1.02)
            _save(fig, fig_dir / "published_comparison.png", made)
    if (ev / "targeting.csv").is_file():
        tg = pd.read_csv(ev / "targeting.csv")
        if len(tg):
            _save(plots.plot_targeting(tg, seed=run.seed, n_boot=run.eval.bootstrap), fig_dir / "targeting.png", made)
    else:  # targeting switched off (eval.targeting: false): no stale figure from an earlier run
        (fig_dir / "targeting.png").unlink(missing_ok=True)
    if (d / "approximator_holdout.safetensors").is_file():
        h = load_file(d / "approximator_holdout.safetensors")
        a = load_file(d / "approximator.safetensors")
        dens = load_file(d / "baseline.safetensors")["density"] if (d / "baseline.safetensors").is_file() else None
        _save(
            plots.plot_approximator_diagnostics(h["pred"], h["measured"], a["b"], dens, labels=load_labels(d)),
            fig_dir / "approximator_diagnostics.png",
            made,
        )
    if (d / "effects.safetensors").is_file():
        made += _effect_profiles(run, fig_dir)
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
    study = run.results_dir / "study"
    if not (study / "learning_curve.csv").is_file():
        return None
    curve = pd.read_csv(study / "learning_curve.csv")
    rel = study / "reliability.json"
    n_vectors = json.loads(rel.read_text()).get("n_vectors") if rel.is_file() else None
    held = int(curve["n_val"].iloc[0]) if len(curve) else 0
    title = f"{run.name}: {n_vectors} vectors, {held} held out" if n_vectors is not None else ""
    made: list[Path] = []
    _save(plots.plot_learning_curve(curve, title), study / "learning_curve.png", made)
    return made[0]


def _effect_profiles(run: RunConfig, fig_dir: Path) -> list[Path]:
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
            eff.baseline_density,
            title=f"vector {vid} at scale {float(eff.scales[i]):.1f}",
            labels=labels,
        )
        _save(fig, fig_dir / f"effect_profile_{vid}.png", made)
    return made
