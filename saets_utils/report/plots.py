"""Figures of the pipeline, drawn from tables and tensors read from ``results/<run>/`` (drawing only).

Every function returns a ``matplotlib.figure.Figure`` that is already closed in pyplot: nothing
leaks, nothing is shown twice, and a returned figure still displays inline in Jupyter (importing
pyplot registers the inline formatter) and saves headless with :func:`save_figure` (Agg when no
display). Methods have one colour and one name everywhere (``METHOD_ORDER``, ``METHOD_COLORS``, from
:mod:`saets_utils.registry`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from saets_utils.registry import METHOD_COLORS
from saets_utils.registry import METHODS as METHOD_ORDER

_EXTRA_COLORS = ("#17becf", "#bcbd22", "#e377c2", "#393b79")


def method_color(method: str) -> str:
    """The colour of ``method``; unknown methods get a stable colour outside the palette."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]


def _methods(df: pd.DataFrame) -> list[str]:
    present = list(pd.unique(df["method"]))
    return [m for m in METHOD_ORDER if m in present] + [m for m in present if m not in METHOD_ORDER]


def _figure(figsize: tuple[float, float]) -> Figure:
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize, layout="constrained")
    plt.close(fig)
    return fig


def _label(task: str) -> str:
    return task.replace("_", " ")


def feature_name(feature: int, labels: Mapping[int, str] | None, width: int = 26) -> str:
    """``#123 wedding, bride`` (label cut to ``width`` characters), or ``#123`` without a label."""
    lab = (labels or {}).get(int(feature), "")
    return f"#{int(feature)} {lab[: width - 1] + '…' if len(lab) > width else lab}".rstrip()


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def _method_legend(fig: Figure, methods: list[str], lines: pd.DataFrame | None = None) -> None:
    """One legend below the panels; with ``lines`` (a by_scale table), methods evaluated at a single
    scale (drawn as a dashed level) get a dashed line entry."""
    handles: list[Artist]
    if lines is None:
        handles = [Patch(color=method_color(m), label=m) for m in methods]
    else:
        single = lines.groupby("method")["scale"].nunique() == 1
        handles = [
            Line2D(
                [],
                [],
                color=method_color(m),
                marker="" if single.get(m) else "o",
                ms=4,
                ls="--" if single.get(m) else "-",
                label=m,
            )
            for m in methods
        ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(methods), frameon=False)


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write ``fig`` as PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", facecolor="white")
    return path


def _task_grid(tasks: list[str], ncols: int, panel: tuple[float, float]) -> tuple[Figure, list[Any]]:
    ncols = max(1, min(ncols, len(tasks)))
    nrows = -(-len(tasks) // ncols)
    fig = _figure((panel[0] * ncols, panel[1] * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
    for ax in axes[len(tasks) :]:
        ax.set_visible(False)
    return fig, list(axes[: len(tasks)])


def plot_product_vs_scale(by_scale: pd.DataFrame, ncols: int = 3) -> Figure:
    """Behaviour x coherence against steering scale: one panel per task, one line per method
    (``by_scale``: eval/by_scale.csv)."""
    tasks, methods = list(pd.unique(by_scale["task"])), _methods(by_scale)
    fig, axes = _task_grid(tasks, ncols, (4.0, 2.8))
    for ax, task in zip(axes, tasks):
        sub = by_scale[by_scale["task"] == task]
        for m in methods:
            d = sub[sub["method"] == m].sort_values("scale")
            if len(d) == 1:  # e.g. the unsteered 'prompt' baseline: one value, drawn across the panel
                ax.axhline(d["product"].iloc[0], color=method_color(m), ls="--", lw=1.2)
            elif len(d):
                ax.plot(d["scale"], d["product"], marker="o", ms=3, color=method_color(m))
        ax.set_title(_label(task))
        ax.grid(alpha=0.3)
    ncols = axes[0].get_subplotspec().get_gridspec().ncols
    for i, ax in enumerate(axes):
        if i % ncols == 0:
            ax.set_ylabel("behaviour × coherence")
        if i + ncols >= len(axes):  # nothing drawn below this panel
            ax.set_xlabel("steering scale")
            ax.xaxis.set_tick_params(labelbottom=True)
    _method_legend(fig, methods, by_scale)
    return fig


def plot_behaviour_coherence(by_scale: pd.DataFrame, ncols: int = 3) -> Figure:
    """Mean behavioural score (top) and coherence score (bottom) against scale, per task: shows
    whether a low product comes from weak steering or from broken text (``by_scale``: eval/by_scale.csv)."""
    tasks, methods = list(pd.unique(by_scale["task"])), _methods(by_scale)
    ncols = max(1, min(ncols, len(tasks)))
    nrows = -(-len(tasks) // ncols)
    fig = _figure((4.0 * ncols, 4.4 * nrows + 0.6))
    subfigs = np.atleast_1d(fig.subfigures(nrows, ncols, squeeze=False)).ravel()
    for sf, task in zip(subfigs, tasks):
        ax_b, ax_c = sf.subplots(2, 1, sharex=True)
        sub = by_scale[by_scale["task"] == task]
        for m in methods:
            d = sub[sub["method"] == m].sort_values("scale")
            for ax, col in ((ax_b, "behaviour"), (ax_c, "coherence")):
                if len(d) == 1:
                    ax.axhline(d[col].iloc[0], color=method_color(m), ls="--", lw=1.2)
                else:
                    ax.plot(d["scale"], d[col], marker="o", ms=3, color=method_color(m))
        ax_b.set_title(_label(task))
        ax_b.set_ylabel("behaviour")
        ax_c.set_ylabel("coherence")
        ax_c.set_xlabel("steering scale")
        for ax in (ax_b, ax_c):
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
    for sf in subfigs[len(tasks) :]:
        sf.set_visible(False)
    _method_legend(fig, methods, by_scale)
    return fig


def plot_best_product(summary: pd.DataFrame) -> Figure:
    """Max behaviour x coherence over scales per task and method, with bootstrap CIs, and the
    average over tasks at the right (``summary``: eval/summary.csv)."""
    tasks, methods = list(pd.unique(summary["task"])), _methods(summary)
    table = summary.pivot(index="task", columns="method", values="max_product").reindex(tasks)
    lo = summary.pivot(index="task", columns="method", values="ci_low").reindex(tasks)
    hi = summary.pivot(index="task", columns="method", values="ci_high").reindex(tasks)
    groups = tasks + ["average"]
    width = 0.8 / len(methods)
    fig = _figure((max(6.0, 0.22 * len(groups) * len(methods) + 2), 4.2))
    ax = fig.subplots()
    x = np.arange(len(groups))
    for i, m in enumerate(methods):
        vals = np.append(table[m].to_numpy(float), np.nanmean(table[m].to_numpy(float)))
        err = np.vstack(
            [
                np.append((table[m] - lo[m]).to_numpy(float), np.nan),
                np.append((hi[m] - table[m]).to_numpy(float), np.nan),
            ]
        )
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width,
            vals,
            width,
            color=method_color(m),
            label=m,
            yerr=np.clip(err, 0, None),
            error_kw={"elinewidth": 0.8, "capsize": 1.5},
        )
    ax.axvline(len(tasks) - 0.5, color="black", lw=0.6, ls=":")
    ax.set_xticks(x, [_label(g) for g in groups], rotation=30, ha="right")
    ax.set_ylabel("max behaviour × coherence")
    ax.grid(axis="y", alpha=0.3)
    _method_legend(fig, methods)
    return fig


def plot_approximator_diagnostics(
    pred: Any,
    measured: Any,
    b: Any,
    *,
    density: Any | None = None,
    top: int = 20,
    max_points: int = 50_000,
    seed: int = 0,
    labels: Mapping[int, str] | None = None,
) -> Figure:
    """Left: predicted vs measured effect entries for held-out vectors (``pred``, ``measured``
    [n, d_sae]; a seeded subsample of ``max_points``). Right: the ``top`` largest |b| entries of the
    approximator bias [d_sae], each annotated with its feature density [d_sae] when given: large
    bias entries are expected on BOS, position and other dense features. ``labels``: feature id ->
    short label (feature dashboards), shown next to each id."""
    P, Y, bias = _np(pred), _np(measured), _np(b).ravel()
    if density is not None and not np.isfinite(_np(density)).any():
        density = None  # no baseline (published effects): no density to show
    if P.shape != Y.shape or P.ndim != 2:
        raise ValueError(f"pred and measured must both be [n, d_sae]; got {P.shape} and {Y.shape}")
    fig = _figure((11, 4.6))
    ax_s, ax_b = fig.subplots(1, 2, width_ratios=[1.1, 1])
    p, y = P.ravel(), Y.ravel()
    if p.size > max_points:
        keep = np.random.default_rng(seed).choice(p.size, max_points, replace=False)
        p, y = p[keep], y[keep]
    ax_s.scatter(y, p, s=3, alpha=0.3, color="#1f77b4", rasterized=True, linewidths=0)
    lim = [min(y.min(), p.min()), max(y.max(), p.max())]
    ax_s.plot(lim, lim, color="black", lw=0.8, ls="--", label="predicted = measured")
    cos = (P * Y).sum(1) / np.maximum(np.linalg.norm(P, axis=1) * np.linalg.norm(Y, axis=1), 1e-12)
    ax_s.set_title(f"held-out effects ({P.shape[0]} vectors), mean cosine {cos.mean():.2f}", fontsize=10)
    ax_s.set_xlabel("measured effect (SAE activation change)")
    ax_s.set_ylabel("predicted effect  x·M + b")
    ax_s.legend(loc="upper left", fontsize=8)
    ax_s.grid(alpha=0.3)

    ids = np.argsort(-np.abs(bias))[:top][::-1]
    ax_b.barh(np.arange(len(ids)), bias[ids], color=np.where(bias[ids] >= 0, "#2ca02c", "#d62728"))
    ax_b.set_yticks(np.arange(len(ids)), [feature_name(i, labels) for i in ids], fontsize=8)
    ax_b.axvline(0, color="black", lw=0.6)
    ax_b.set_xlabel("bias b (effect of steering in any direction)")
    note = " (numbers: feature density)" if density is not None else ""
    ax_b.set_title(f"{len(ids)} largest |b| entries{note}", fontsize=10)
    if density is not None:
        dens = _np(density).ravel()
        for row, i in enumerate(ids):
            ax_b.annotate(
                f"{dens[i]:.2g}",
                (bias[i], row),
                xytext=(3 if bias[i] >= 0 else -3, 0),
                textcoords="offset points",
                va="center",
                ha="left" if bias[i] >= 0 else "right",
                fontsize=7,
            )
        ax_b.margins(x=0.18)
    ax_b.grid(axis="x", alpha=0.3)
    return fig


def plot_training_curve(history: pd.DataFrame, baselines: Mapping[str, float] | None = None) -> Figure:
    """Train and validation MSE per epoch (``history``: columns epoch, train_mse, val_mse) or, for
    the closed-form fit, along the regularisation path (column ridge_lambda instead of epoch), with
    optional horizontal baselines, e.g. ``{"predict zero": m["mse_zero"], "predict mean": m["mse_mean"]}``."""
    fig = _figure((6, 3.8))
    ax = fig.subplots()
    x = "epoch" if "epoch" in history else "ridge_lambda"
    for col, color in (("train_mse", "#1f77b4"), ("cv_mse", "#2ca02c"), ("val_mse", "#d62728")):
        if col in history and history[col].notna().any():
            ax.plot(history[x], history[col], marker="o", ms=3, color=color, label=col.replace("_", " "))
    if x == "ridge_lambda":
        ax.set_xscale("log")
    for (name, value), ls in zip((baselines or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, color="grey", ls=ls, lw=1, label=f"val MSE, {name}")
    vals = pd.concat([history.get(c, pd.Series(dtype=float)) for c in ("train_mse", "cv_mse", "val_mse")]).dropna()
    if len(vals) and (vals > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("epoch" if x == "epoch" else "ridge penalty λ")
    ax.set_ylabel("MSE")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_effect_profile(
    effect: Any,
    target_ids: list[int] | tuple[int, ...],
    *,
    density: Any | None = None,
    top: int = 15,
    title: str = "",
    dense_threshold: float = 0.01,
    labels: Mapping[int, str] | None = None,
) -> Figure:
    """The ``top`` most raised and most lowered features of one effect vector [d_sae] (measured or
    predicted), with the target features always shown (red) and dense features (density >
    ``dense_threshold``) hatched: tells at a glance whether a vector hits its target or side effects.
    ``labels``: feature id -> short label (feature dashboards), shown next to each id."""
    e = _np(effect).ravel()
    targets = [int(t) for t in target_ids]
    order = np.argsort(e)
    raised = [i for i in order[::-1][:top] if e[i] > 0]
    lowered = [i for i in order[:top] if e[i] < 0]
    ids = sorted(set(raised) | set(lowered) | set(targets), key=lambda i: e[i])
    dense = set() if density is None else {i for i in ids if _np(density).ravel()[i] > dense_threshold}
    fig = _figure((7, 1.2 + 0.22 * len(ids)))
    ax = fig.subplots()
    colors = ["#d62728" if i in targets else ("#1f77b4" if e[i] >= 0 else "#ff7f0e") for i in ids]
    bars = ax.barh(np.arange(len(ids)), e[ids], color=colors)
    for bar, i in zip(bars, ids):
        if i in dense:
            bar.set_hatch("///")
            bar.set_edgecolor("black")
    ax.set_yticks(
        np.arange(len(ids)),
        [feature_name(i, labels) + (" (target)" if i in targets else "") for i in ids],
        fontsize=8,
    )
    for lbl, i in zip(ax.get_yticklabels(), ids):
        if i in targets:
            lbl.set_color("#d62728")
            lbl.set_fontweight("bold")
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("effect (change in mean SAE activation)")
    ax.set_title(title or "effect profile", fontsize=10)
    handles = [
        Patch(color="#d62728", label="target"),
        Patch(color="#1f77b4", label="raised"),
        Patch(color="#ff7f0e", label="lowered"),
    ]
    if density is not None:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label=f"dense (> {dense_threshold:g})"))
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_published_comparison(compare_df: pd.DataFrame) -> Figure:
    """Our max product (with CI) beside the paper's, one panel per method the paper ran
    (``compare_df``: :func:`saets_utils.evaluation.scoring.compare_with_published`)."""
    df = compare_df.dropna(subset=["published"])
    if df.empty:
        raise ValueError("compare_df has no rows with published numbers to compare against")
    methods = _methods(df)
    fig = _figure((min(4.2 * len(methods), 17), 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(methods), sharey=True, squeeze=False).ravel())
    for ax, m in zip(axes, methods):
        d = df[df["method"] == m]
        x = np.arange(len(d))
        ax.bar(x - 0.2, d["published"], 0.4, color="#cccccc", edgecolor="#555555", label="paper")
        err = np.vstack([d["ours"] - d["ci_low"], d["ci_high"] - d["ours"]]).astype(float)
        ax.bar(
            x + 0.2,
            d["ours"],
            0.4,
            color=method_color(m),
            label="ours",
            yerr=np.clip(err, 0, None),
            error_kw={"elinewidth": 0.8, "capsize": 2},
        )
        ax.set_xticks(x, [_label(t) for t in d["task"]], rotation=45, ha="right", fontsize=8)
        ax.set_title(m)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("max behaviour × coherence")
    fig.legend(
        handles=[
            Patch(facecolor="#cccccc", edgecolor="#555555", label="paper"),
            Patch(facecolor="white", edgecolor="black", label="ours (method colour, bootstrap CI)"),
        ],
        loc="outside upper center",
        ncols=2,
        frameon=False,
        fontsize=9,
    )
    return fig


def plot_targeting(
    targeting: pd.DataFrame, seed: int = 0, summary: pd.DataFrame | None = None, n_boot: int = 1000
) -> Figure:
    """Judge-free targeting per method (``targeting``: eval/targeting.csv, one row per task and
    method). Left: rank of the best target feature among all SAE features by measured effect (1 =
    the most raised feature; log scale, best at the top). Right: target effect / off-target norm.
    One dot per row (slightly jittered); a black bar at the **median over tasks** with its 95%
    bootstrap CI over tasks as an error bar (ranks are heavy-tailed: a mean would sit far above the
    typical task). The medians and CIs are ``summary``'s (eval/targeting_summary.csv, columns
    ``median_rank``, ``median_ratio`` and their ``*_ci_low``/``*_ci_high``), or
    :func:`~saets_utils.evaluation.targeting.targeting_summary` of ``targeting`` with ``n_boot`` and
    ``seed``. Vectors that could not be calibrated (NaN) are left out and counted in the tick label."""
    from saets_utils.evaluation.targeting import targeting_summary

    methods = _methods(targeting)
    if summary is None:
        summary = targeting_summary(targeting, n_boot=n_boot, seed=seed)
    summ = summary.set_index("method").reindex(methods)
    fig = _figure((max(7.0, 1.5 * len(methods) + 2.5), 3.8))
    ax_r, ax_q = fig.subplots(1, 2)
    rng = np.random.default_rng(seed)
    d_sae = float(targeting["d_sae"].max()) if "d_sae" in targeting and len(targeting) else np.nan
    labels = []
    for x, m in enumerate(methods):
        sub = targeting[targeting["method"] == m]
        for ax, col in ((ax_r, "target_rank"), (ax_q, "ratio")):
            v = sub[col].to_numpy(float)
            v = v[np.isfinite(v)]
            if len(v):
                ax.scatter(
                    x + rng.uniform(-0.15, 0.15, len(v)),
                    v,
                    s=22,
                    color=method_color(m),
                    alpha=0.85,
                    edgecolors="white",
                    linewidths=0.5,
                    zorder=3,
                )
        bad = int((~np.isfinite(sub["target_rank"].to_numpy(float))).sum())
        labels.append(m + (f"\n({bad} NaN)" if bad else ""))
    for ax, col in ((ax_r, "median_rank"), (ax_q, "median_ratio")):
        med = summ[col].to_numpy(float)
        ok = np.isfinite(med)
        if ok.any():
            lo = summ[f"{col}_ci_low"].to_numpy(float)[ok]
            hi = summ[f"{col}_ci_high"].to_numpy(float)[ok]
            err = np.nan_to_num(np.vstack([med[ok] - lo, hi - med[ok]]), nan=0.0).clip(0, None)  # no CI: no bar
            ax.errorbar(
                np.arange(len(methods))[ok],
                med[ok],
                yerr=err,
                fmt="_",
                color="black",
                markersize=26,
                markeredgewidth=1.8,
                elinewidth=1.1,
                capsize=4,
                zorder=4,
                label="median over tasks (95% CI)",
            )
    ax_r.set_yscale("log")
    ax_r.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    top = (
        d_sae if np.isfinite(d_sae) else max(2.0, float(np.nanmax(targeting["target_rank"])) if len(targeting) else 2.0)
    )
    ax_r.set_ylim(top * 1.3, 0.8)  # inverted: rank 1 at the top
    if np.isfinite(d_sae):
        ax_r.axhline(d_sae / 2, color="grey", lw=0.8, ls=":", label="chance (d_sae / 2)")
    if np.isfinite(d_sae) or np.isfinite(summ["median_rank"].to_numpy(float)).any():
        ax_r.legend(fontsize=8, loc="lower right")
    ax_r.set_ylabel("rank of best target feature (log)\nbar: median over tasks, 95% CI")
    ax_r.set_title("target rank by measured effect (median over tasks)", fontsize=10)
    ax_q.axhline(0, color="black", lw=0.6)
    ax_q.set_ylabel("target effect / off-target norm\nbar: median over tasks, 95% CI")
    ax_q.set_title("target vs off-target effect (median over tasks)", fontsize=10)
    for ax in (ax_r, ax_q):
        ax.set_xticks(np.arange(len(methods)), labels, fontsize=9)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    return fig


def plot_learning_curve(curve: pd.DataFrame, title: str = "") -> Figure:
    """Held-out R² against training vectors (log x), one line per fit with its 95% CI band; the
    noise ceiling as a band; zero (the mean-effect baseline) as a dashed line (``curve``: the design
    study's study/learning_curve.csv)."""
    fig = _figure((11, 4))
    axes = fig.subplots(1, 2)
    data = curve[curve["fit"] != "noise_ceiling"]
    ceiling = curve[curve["fit"] == "noise_ceiling"]
    for ax, x, xlabel in (
        (axes[0], "n_train", "training vectors"),
        (axes[1], "rollouts", "training rollouts (compute)"),
    ):
        for (fit, target), g in data.groupby(["fit", "target"]):
            if x == "n_train" and target != "full":
                continue
            g = g.sort_values(x)
            style = "-" if target == "full" else ":"
            (line,) = ax.plot(g[x], g["r2"], style, marker="o", ms=3, label=f"{fit} ({target} rollouts)")
            ax.fill_between(g[x], g["r2_ci_low"], g["r2_ci_high"], color=line.get_color(), alpha=0.15)
        ax.axhline(0, color="k", ls="--", lw=1, label="mean effect (R² = 0)")
        if len(ceiling):
            c = ceiling.iloc[0]
            ax.axhspan(c["r2_ci_low"], c["r2_ci_high"], color="grey", alpha=0.25, label="noise ceiling (95% CI)")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out R² (95% bootstrap CI)")
        ax.legend(fontsize=7)
    fig.suptitle(title or "Effect approximator: held-out R² vs data")
    return fig


def plot_pareto(by_scale: pd.DataFrame, ncols: int = 3) -> Figure:
    """Mean behaviour against mean coherence, one curve per method through its scales (arrows point
    to larger scales), one panel per task: the trade-off the max product summarises. The unsteered
    ``prompt`` baseline is one point. Top right is good (``by_scale``: eval/by_scale.csv)."""
    tasks, methods = list(pd.unique(by_scale["task"])), _methods(by_scale)
    fig, axes = _task_grid(tasks, ncols, (3.6, 3.4))
    for ax, task in zip(axes, tasks):
        sub = by_scale[by_scale["task"] == task]
        for m in methods:
            d = sub[sub["method"] == m].sort_values("scale").dropna(subset=["behaviour", "coherence"])
            x, y, c = d["coherence"].to_numpy(), d["behaviour"].to_numpy(), method_color(m)
            if len(d) == 1:
                ax.plot(x, y, marker="*", ms=10, color=c, ls="")
            elif len(d):
                ax.plot(x, y, color=c, lw=1.4)
                for i in range(len(d) - 1):
                    ax.annotate(
                        "",
                        xy=(x[i] + 0.8 * (x[i + 1] - x[i]), y[i] + 0.8 * (y[i + 1] - y[i])),
                        xytext=(x[i], y[i]),
                        arrowprops={"arrowstyle": "->", "color": c, "lw": 1.0},
                    )
        ax.text(0.97, 0.97, "good", transform=ax.transAxes, ha="right", va="top", color="grey")
        ax.text(0.03, 0.03, "bad", transform=ax.transAxes, ha="left", va="bottom", color="grey")
        ax.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), title=_label(task))
        ax.grid(alpha=0.3)
    ncols = axes[0].get_subplotspec().get_gridspec().ncols
    for i, ax in enumerate(axes):
        if i % ncols == 0:
            ax.set_ylabel("behaviour")
        if i + ncols >= len(axes):
            ax.set_xlabel("coherence")
            ax.xaxis.set_tick_params(labelbottom=True)
    _method_legend(fig, methods, by_scale)
    return fig


_METRIC_STYLE = {
    "product": ("-", 2.4, "behaviour × coherence"),
    "coherence": (":", 1.6, "coherence"),
    "behaviour": ("--", 1.6, "behaviour"),
}


def plot_metric_lines(by_scale: pd.DataFrame, method: str, ncols: int = 3) -> Figure:
    """For one ``method``: behaviour, coherence and their product against scale, one panel per
    task (the paper's per-task metric plot; ``by_scale``: eval/by_scale.csv)."""
    d_all = by_scale[by_scale["method"] == method]
    tasks = list(pd.unique(d_all["task"]))
    if not tasks:
        raise ValueError(f"no rows of method {method!r} in by_scale")
    fig, axes = _task_grid(tasks, ncols, (3.6, 2.8))
    for ax, task in zip(axes, tasks):
        d = d_all[d_all["task"] == task].sort_values("scale")
        for col, (ls, lw, _) in _METRIC_STYLE.items():
            ax.plot(d["scale"], d[col], ls=ls, lw=lw, color=method_color(method))
        ax.set(ylim=(-0.03, 1.03), title=f"{_label(task)} ({method})", xlabel="steering scale")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color="k", ls=ls, lw=lw, label=lab) for ls, lw, lab in _METRIC_STYLE.values()]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    return fig


def plot_battle_ratings(ratings: pd.DataFrame) -> Figure:
    """Bradley-Terry ratings of the methods on the Elo scale with bootstrap CIs (``ratings``:
    eval/battle_ratings.csv); 1000 is the average method."""
    r = ratings.sort_values("rating")
    fig = _figure((6.0, 0.45 * len(r) + 1.2))
    ax = fig.subplots()
    y = np.arange(len(r))
    colors = [method_color(m) for m in r["method"]]
    err = np.vstack([r["rating"] - r["ci_low"], r["ci_high"] - r["rating"]])
    ax.errorbar(r["rating"], y, xerr=np.nan_to_num(err), fmt="none", ecolor="grey", capsize=3)
    ax.scatter(r["rating"], y, color=colors, zorder=3)
    ax.axvline(1000, color="grey", lw=0.8, ls=":")
    ax.set_yticks(y, [f"{m} ({int(n)} battles)" for m, n in zip(r["method"], r["battles"])])
    ax.set_xlabel("rating (Elo scale, Bradley-Terry; 95% bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    return fig
