"""Notebook 02's work: fit the effect approximator on 01's effects, judge it on held-out vectors,
and write ``approximator.safetensors`` (W, b, correction, rotation), ``approximator_metrics.json``,
``approximator_history.csv`` and ``approximator_holdout.safetensors`` (ids, predicted, measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .approximator import EffectApproximator, _mse, approximator_metrics, fit_adam, fit_ridge, split_holdout
from .config import RunConfig
from .effects_store import Effects
from .io_utils import atomic_save_safetensors, atomic_write_json, atomic_write_text

RIDGE_PATH = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


@dataclass
class TrainResult:
    """The fitted approximator, its held-out metrics, the training history and the held-out
    predictions ``pred / measured [n_val, d_sae]`` with their ``val_ids``."""

    approx: EffectApproximator
    metrics: dict[str, Any]
    history: pd.DataFrame
    val_ids: Tensor
    pred: Tensor
    measured: Tensor


def train_approximator(run: RunConfig, effects: Effects, W_dec: Tensor) -> TrainResult:
    """Split (seeded, by id), fit as ``run.approximator.fit`` says, measure on the held-out vectors,
    save all outputs. Rows without a finite scale or effect (see 01's status column) are dropped."""
    cfg = run.approximator
    ok = effects.valid
    X, Y, ids = effects.vectors[ok].float(), effects.effects[ok].float(), effects.vector_ids[ok]
    if X.shape[0] < 3:
        raise ValueError(f"only {X.shape[0]} vectors have usable effects; measure more in 01")
    train, val = split_holdout(ids, cfg.holdout, run.seed)
    Xt, Yt, Xv, Yv = X[train], Y[train], X[val], Y[val]
    if cfg.fit == "ridge":
        lam, cv = choose_ridge_lambda(Xt, Yt, cfg.ridge_lambda, cfg.cv_folds, run.seed)
        rows = []
        for lam_i in sorted({*RIDGE_PATH, lam}):
            a = fit_ridge(Xt, Yt, lam_i)
            rows.append({"ridge_lambda": lam_i, "train_mse": _mse(a, Xt, Yt), "cv_mse": cv.get(lam_i),
                         "val_mse": _mse(a, Xv, Yv)})
        history = pd.DataFrame(rows)
        approx = fit_ridge(Xt, Yt, lam)
    else:
        lam = None
        approx, hist = fit_adam(Xt, Yt, cfg.lr, cfg.epochs, cfg.batch_size, run.seed, Xv, Yv, progress=True)
        history = pd.DataFrame(hist)
    is_rows = effects.meta.get("effects", {}).get("vectors", {}).get("source") == "decoder_rows"
    metrics = approximator_metrics(approx, Xv, Yv, Yt.mean(0), val_ids=ids[val],
                                   decoder_feature_ids=ids[val] if is_rows else None)
    metrics.update({"fit": cfg.fit, "n_train": int(len(train)), "n_dropped": int((~ok).sum()),
                    "ridge_lambda": lam, "ridge_lambda_setting": cfg.ridge_lambda if cfg.fit == "ridge" else None})
    out = run.results_dir
    approx.save(out / "approximator.safetensors", W_dec=W_dec.detach().float().cpu())
    per_feature = metrics.pop("per_feature_r2")
    atomic_write_json(out / "approximator_metrics.json", metrics)
    atomic_write_text(out / "approximator_history.csv", history.to_csv(index=False))
    pred = approx.predict(Xv)
    atomic_save_safetensors({"vector_ids": ids[val].long(), "pred": pred, "measured": Yv,
                             "per_feature_r2": torch.tensor([float("nan") if v is None else v for v in per_feature])},
                            out / "approximator_holdout.safetensors")
    return TrainResult(approx, metrics, history, ids[val], pred, Yv)


def choose_ridge_lambda(X: Tensor, Y: Tensor, setting: float | str, folds: int, seed: int) -> tuple[float, dict[float, float]]:
    """The ridge penalty to use: ``setting`` itself, or with ``"cv"`` the value of :data:`RIDGE_PATH`
    with the lowest k-fold cross-validated MSE on the training vectors ``X [n, d_model]``,
    ``Y [n, d_sae]``. Returns it and the CV MSE per candidate (empty when not cross-validated)."""
    if setting != "cv":
        return float(setting), {}
    n = X.shape[0]
    folds = min(folds, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = [perm[i::folds] for i in range(folds)]
    cv: dict[float, float] = {}
    for lam in RIDGE_PATH:
        errs = []
        for k in range(folds):
            tr = torch.cat([p for j, p in enumerate(parts) if j != k])
            errs.append(_mse(fit_ridge(X[tr], Y[tr], lam), X[parts[k]], Y[parts[k]]) * len(parts[k]))
        cv[lam] = sum(errs) / n
    return min(cv, key=cv.__getitem__), cv


def metrics_table(m: dict[str, Any]) -> pd.DataFrame:
    """Held-out metrics as a small table for the notebook."""
    keys = ["ridge_lambda", "n_train", "n_val", "mse", "mse_mean", "mse_zero", "r2", "per_feature_r2_median",
            "cosine_mean", "cosine_mean_baseline", "centered_cosine_mean", "decoder_top1_predicted", "decoder_top1_measured"]
    return pd.DataFrame({"metric": keys, "value": [m.get(k) for k in keys]})


def verdict(m: dict[str, Any]) -> str:
    """One honest sentence on whether the approximator beats predicting the mean effect."""
    if m["beats_mean_baseline"]:
        return (f"The approximator beats the mean-effect baseline on {m['n_val']} held-out vectors: "
                f"val MSE {m['mse']:.3g} vs {m['mse_mean']:.3g} (R² {m['r2']:.3f}).")
    return (f"The approximator does NOT beat predicting the mean effect on {m['n_val']} held-out vectors: "
            f"val MSE {m['mse']:.3g} vs {m['mse_mean']:.3g} (R² {m['r2']:.3f}). Methods that rely on it "
            "(SAE-TS, pinverse, rotation, FGAA) rest on a weak model here; measure more vectors in 01.")
