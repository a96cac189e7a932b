"""Every plot runs on small synthetic data, draws the numbers of its table (read back from the
figure's axes: lines, bars, points, labels) and writes a PNG, leaving no open figures."""

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
    curve = _learning_curve()
    data = {"pred": pred, "measured": measured, "b": b, "density": density, "curve": curve}
    cases = {
        "product_vs_scale": lambda: plots.plot_product_vs_scale(by_scale),
        "behaviour_coherence": lambda: plots.plot_behaviour_coherence(by_scale),
        "best_product": lambda: plots.plot_best_product(summary),
        "approximator": lambda: plots.plot_approximator_diagnostics(
            torch.tensor(pred), measured, b, density=density, top=10
        ),
        "approximator_no_density": lambda: plots.plot_approximator_diagnostics(pred, measured, b),
        "training_curve": lambda: plots.plot_training_curve(history, {"predict mean": 0.9}),
        "effect_profile": lambda: plots.plot_effect_profile(measured[0], [5, 7], density=density, top=5, title="anger"),
        "published": lambda: plots.plot_published_comparison(compare),
        "learning_curve": lambda: plots.plot_learning_curve(curve, "study"),
        "pareto": lambda: plots.plot_pareto(by_scale),
        "metric_lines": lambda: plots.plot_metric_lines(by_scale, "SAE-TS"),
        "battle_ratings": lambda: plots.plot_battle_ratings(
            pd.DataFrame(
                {
                    "method": ["SAE-TS", "CAA"],
                    "rating": [1020.0, 980.0],
                    "ci_low": [990.0, 950.0],
                    "ci_high": [1050.0, 1010.0],
                    "battles": [12, 10],
                }
            )
        ),
    }
    return cases, data


def _lines_of(ax, method: str) -> list:
    return [ln for ln in ax.get_lines() if ln.get_color() == plots.method_color(method)]


def _check_lines_per_task(fig, table: pd.DataFrame, col: str, axes=None, titles=None) -> None:
    """Each task panel draws, per method, its ``col`` against scale (a dashed level for a method
    evaluated at one scale), in the method's colour."""
    tasks = list(pd.unique(table["task"]))
    axes = axes if axes is not None else [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(tasks)
    for ax, task in zip(axes, tasks):
        assert ax.get_title() == (titles or {}).get(task, task.replace("_", " "))
        for m, d in table[table["task"] == task].groupby("method"):
            d = d.sort_values("scale")
            (line,) = _lines_of(ax, m)
            if len(d) == 1:
                np.testing.assert_allclose(line.get_ydata(), [d[col].iloc[0]] * 2)
                assert line.get_linestyle() == "--"
            else:
                np.testing.assert_allclose(line.get_xdata(), d["scale"])
                np.testing.assert_allclose(line.get_ydata(), d[col])


def _legend(fig) -> list[str]:
    return [t.get_text() for t in fig.legends[0].get_texts()]


def _check_product_vs_scale(fig, tables, data):
    by_scale = tables[0]
    _check_lines_per_task(fig, by_scale, "product")
    assert _legend(fig) == ["CAA", "SAE-TS", "rotation", "prompt"]  # the registry's order


def _check_behaviour_coherence(fig, tables, data):
    by_scale = tables[0]
    axes = fig.axes  # per task: behaviour on top, coherence below
    _check_lines_per_task(fig, by_scale, "behaviour", axes=axes[0::2])
    for ax_b, ax_c in zip(axes[0::2], axes[1::2]):
        assert (ax_b.get_ylabel(), ax_c.get_ylabel()) == ("behaviour", "coherence")
        assert ax_c.get_ylim() == (-0.03, 1.03)
    tasks = list(pd.unique(by_scale["task"]))
    _check_lines_per_task(fig, by_scale, "coherence", axes=axes[1::2], titles=dict.fromkeys(tasks, ""))


def _check_best_product(fig, tables, data):
    summary = tables[1]
    (ax,) = fig.axes
    tasks = list(pd.unique(summary["task"]))
    assert [t.get_text() for t in ax.get_xticklabels()] == [t.replace("_", " ") for t in tasks] + ["average"]
    bars = [c for c in ax.containers if hasattr(c, "patches")]
    assert [b.get_label() for b in bars] == ["CAA", "SAE-TS", "rotation", "prompt"]
    for b in bars:
        want = summary[summary["method"] == b.get_label()].set_index("task").loc[tasks, "max_product"].to_numpy()
        np.testing.assert_allclose([p.get_height() for p in b.patches], [*want, want.mean()])


def _check_approximator(fig, tables, data):
    pred, measured, b, density = data["pred"], data["measured"], data["b"], data["density"]
    ax_s, ax_b = fig.axes
    (points,) = ax_s.collections
    xy = points.get_offsets()
    np.testing.assert_allclose(np.sort(xy[:, 0]), np.sort(measured.ravel()))  # every entry, measured on x
    np.testing.assert_allclose(np.sort(xy[:, 1]), np.sort(np.asarray(pred).ravel()))
    cos = (pred * measured).sum(1) / (np.linalg.norm(pred, axis=1) * np.linalg.norm(measured, axis=1))
    assert f"mean cosine {cos.mean():.2f}" in ax_s.get_title()
    top = np.argsort(-np.abs(b))[: 10 if data["with_density"] else 20][::-1]  # top=10, or the default 20
    assert [t.get_text() for t in ax_b.get_yticklabels()] == [f"#{i}" for i in top]
    np.testing.assert_allclose([p.get_width() for p in ax_b.patches], b[top])
    notes = [t.get_text() for t in ax_b.texts]
    assert notes == ([f"{density[i]:.2g}" for i in top] if data["with_density"] else [])


def _check_training_curve(fig, tables, data):
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    np.testing.assert_allclose(lines["train mse"].get_ydata(), [1.0, 0.5, 0.3])
    np.testing.assert_allclose(lines["val mse"].get_ydata(), [1.1, 0.6, 0.4])
    np.testing.assert_allclose(lines["val MSE, predict mean"].get_ydata(), [0.9, 0.9])
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "epoch"


def _check_effect_profile(fig, tables, data):
    e = data["measured"][0]
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "#5 (target)" in labels and "#7 (target)" in labels  # targets shown whatever their effect
    ids = [int(lab.split()[0][1:]) for lab in labels]
    raised = [i for i in np.argsort(e)[::-1][:5] if e[i] > 0]
    assert set(raised) <= set(ids)
    np.testing.assert_allclose([p.get_width() for p in ax.patches], e[ids])  # sorted by effect
    assert list(e[ids]) == sorted(e[ids])


def _check_published(fig, tables, data):
    compare = tables[2].dropna(subset=["published"])
    methods = [m for m in ("CAA", "SAE-TS", "rotation", "prompt") if m in set(compare["method"])]
    assert [ax.get_title() for ax in fig.axes] == methods
    for ax, m in zip(fig.axes, methods):
        d = compare[compare["method"] == m]
        paper, ours = (c for c in ax.containers if hasattr(c, "patches"))
        np.testing.assert_allclose([p.get_height() for p in paper.patches], d["published"])
        np.testing.assert_allclose([p.get_height() for p in ours.patches], d["ours"])


def _check_learning_curve(fig, tables, data):
    curve = data["curve"]
    ax_n, ax_r = fig.axes
    for fit in ("ridge", "reduced_rank"):
        want = curve[(curve.fit == fit) & (curve.target == "full")].sort_values("n_train")
        (line,) = [ln for ln in ax_n.get_lines() if ln.get_label() == f"{fit} (full rollouts)"]
        np.testing.assert_allclose(line.get_xdata(), want["n_train"])
        np.testing.assert_allclose(line.get_ydata(), want["r2"])
        halves = [ln for ln in ax_r.get_lines() if ln.get_label() == f"{fit} (half rollouts)"]
        assert len(halves) == 1 and halves[0].get_linestyle() == ":"  # only on the compute axis
    assert not [ln for ln in ax_n.get_lines() if "half" in ln.get_label()]
    (ceiling,) = [p for p in ax_n.patches if p.get_label() == "noise ceiling (95% CI)"]
    np.testing.assert_allclose([ceiling.get_y(), ceiling.get_y() + ceiling.get_height()], [0.5, 0.7])


def _check_pareto(fig, tables, data):
    by_scale = tables[0]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    tasks = list(pd.unique(by_scale["task"]))
    assert [ax.get_title() for ax in axes] == [t.replace("_", " ") for t in tasks]
    for ax, task in zip(axes, tasks):
        for m, d in by_scale[by_scale["task"] == task].groupby("method"):
            d = d.sort_values("scale")
            (line,) = _lines_of(ax, m)
            np.testing.assert_allclose(line.get_xdata(), d["coherence"])  # coherence on x, behaviour on y
            np.testing.assert_allclose(line.get_ydata(), d["behaviour"])
            assert (line.get_marker() == "*") == (len(d) == 1)
        assert len(ax.texts) == 2 + sum(  # "good", "bad" and one arrow per step to a larger scale
            n - 1 for n in by_scale[by_scale["task"] == task].groupby("method").size() if n > 1
        )


def _check_metric_lines(fig, tables, data):
    by_scale = tables[0]
    d_all = by_scale[by_scale["method"] == "SAE-TS"]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == [f"{t.replace('_', ' ')} (SAE-TS)" for t in pd.unique(d_all["task"])]
    for ax, (_, d) in zip(axes, d_all.groupby("task", sort=False)):
        lines = ax.get_lines()
        assert [ln.get_linestyle() for ln in lines] == ["-", ":", "--"]  # product, coherence, behaviour
        for ln, col in zip(lines, ("product", "coherence", "behaviour")):
            np.testing.assert_allclose(ln.get_ydata(), d.sort_values("scale")[col])
    assert _legend(fig) == ["behaviour × coherence", "coherence", "behaviour"]


def _check_battle_ratings(fig, tables, data):
    (ax,) = fig.axes
    (points,) = ax.collections[-1:]
    np.testing.assert_allclose(points.get_offsets()[:, 0], [980.0, 1020.0])  # sorted by rating
    assert [t.get_text() for t in ax.get_yticklabels()] == ["CAA (10 battles)", "SAE-TS (12 battles)"]
    assert [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":"] == [1000]


CHECKS = {
    "product_vs_scale": _check_product_vs_scale,
    "behaviour_coherence": _check_behaviour_coherence,
    "best_product": _check_best_product,
    "approximator": _check_approximator,
    "approximator_no_density": _check_approximator,
    "training_curve": _check_training_curve,
    "effect_profile": _check_effect_profile,
    "published": _check_published,
    "learning_curve": _check_learning_curve,
    "pareto": _check_pareto,
    "metric_lines": _check_metric_lines,
    "battle_ratings": _check_battle_ratings,
}


def test_every_plot_case_is_checked(tables):
    assert set(_cases(tables)[0]) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_plot_draws_its_table_and_writes_png(tables, tmp_path, name):
    cases, data = _cases(tables)
    fig = cases[name]()
    CHECKS[name](fig, tables, {**data, "with_density": name == "approximator"})
    path = plots.save_figure(fig, tmp_path / "sub" / f"{name}.png")
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
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
