"""The learning-curve extrapolation: a saturating curve through R²(n) and the size that reaches a goal."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from saets_utils.approximator.design_study import curve_extrapolation
from saets_utils.approximator.extrapolation import extrapolate, fit_saturating, saturating, vectors_for


def curve(c: float, h: float, sizes=(32, 64, 128, 256, 512, 768), noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = np.array(sizes, dtype=float)
    r2 = saturating(n, c, h) + noise * rng.standard_normal(len(n))
    rows = [{"n_train": k, "target": "full", "fit": "ridge", "r2": v} for k, v in zip(n, r2, strict=True)]
    rows += [{"n_train": k, "target": "half", "fit": "ridge", "r2": v / 2} for k, v in zip(n, r2, strict=True)]
    return pd.DataFrame(rows)


def test_recovers_a_known_curve_and_the_size_for_a_goal():
    c, h = fit_saturating([64, 128, 256, 512, 768], saturating(np.array([64, 128, 256, 512, 768.0]), 0.4, 300))
    assert c == pytest.approx(0.4, rel=1e-4) and h == pytest.approx(300, rel=1e-3)
    # 0.3 = 0.4 n / (n + 300)  <=>  n = 900
    assert vectors_for(0.3, c, h) == pytest.approx(900, rel=1e-3)
    assert vectors_for(0.45, c, h) == math.inf  # above the asymptote: no number of vectors reaches it


def test_extrapolate_reads_the_full_target_and_reports_a_leave_one_out_range():
    ext = extrapolate(curve(0.4, 300, noise=0.004), goal=0.3, seconds_per_vector=2.0)
    (row,) = ext.to_dict("records")
    assert row["fit"] == "ridge" and row["points"] == 5  # 32 is below min_n
    assert row["asymptote_C_loo_low"] <= row["asymptote_C"] <= row["asymptote_C_loo_high"]
    assert 0.3 < row["asymptote_C"] < 0.5 and 400 < row["vectors_for_goal"] < 3000
    assert row["effects_hours_for_goal"] == pytest.approx(row["vectors_for_goal"] * 2 / 3600)


def test_too_few_points_give_no_row_and_a_curve_without_ceiling_no_table():
    assert extrapolate(curve(0.4, 300, sizes=(64, 128)), goal=0.2).empty
    with pytest.raises(ValueError, match="at least 3"):
        fit_saturating([1, 2], [0.1, 0.2])
    assert curve_extrapolation(curve(0.4, 300)) is None
    with_ceiling = pd.concat([curve(0.4, 300), pd.DataFrame([{"fit": "noise_ceiling", "target": "full", "r2": 0.7}])])
    ext = curve_extrapolation(with_ceiling)
    assert ext is not None and ext["goal_r2"].iloc[0] == pytest.approx(0.35)
