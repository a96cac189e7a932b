"""Aggregate judged generations into the paper's metric: per steering scale, mean behavioural
score x mean coherence score ("product"); per task and method, the max over scales.

Pure pandas/numpy over the samples table written by the evaluation (one row per generated text):
``task, method, scale, sample, behaviour, coherence, behaviour_error, coherence_error``, scores
normalised to [0, 1] and NaN where the judge failed. A text missing either score is *unscored*:
counted in ``unscored`` and left out of both means (so behaviour and coherence are averaged over
the same texts), never scored as 0 (that would punish methods for judge outages).
"""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import pandas as pd

from saets_utils.config import JudgeConfig
from saets_utils.evaluation.reference_numbers import REFERENCE_TASKS, published_table
from saets_utils.judges.kinds import get_judge_kind
from saets_utils.registry import METHODS

REQUIRED_COLUMNS = ("task", "method", "scale", "behaviour", "coherence")
_KEYS = ["task", "method"]


def _is_error(x: object) -> bool:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return False
    if isinstance(x, str):
        return x.strip() != ""
    return bool(x)


def _clean(samples: pd.DataFrame) -> pd.DataFrame:
    """Check columns and ranges; blank the score of every errored judgement; add ``error`` per text."""
    missing = [c for c in REQUIRED_COLUMNS if c not in samples.columns]
    if missing:
        raise ValueError(f"samples lack column(s) {missing}; expected {list(REQUIRED_COLUMNS)} (+ *_error)")
    df = samples.copy()
    error = np.zeros(len(df), dtype=bool)
    for crit in ("behaviour", "coherence"):
        score = pd.to_numeric(df[crit], errors="raise").astype(float)
        flagged = df[f"{crit}_error"].map(_is_error).to_numpy(bool) if f"{crit}_error" in df else False
        bad = score[(score < 0) | (score > 1)]
        if len(bad):
            raise ValueError(f"{crit} scores must be normalised to [0, 1] ((s - 1) / 9); found {bad.iloc[0]}")
        score[flagged] = np.nan
        df[crit] = score
        error |= score.isna().to_numpy()
    df.loc[error, ["behaviour", "coherence"]] = np.nan  # both means over the same (fully scored) texts
    df["error"] = error
    df["scored"] = ~error
    return df


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    """Tasks in order of first appearance, methods in the project's order, scales ascending."""
    tasks = {t: i for i, t in enumerate(pd.unique(df["task"]))}
    methods = {m: i for i, m in enumerate(METHODS)}
    key = {"task": lambda s: s.map(tasks), "method": lambda s: s.map(lambda m: methods.get(m, len(methods)))}
    cols = [c for c in ("task", "method", "scale") if c in df]
    return df.sort_values(cols, key=lambda s: key[s.name](s) if s.name in key else s, kind="stable").reset_index(
        drop=True
    )


def by_scale(samples: pd.DataFrame) -> pd.DataFrame:
    """Per task, method and scale: mean behaviour and mean coherence over the same texts (those with
    both scores), their product, ``n`` scored texts and ``unscored`` (texts missing a score)."""
    df = _clean(samples)
    g = df.groupby(_KEYS + ["scale"], sort=False)
    out = g.agg(
        behaviour=("behaviour", "mean"),
        coherence=("coherence", "mean"),
        n=("scored", "sum"),
        unscored=("error", "sum"),
    ).reset_index()
    out["product"] = out["behaviour"] * out["coherence"]
    out["n"] = out["n"].astype(int)
    out["unscored"] = out["unscored"].astype(int)
    cols = _KEYS + ["scale", "behaviour", "coherence", "product", "n", "unscored"]
    return _sorted(out[cols])


def _boot_max(cells: list[tuple[np.ndarray, np.ndarray]], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` resampled values of max over scales of mean(b) x mean(c); texts resampled per scale."""
    best = np.full(n_boot, np.nan)
    for b, c in cells:
        n = len(b)
        chunk = max(1, 4_000_000 // n)  # bound memory for large n
        for lo in range(0, n_boot, chunk):
            idx = rng.integers(0, n, size=(min(chunk, n_boot - lo), n))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resample: that scale drops out
                prod = np.nanmean(b[idx], axis=1) * np.nanmean(c[idx], axis=1)
            best[lo : lo + len(idx)] = np.fmax(best[lo : lo + len(idx)], prod)
    return best


def summary(samples: pd.DataFrame, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Per task and method: the scale with the largest product, that product and a bootstrap CI.

    Each bootstrap draw resamples texts within every scale and takes the max over scales again, so
    the CI covers the choice of the best scale as well as sampling noise (the max is biased upward
    a little; the paper reports the same max). Each (task, method) has its own RNG stream derived
    from ``seed``, so adding a method leaves the others' CIs unchanged. ``n`` is the number of scored
    texts at the best scale, ``unscored`` the texts of this task and method (all scales) missing a
    score; ``behaviour`` and ``coherence`` are the means at the best scale. ``n_boot=0``: no CI.
    """
    df = _clean(samples)
    table = by_scale(samples)
    rows = []
    for (task, method), cells in table.groupby(_KEYS, sort=False):
        scored = cells.dropna(subset=["product"])
        best = scored.loc[scored["product"].idxmax()] if len(scored) else None
        lo = hi = np.nan
        if n_boot > 0 and best is not None:
            sub = df[(df["task"] == task) & (df["method"] == method)]
            arrays = [
                (s["behaviour"].to_numpy(float), s["coherence"].to_numpy(float))
                for _, s in sub[sub["scored"]].groupby("scale")
            ]
            rng = np.random.default_rng([seed, zlib.crc32(f"{task}\0{method}".encode())])
            boot = _boot_max(arrays, n_boot, rng)
            if np.isfinite(boot).any():
                lo, hi = np.nanpercentile(boot, [50 * (1 - ci), 50 * (1 + ci)])
        rows.append(
            {
                "task": task,
                "method": method,
                "best_scale": np.nan if best is None else best["scale"],
                "max_product": np.nan if best is None else best["product"],
                "ci_low": lo,
                "ci_high": hi,
                "n": 0 if best is None else int(best["n"]),
                "unscored": int(cells["unscored"].sum()),
                "behaviour": np.nan if best is None else best["behaviour"],
                "coherence": np.nan if best is None else best["coherence"],
            }
        )
    return _sorted(pd.DataFrame(rows))


def paper_style_table(summary: pd.DataFrame, value: str = "max_product") -> pd.DataFrame:
    """Tasks as rows, methods as columns (project order), plus an ``average`` row over tasks,
    laid out like the paper's results table."""
    table = summary.pivot(index="task", columns="method", values=value)
    table = table.reindex(
        index=list(pd.unique(summary["task"])),
        columns=[m for m in METHODS if m in table.columns] + [m for m in table.columns if m not in METHODS],
    )
    table.loc["average"] = table.mean(axis=0, skipna=True)
    table.columns.name = None
    return table


# The paper's judge: gpt-4o-mini with the reference code's minimal prompt (judges/reference.py).
PUBLISHED_JUDGE = ("openai", "gpt-4o-mini", "reference")


def _template_label(judge: JudgeConfig) -> str:
    """``eval.judge.template`` for a prompted judge, ``-`` for one that reads no template (offline)."""
    return judge.template if get_judge_kind(judge.kind).prompted else "-"


def judge_mismatch(judge: JudgeConfig) -> str | None:
    """Why scores from ``judge`` are not comparable with the paper's (None when they are)."""
    used = (judge.kind, judge.model, _template_label(judge))
    if used == PUBLISHED_JUDGE:
        return None
    return (
        f"NOT COMPARABLE with the paper: judged by {used[0]}:{used[1]} with the {used[2]!r} template; "
        f"the paper's numbers come from {PUBLISHED_JUDGE[1]} with the reference template "
        "(eval.judge: {kind: openai, model: gpt-4o-mini, template: reference})"
    )


def compare_with_published(
    summary: pd.DataFrame, model_name: str, judge: JudgeConfig, strict: bool = False
) -> pd.DataFrame | None:
    """Our max product beside the paper's, one row per task (and ``average``) and method;
    None when the paper has no numbers for ``model_name``.

    Columns: ``task, method, ours, ci_low, ci_high, published, difference`` (ours - published),
    ``judge`` and ``comparable``. The published average is recomputed over our tasks where per-task
    numbers exist; the paper's own average is used only when we ran all nine reference tasks.
    ``published`` is NaN for methods the paper did not run (FGAA, prompt).

    The paper's scores come from gpt-4o-mini with the reference template. With any other judge or
    template the table is labelled loudly (``comparable`` False, the reason in ``attrs["warning"]``
    and a warning), or refused with ``strict`` (ValueError).
    """
    pub = published_table(model_name)
    if pub is None:
        return None
    mismatch = judge_mismatch(judge)
    if mismatch and strict:
        raise ValueError(mismatch)
    if mismatch:
        warnings.warn(mismatch, stacklevel=2)
    ours = summary[_KEYS + ["max_product", "ci_low", "ci_high"]].rename(columns={"max_product": "ours"})
    avg = ours.groupby("method", sort=False)["ours"].mean().reset_index().assign(task="average")
    per_task = pub[pub["task"] != "average"]
    pub_avg = []
    for method, sub in ours.groupby("method", sort=False):
        rows = per_task[(per_task["method"] == method) & per_task["task"].isin(sub["task"])]
        if len(rows) and set(sub["task"]) <= set(rows["task"]):
            pub_avg.append((method, rows["product"].mean()))
        elif set(REFERENCE_TASKS) <= set(sub["task"]):
            stated = pub[(pub["task"] == "average") & (pub["method"] == method)]["product"]
            pub_avg.append((method, stated.iloc[0] if len(stated) else np.nan))
    pub_avg_df = pd.DataFrame(pub_avg, columns=["method", "product"]).assign(task="average")
    published = pd.concat([per_task, pub_avg_df], ignore_index=True).rename(columns={"product": "published"})
    out = pd.concat([ours, avg], ignore_index=True).merge(published, on=_KEYS, how="left")
    out["published"] = out["published"].astype(float)
    out["difference"] = out["ours"] - out["published"]
    out["judge"] = f"{judge.kind}:{judge.model}/{_template_label(judge)}"
    out["comparable"] = mismatch is None
    table = _sorted(out[_KEYS + ["ours", "ci_low", "ci_high", "published", "difference", "judge", "comparable"]])
    table.attrs["warning"] = mismatch
    return table


def method_differences(
    table: pd.DataFrame,
    value: str,
    pairs: list[tuple[str, str]],
    *,
    n_boot: int = 10000,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Mean over tasks of ``value[a] - value[b]`` for each method pair, with a percentile bootstrap
    CI that resamples tasks (paired: both methods of a task move together).

    ``table`` has one row per (task, method) with a ``value`` column (e.g. summary.csv's
    ``max_product`` or targeting.csv's ``ratio``). Returns columns a, b, value, n_tasks, mean_diff,
    ci_low, ci_high.
    """
    # several rows of one (task, method), e.g. measurement seeds, are averaged within the task first
    wide = table.pivot_table(index="task", columns="method", values=value, aggfunc="mean")
    rng = np.random.default_rng(seed)
    rows = []
    for a, b in pairs:
        if a not in wide or b not in wide:
            continue
        d = (wide[a] - wide[b]).dropna().to_numpy(dtype=float)
        if d.size == 0:
            continue
        boot = d[rng.integers(0, d.size, (n_boot, d.size))].mean(1)
        lo, hi = np.percentile(boot, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
        rows.append(
            {
                "a": a,
                "b": b,
                "value": value,
                "n_tasks": int(d.size),
                "mean_diff": float(d.mean()),
                "ci_low": float(lo),
                "ci_high": float(hi),
            }
        )
    return pd.DataFrame(rows, columns=["a", "b", "value", "n_tasks", "mean_diff", "ci_low", "ci_high"])
