"""Choosing the ridge penalty by cross-validation on the training vectors only; the fit dispatch;
notebook 02's outputs and the verdict resting on the R^2 interval."""

import json
import math

import pandas as pd
import pytest
import torch

from saets_utils.approximator.fitting import fit_approximator
from saets_utils.approximator.training import (
    RIDGE_PATH,
    choose_ridge_lambda,
    metrics_table,
    train_approximator,
    verdict,
)
from saets_utils.config import ApproximatorConfig, load_config
from saets_utils.effects.store import Effects


def _data(n: int, noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 16, generator=g)
    X = X / X.norm(dim=-1, keepdim=True)
    W = torch.randn(16, 40, generator=g)
    return X, X @ W + 0.3 + noise * torch.randn(n, 40, generator=g)


def test_cv_picks_a_small_penalty_for_clean_data_and_a_large_one_for_noise():
    lam_clean, cv_clean = choose_ridge_lambda(*_data(200, 0.01), "cv", folds=5, seed=0)
    lam_noise, _cv_noise = choose_ridge_lambda(*_data(20, 5.0), "cv", folds=5, seed=0)
    assert lam_clean <= 1e-2 < 10 <= lam_noise
    assert set(cv_clean) == set(RIDGE_PATH) and min(cv_clean.values()) == cv_clean[lam_clean]


def test_fixed_penalty_is_used_as_is():
    assert choose_ridge_lambda(*_data(30, 0.1), 0.5, folds=5, seed=0) == (0.5, {})


def test_cv_is_seeded():
    X, Y = _data(40, 1.0)
    assert choose_ridge_lambda(X, Y, "cv", folds=4, seed=3) == choose_ridge_lambda(X, Y, "cv", folds=4, seed=3)


def test_negative_penalty_is_refused():
    from saets_utils.config import ApproximatorConfig

    with pytest.raises(ValueError, match="ridge_lambda"):
        ApproximatorConfig(ridge_lambda=-1.0)


def test_config_rank_fit_and_bootstrap():
    cfg = ApproximatorConfig()
    assert (cfg.fit, cfg.ridge_lambda, cfg.rank, cfg.bootstrap) == ("ridge", "cv", "cv", 1000)
    assert ApproximatorConfig(fit="reduced_rank", rank=4).rank == 4
    assert ApproximatorConfig(fit="ridge_per_feature").fit == "ridge_per_feature"
    for bad in (0, -2, "auto"):
        with pytest.raises(ValueError, match="rank"):
            ApproximatorConfig(rank=bad)
    with pytest.raises(ValueError, match="fit"):
        ApproximatorConfig(fit="lasso")
    with pytest.raises(ValueError, match="bootstrap"):
        ApproximatorConfig(bootstrap=-1)


@pytest.mark.parametrize("fit", ["ridge", "ridge_per_feature", "reduced_rank", "adam"])
def test_fit_approximator_dispatches_every_kind(fit):
    X, Y = _data(90, 0.05)
    cfg = ApproximatorConfig(fit=fit, cv_folds=3, lr=0.05, epochs=30, batch_size=16)
    approx, info = fit_approximator(X[:70], Y[:70], cfg, seed=0, X_val=X[70:], Y_val=Y[70:])
    assert info.fit == fit and approx.W.shape == (16, 40) and approx.b.shape == (40,)
    rows = info.history
    assert rows and all("val_mse" in r for r in rows)
    # every kind learns this clean map: far better than the mean effect on the held-out vectors
    mse = float(((approx.predict(X[70:]) - Y[70:]) ** 2).mean())
    assert mse < 0.05 * float(((Y[:70].mean(0) - Y[70:]) ** 2).mean())
    if fit == "ridge":
        assert info.ridge_lambda in RIDGE_PATH and {r["ridge_lambda"] for r in rows} == set(RIDGE_PATH)
    if fit == "ridge_per_feature":
        assert info.lambda_per_feature.shape == (40,) and sum(r["n_features"] for r in rows) == 40
        assert info.frac_features_mean == 0.0  # every feature here carries signal
    if fit == "reduced_rank":
        assert info.rank == 16 and info.ridge_lambda in RIDGE_PATH  # the map has full rank 16
        assert {"rank", "ridge_lambda", "cv_mse"} <= set(rows[0])
    if fit == "adam":
        assert [r["epoch"] for r in rows] == list(range(1, 31))
    # scalars go into approximator_metrics.json (strict JSON); the history (inf = "predict the mean") into a CSV
    json.dumps({k: v for k, v in info.as_dict().items() if k not in ("lambda_per_feature", "history")}, allow_nan=False)


def test_every_fit_setting_has_a_family_in_the_table_and_vice_versa():
    from typing import get_args

    from saets_utils.approximator.fitting import FITS

    assert set(FITS) == set(get_args(ApproximatorConfig.model_fields["fit"].annotation))
    with pytest.raises(ValueError, match=r"unknown approximator\.fit 'lasso'; use one of ridge, "):
        fit_approximator(*_data(20, 0.1), ApproximatorConfig.model_construct(fit="lasso"))


def _metrics(r2, lo, hi, **kw):
    return {"n_val": 50, "mse": 1.0, "mse_mean": 1.1, "r2": r2, "r2_ci_low": lo, "r2_ci_high": hi, **kw}


def test_verdict_rests_on_the_interval():
    beats = verdict(_metrics(0.09, 0.02, 0.15))
    assert beats.startswith("The approximator beats the mean-effect baseline") and "0.020 to 0.150" in beats
    assert "weak model" not in beats
    unsure = verdict(
        _metrics(0.09, -0.01, 0.2, noise_ceiling=0.3, noise_ceiling_ci_low=0.25, noise_ceiling_ci_high=0.35)
    )
    assert (
        "cannot be told apart from the mean-effect baseline" in unsure and "R² 0.090 (95% CI -0.010 to 0.200)" in unsure
    )
    assert "Noise ceiling" in unsure and "0.300 (95% CI 0.250 to 0.350)" in unsure and "weak model" in unsure
    worse = verdict(_metrics(-0.05, -0.08, -0.01))
    assert "worse than the mean-effect baseline" in worse and "Noise ceiling" not in worse
    tiny = verdict(_metrics(0.0005, 0.0001, 0.0009))
    assert tiny.startswith("The approximator beats") and "R² 0.0005 (95% CI 0.0001 to 0.0009)" in tiny
    reliable = verdict(
        _metrics(
            0.01,
            -0.01,
            0.03,
            r2_reliable=0.2,
            r2_reliable_ci_low=0.1,
            r2_reliable_ci_high=0.3,
            n_features_reliable=12,
            noise_ceiling_reliable=0.5,
        )
    )
    assert "12 features with positive split-half reliability: 0.200 (95% CI 0.100 to 0.300), ceiling 0.500" in reliable
    old = verdict({"n_val": 50, "mse": 1.0, "mse_mean": 1.1, "r2": 0.09, "beats_mean_baseline": True})
    assert "Without a confidence interval" in old and "no interval" in old


def _fake_effects(n: int, d_model: int, d_sae: int, seed: int = 0) -> Effects:
    """Effects = x @ W on a few features + per-half noise; the full effect is the halves' mean."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_model, generator=g)
    X = X / X.norm(dim=1, keepdim=True)
    W = torch.zeros(d_model, d_sae)
    W[:, :5] = 4 * torch.randn(d_model, 5, generator=g)
    halves = (X @ W)[:, None] + 0.5 * torch.randn(n, 2, d_sae, generator=g)
    ids = torch.arange(n) * 3
    return Effects(
        effects=halves.mean(1),
        vectors=X,
        scales=torch.ones(n),
        vector_ids=ids,
        table=pd.DataFrame({"id": ids.tolist()}),
        baseline_mean=torch.zeros(d_sae),
        baseline_density=torch.full((d_sae,), 0.1),
        meta={"effects": {"vectors": {"source": "random"}}},
        halves=halves,
    )


@pytest.mark.parametrize("fit", ["ridge_per_feature", "reduced_rank", "decoder_prior"])
def test_train_approximator_writes_intervals_and_noise_ceiling(tmp_path, fit):
    run = load_config(
        "params/test.yaml",
        {
            "results_root": str(tmp_path),
            "effects": {"vectors": {"ids": {"start": 0, "stop": 160}}},  # as many as the fake effects
            "approximator": {"fit": fit, "holdout": 40, "bootstrap": 200},
        },
    )
    effects = _fake_effects(160, 12, 30)
    res = train_approximator(run, effects, torch.randn(30, 12))
    m = json.loads((run.results_dir / "approximator_metrics.json").read_text())
    assert m["fit"] == fit and m["n_train"] == 120 and m["n_val"] == 40
    assert m["r2_ci_low"] > 0 and m["beats_mean_baseline"] and verdict(m).startswith("The approximator beats")
    assert (
        m["r2_ci_low"] <= m["noise_ceiling"]
        and m["noise_ceiling_ci_low"] <= m["noise_ceiling"] <= m["noise_ceiling_ci_high"]
    )
    assert m["n_features_reliable"] >= 5 and m["r2_reliable"] > m["r2"]
    assert "Noise ceiling" in verdict(m)
    hist = pd.read_csv(run.results_dir / "approximator_history.csv")
    assert len(hist) == len(res.history) > 0 and "cv_mse" in hist
    if fit == "ridge_per_feature":
        assert hist["n_features"].sum() == 30 and math.isinf(hist["ridge_lambda"].max())
        assert 0 < m["frac_features_mean"] < 1  # the 25 noise-only features mostly fall back to the mean
    elif fit == "reduced_rank":
        assert m["rank"] == 5 and "rank" in hist
    else:  # the fake map has no decoder structure: the low-rank part does the work, the gains shrink away
        assert m["rank"] >= 4 and m["kappa"] >= 0 and set(hist["stage"]) >= {"prior", "low_rank", "val"}
    assert set(metrics_table(m)["metric"]) >= {"r2", "r2_ci_low", "r2_ci_high", "noise_ceiling"}
