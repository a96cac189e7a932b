"""Every plot runs on small synthetic data and writes a non-empty PNG, leaving no open figures."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib.pyplot as plt  # only to check that no pyplot figure is left open
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import build_run_cfg
from saets_utils.config import JudgeConfig
from saets_utils.evaluation import scoring
from saets_utils.registry import METHODS
from saets_utils.report import plots


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(0)
    rows = []
    for task in ("anger", "london", "want_to_die", "wedding"):
        for m in ("CAA", "SAE-TS", "rotation", "prompt"):
            scales = [0.0] if m == "prompt" else [0.0, 40.0, 80.0, 120.0]
            for s in scales:
                for i in range(12):
                    rows.append(
                        dict(
                            task=task,
                            method=m,
                            scale=s,
                            sample=i,
                            behaviour=rng.uniform(0, s / 120 if s else 0.2),
                            coherence=rng.uniform(1 - s / 150, 1),
                            behaviour_error=None,
                            coherence_error=None,
                        )
                    )
    samples = pd.DataFrame(rows)
    summary = scoring.summary(samples, n_boot=50)
    judge = JudgeConfig(kind="openai", model="gpt-4o-mini", template="reference")
    return scoring.by_scale(samples), summary, scoring.compare_with_published(summary, "gemma-2-2b", judge)


def _learning_curve() -> pd.DataFrame:
    rows = [
        {
            "n_train": n,
            "target": t,
            "fit": f,
            "rollouts": n * (2 if t == "full" else 1),
            "r2": r,
            "r2_ci_low": r - 0.1,
            "r2_ci_high": r + 0.1,
            "n_val": 8,
        }
        for f in ("ridge", "reduced_rank")
        for t in ("full", "half")
        for n, r in ((16, 0.0), (32, 0.1), (64, 0.2))
    ]
    rows.append(
        {
            "n_train": None,
            "target": "full",
            "fit": "noise_ceiling",
            "rollouts": None,
            "r2": 0.6,
            "r2_ci_low": 0.5,
            "r2_ci_high": 0.7,
            "n_val": 8,
        }
    )
    return pd.DataFrame(rows)


def _cases(tables):
    by_scale, summary, compare = tables
    rng = np.random.default_rng(1)
    measured = rng.normal(size=(10, 64)) * (rng.uniform(size=64) < 0.2)
    pred = measured + rng.normal(0, 0.2, measured.shape)
    b, density = rng.normal(0, 0.1, 64), rng.uniform(0, 0.05, 64)
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_mse": [1.0, 0.5, 0.3], "val_mse": [1.1, 0.6, 0.4]})
    return {
        "product_vs_scale": lambda: plots.plot_product_vs_scale(by_scale),
        "behaviour_coherence": lambda: plots.plot_behaviour_coherence(by_scale),
        "best_product": lambda: plots.plot_best_product(summary),
        "approximator": lambda: plots.plot_approximator_diagnostics(torch.tensor(pred), measured, b, density, top=10),
        "approximator_no_density": lambda: plots.plot_approximator_diagnostics(pred, measured, b),
        "training_curve": lambda: plots.plot_training_curve(history, {"predict mean": 0.9}),
        "effect_profile": lambda: plots.plot_effect_profile(measured[0], [5, 7], density, top=5, title="anger"),
        "published": lambda: plots.plot_published_comparison(compare),
        "learning_curve": lambda: plots.plot_learning_curve(_learning_curve(), "study"),
        "pareto": lambda: plots.plot_pareto(by_scale),
        "metric_lines": lambda: plots.plot_metric_lines(by_scale, "SAE-TS"),
        "battle_ratings": lambda: plots.plot_battle_ratings(
            pd.DataFrame(
                {
                    "method": ["CAA", "SAE-TS"],
                    "rating": [980.0, 1020.0],
                    "ci_low": [950.0, 990.0],
                    "ci_high": [1010.0, 1050.0],
                    "battles": [10, 10],
                }
            )
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "product_vs_scale",
        "behaviour_coherence",
        "best_product",
        "approximator",
        "approximator_no_density",
        "training_curve",
        "effect_profile",
        "published",
        "learning_curve",
    ],
)
def test_plot_writes_png(tables, tmp_path, name):
    fig = _cases(tables)[name]()
    path = plots.save_figure(fig, tmp_path / "sub" / f"{name}.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert plt.get_fignums() == []


def test_study_figure_is_drawn_from_the_study_csv(tmp_path):
    from saets_utils.report.figures import study_figure

    run = build_run_cfg(tmp_path)
    assert study_figure(run) is None
    (run.results_dir / "study").mkdir(parents=True)
    _learning_curve().to_csv(run.results_dir / "study" / "learning_curve.csv", index=False)
    path = study_figure(run)
    assert path == run.results_dir / "study" / "learning_curve.png" and path.stat().st_size > 5_000
    assert plt.get_fignums() == []


def test_method_palette_matches_config():
    assert plots.METHOD_ORDER == METHODS
    assert set(plots.METHOD_COLORS) == set(METHODS)
    assert len(set(plots.METHOD_COLORS.values())) == len(METHODS)
    assert plots.method_color("other") == plots.method_color("other")


def test_published_comparison_needs_published_rows(tables):
    _, _, compare = tables
    with pytest.raises(ValueError, match="published"):
        plots.plot_published_comparison(compare.assign(published=np.nan))


def test_targeting_plot_draws_medians_with_their_ci():
    """Heavy-tailed ranks: the bars are the medians over tasks (not the means), with the summary's
    bootstrap CIs as error bars, on the log axis."""
    from matplotlib.container import ErrorbarContainer

    from saets_utils.evaluation.targeting import targeting_summary

    ranks = {"CAA": [2.0, 10.0, 45.0, 60.0, 9000.0], "SAE-TS": [1.0, 1.0, 2.0, 3.0, 800.0]}
    tg = pd.DataFrame(
        [
            {"task": f"t{i}", "method": m, "target_rank": r, "ratio": 0.1 * r, "d_sae": 16384}
            for m, rs in ranks.items()
            for i, r in enumerate(rs)
        ]
    )
    fig = plots.plot_targeting(tg, seed=0, n_boot=500)
    ax_r, ax_q = fig.axes
    assert ax_r.get_yscale() == "log" and "median over tasks" in ax_r.get_title() + ax_r.get_ylabel()
    summ = targeting_summary(tg, n_boot=500, seed=0).set_index("method")
    for ax, col, values in ((ax_r, "median_rank", ranks), (ax_q, "median_ratio", None)):
        (eb,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        data_line, _, (bars,) = eb.lines
        x, y = data_line.get_data()
        np.testing.assert_array_equal(x, [0, 1])  # CAA, SAE-TS in project order
        np.testing.assert_allclose(y, summ.loc[["CAA", "SAE-TS"], col])
        if values is not None:  # the medians, far below the means the old bars showed
            np.testing.assert_allclose(y, [np.median(values["CAA"]), np.median(values["SAE-TS"])])
            assert y[0] == 45.0 and np.mean(values["CAA"]) > 1000
        spans = np.array([seg[:, 1] for seg in bars.get_segments()])  # the CI, bottom to top
        np.testing.assert_allclose(
            np.sort(spans, axis=1), summ.loc[["CAA", "SAE-TS"], [f"{col}_ci_low", f"{col}_ci_high"]]
        )
    # a given summary (eval/targeting_summary.csv) is drawn as is
    fixed = summ.reset_index().assign(median_rank=[100.0, 5.0])
    (eb,) = [c for c in plots.plot_targeting(tg, summary=fixed).axes[0].containers if isinstance(c, ErrorbarContainer)]
    np.testing.assert_allclose(eb.lines[0].get_ydata(), [100.0, 5.0])
    assert plt.get_fignums() == []
