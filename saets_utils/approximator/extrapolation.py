"""How many measured vectors a fit would need: a saturating curve through a learning curve.

Held-out R² of a fit trained on ``n`` vectors is modelled as ``R²(n) = C·n / (n + h)``: it rises
like ``n`` while ``n << h`` and levels off at ``C``, the most a map of this family explains. From
the fitted ``C`` and ``h`` follows the ``n`` at which R² reaches a goal (e.g. half the noise
ceiling): ``n = h·goal / (C − goal)``, unreachable when ``C ≤ goal``. This is an extrapolation,
not a measurement; its spread is shown by refitting with each measured size left out in turn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.optimize import curve_fit


def saturating(n: np.ndarray, c: float, h: float) -> np.ndarray:
    """``C·n / (n + h)`` for training sizes ``n [k]``."""
    return c * n / (n + h)


def fit_saturating(n: Sequence[float] | np.ndarray, r2: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Least-squares ``(C, h)`` of :func:`saturating` through the points ``(n_i, r2_i)`` (at least 3);
    ``C`` is bounded by 1 (no R² exceeds it): a fit at that bound is still rising like ``n``, and its
    asymptote is not identified by the points."""
    x, y = np.asarray(n, dtype=float), np.asarray(r2, dtype=float)
    if len(x) < 3:
        raise ValueError(f"need at least 3 points to fit C and h, got {len(x)}")
    start = (max(float(y.max()) * 1.5, 1e-3), float(np.median(x)))
    (c, h), _ = curve_fit(saturating, x, y, p0=start, bounds=([0.0, 0.0], [1.0, 1e7]), maxfev=20000)
    return float(c), float(h)


def vectors_for(goal: float, c: float, h: float) -> float:
    """Training vectors at which ``C·n/(n+h)`` reaches ``goal``; ``inf`` when ``C <= goal``."""
    return h * goal / (c - goal) if c > goal else math.inf


def extrapolate(
    curve: pd.DataFrame,
    goal: float,
    *,
    target: str = "full",
    min_n: int = 64,
    seconds_per_vector: float | None = None,
) -> pd.DataFrame:
    """One row per fit of a learning curve (``study/learning_curve.csv``: ``n_train, target, fit, r2``):
    the fitted asymptote ``C`` and half-way size ``h``, the largest measured size and its R², the
    training vectors needed to reach ``goal`` (e.g. 0.5 × the noise ceiling), and the range of ``C``
    and of that size when each measured size is left out in turn (``*_loo_low/high``);
    ``asymptote_identified`` is False where ``C`` sits at its bound of 1. Sizes below
    ``min_n`` are left out (the curve's start is dominated by the mean). ``seconds_per_vector``: adds
    the effects compute those vectors would take."""
    rows = []
    pts = curve[(curve["target"] == target) & curve["n_train"].notna() & (curve["fit"] != "noise_ceiling")]
    for fit, g in pts.groupby("fit", sort=False):
        g = g[g["n_train"] >= min_n].sort_values("n_train")
        if len(g) < 3:
            continue
        n, r2 = g["n_train"].to_numpy(float), g["r2"].to_numpy(float)
        c, h = fit_saturating(n, r2)
        loo = [fit_saturating(np.delete(n, i), np.delete(r2, i)) for i in range(len(n))] if len(n) > 3 else []
        cs = [ci for ci, _ in loo] or [c]
        ns = [vectors_for(goal, ci, hi) for ci, hi in loo] or [vectors_for(goal, c, h)]
        need = vectors_for(goal, c, h)
        rows.append(
            {
                "fit": fit,
                "points": len(n),
                "n_max": n[-1],
                "r2_at_n_max": r2[-1],
                "asymptote_C": c,
                "asymptote_C_loo_low": min(cs),
                "asymptote_C_loo_high": max(cs),
                "asymptote_identified": c < 0.999,
                "half_way_h": h,
                "goal_r2": goal,
                "vectors_for_goal": need,
                "vectors_for_goal_loo_low": min(ns),
                "vectors_for_goal_loo_high": max(ns),
                "effects_hours_for_goal": need * seconds_per_vector / 3600 if seconds_per_vector else math.nan,
            }
        )
    return pd.DataFrame(rows)
