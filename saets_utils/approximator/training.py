"""Notebook 02's work: fit the effect approximator on 01's effects, judge it on held-out vectors,
and write ``approximator.safetensors`` (W, b, correction, rotation), ``approximator_metrics.json``,
``approximator_history.csv`` and ``approximator_holdout.safetensors`` (ids, predicted, measured).
It removes an earlier run's copies of these first, so a fit that fails leaves none of them behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from saets_utils.approximator.fits import RIDGE_PATH, FitInfo, PerFeatureInfo, choose_ridge_lambda
from saets_utils.approximator.fitting import fit_approximator
from saets_utils.approximator.metrics import ApproximatorMetrics, approximator_metrics, split_half_reliability
from saets_utils.approximator.model import EffectApproximator, split_holdout
from saets_utils.config import RunConfig
from saets_utils.effects.store import Effects
from saets_utils.io_utils import atomic_save_safetensors, atomic_write_json, atomic_write_text, remove_outputs
from saets_utils.paths import RunPaths

APPROX_OUTPUTS = RunPaths.written_by("02_train", recorded=True)

__all__ = [
    "APPROX_OUTPUTS",
    "RIDGE_PATH",
    "TrainResult",
    "choose_ridge_lambda",
    "metrics_table",
    "train_approximator",
    "verdict",
]


@dataclass
class TrainResult:
    """The fitted approximator, ``metrics`` as written to ``approximator_metrics.json`` (the held-out
    metrics, the fit's settings and choices), the training history, the held-out predictions
    ``pred / measured [n_val, d_sae]`` with their ``val_ids``, and the same typed: ``held_out``
    (:class:`ApproximatorMetrics`) and ``fit`` (the fit's :class:`FitInfo`)."""

    approx: EffectApproximator
    metrics: dict[str, Any]
    history: pd.DataFrame
    val_ids: Tensor
    pred: Tensor
    measured: Tensor
    held_out: ApproximatorMetrics
    fit: FitInfo


def train_approximator(run: RunConfig, effects: Effects, W_dec: Tensor) -> TrainResult:
    """Split (seeded, by id), fit as ``run.approximator.fit`` says (:func:`.fitting.fit_approximator`),
    measure on the held-out vectors (R^2 with a bootstrap CI; with 01's split-half effects also the
    noise ceiling, and R^2 over the features whose split-half reliability on the *training* vectors is
    positive), save all outputs. Rows without a finite scale or effect (see 01's status column) are
    dropped."""
    cfg = run.approximator
    remove_outputs(run.results_dir, APPROX_OUTPUTS)  # 02 starts: no earlier fit survives a failed one
    ok = effects.valid
    X, Y, ids = effects.vectors[ok].float(), effects.effects[ok].float(), effects.vector_ids[ok]
    if X.shape[0] < 3:
        raise ValueError(f"only {X.shape[0]} vectors have usable effects; measure more in 01")
    train, val = split_holdout(ids, cfg.holdout, run.seed)
    Xt, Yt, Xv, Yv = X[train], Y[train], X[val], Y[val]
    approx, info = fit_approximator(
        Xt, Yt, cfg, seed=run.seed, X_val=Xv, Y_val=Yv, progress=cfg.fit == "adam", W_dec=W_dec.detach().float().cpu()
    )
    history = pd.DataFrame(info.history)
    halves = effects.halves[ok].float() if effects.halves is not None else None
    if halves is not None and not torch.isfinite(halves).all():
        halves = None  # a half without finite values cannot give a noise estimate
    reliable = None
    if halves is not None and len(train) >= 3:
        rel = split_half_reliability(halves[train])
        reliable = torch.nan_to_num(rel, nan=0.0) > 0
    is_rows = effects.meta.get("effects", {}).get("vectors", {}).get("source") == "decoder_rows"
    held_out = approximator_metrics(
        approx,
        Xv,
        Yv,
        Yt.mean(0),
        val_ids=ids[val],
        decoder_feature_ids=ids[val] if is_rows else None,
        Y_val_halves=halves[val] if halves is not None else None,
        n_boot=cfg.bootstrap,
        seed=run.seed,
        reliable_features=reliable,
    )
    metrics = held_out.as_dict()
    metrics.update(
        {
            "fit": cfg.fit,
            "n_train": len(train),
            "n_dropped": int((~ok).sum()),
            "ridge_lambda": info.ridge_lambda,
            "ridge_lambda_setting": cfg.ridge_lambda if cfg.fit in ("ridge", "reduced_rank", "decoder_prior") else None,
            "rank": info.rank,
            "rank_setting": cfg.rank if cfg.fit in ("reduced_rank", "decoder_prior") else None,
        }
    )
    metrics.update(info.reported())  # the family's own numbers (per-feature: frac_features_mean, ...)
    out = run.paths
    approx.save(out.approximator, W_dec=W_dec.detach().float().cpu())
    per_feature = metrics.pop("per_feature_r2")
    atomic_write_json(out.approximator_metrics, metrics)
    atomic_write_text(out.approximator_history, history.to_csv(index=False))
    pred = approx.predict(Xv)
    holdout = {
        "vector_ids": ids[val].long(),
        "pred": pred,
        "measured": Yv,
        "per_feature_r2": torch.tensor([float("nan") if v is None else v for v in per_feature]),
    }
    if isinstance(info, PerFeatureInfo):
        holdout["ridge_lambda_per_feature"] = info.lambda_per_feature.float()
    atomic_save_safetensors(holdout, out.approximator_holdout)
    return TrainResult(approx, metrics, history, ids[val], pred, Yv, held_out, info)


def metrics_table(m: dict[str, Any]) -> pd.DataFrame:
    """Held-out metrics as a small table for the notebook."""
    keys = [
        "fit",
        "ridge_lambda",
        "rank",
        "frac_features_mean",
        "n_train",
        "n_val",
        "mse",
        "mse_mean",
        "mse_zero",
        "r2",
        "r2_ci_low",
        "r2_ci_high",
        "noise_ceiling",
        "noise_ceiling_ci_low",
        "noise_ceiling_ci_high",
        "n_features_reliable",
        "r2_reliable",
        "r2_reliable_ci_low",
        "r2_reliable_ci_high",
        "noise_ceiling_reliable",
        "r2_over_ceiling",
        "r2_over_ceiling_ci_low",
        "r2_over_ceiling_ci_high",
        "r2_reliable_over_ceiling",
        "per_feature_r2_median",
        "cosine_mean",
        "cosine_mean_baseline",
        "centered_cosine_mean",
        "decoder_top1_predicted",
        "decoder_top1_measured",
    ]
    keys = [k for k in keys if m.get(k) is not None]
    return pd.DataFrame({"metric": keys, "value": [m.get(k) for k in keys]})


def _num(v: float) -> str:
    """Three decimals, or two significant digits for small non-zero values (an R^2 of 0.0004 is not 0.000)."""
    return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 or math.isnan(v) else f"{v:.2g}"


def _ci(m: dict[str, Any], key: str) -> str:
    lo, hi = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
    return (
        f"{_num(m[key])} (95% CI {_num(lo)} to {_num(hi)})"
        if lo is not None and hi is not None
        else f"{_num(m[key])} (no interval)"
    )


def verdict(m: dict[str, Any]) -> str:
    """One honest sentence on whether the approximator beats predicting the mean effect, resting on
    the bootstrap CI of the held-out R^2 (lower bound > 0: beats; upper < 0: worse; else cannot be
    told apart), with the noise ceiling when 01 measured split halves. Metrics written before CIs
    existed fall back to the point estimate and say so."""
    n, lo, hi = m["n_val"], m.get("r2_ci_low"), m.get("r2_ci_high")
    mse = f"val MSE {m['mse']:.3g} vs {m['mse_mean']:.3g} for the mean effect"
    r2 = f"R² {_ci(m, 'r2')}"
    if lo is None or hi is None or any(math.isnan(v) for v in (lo, hi)):
        better = m["mse"] < m["mse_mean"]
        head = (
            f"Without a confidence interval, the approximator {'has a lower' if better else 'does NOT have a lower'} "
            f"held-out MSE than the mean-effect baseline on {n} held-out vectors"
        )
        weak = not better
    elif lo > 0:
        head, weak = f"The approximator beats the mean-effect baseline on {n} held-out vectors", False
    elif hi < 0:
        head, weak = f"The approximator is worse than the mean-effect baseline on {n} held-out vectors", True
    else:
        head, weak = (
            f"The approximator cannot be told apart from the mean-effect baseline on {n} held-out vectors",
            True,
        )
    text = f"{head}: {r2}; {mse}."
    if m.get("noise_ceiling") is not None:
        text += (
            f" Noise ceiling (the best R² any predictor can reach given measurement noise): {_ci(m, 'noise_ceiling')}."
        )
        if m.get("r2_over_ceiling") is not None:
            text += f" R² / ceiling: {_ci(m, 'r2_over_ceiling')}."
    if m.get("r2_reliable") is not None:
        text += (
            f" On the {m['n_features_reliable']} features with positive split-half reliability: {_ci(m, 'r2_reliable')}"
            + (
                f", ceiling {_num(m['noise_ceiling_reliable'])}"
                + (
                    f", R² / ceiling {_ci(m, 'r2_reliable_over_ceiling')}."
                    if m.get("r2_reliable_over_ceiling") is not None
                    else "."
                )
                if m.get("noise_ceiling_reliable") is not None
                else "."
            )
        )
    if weak:
        text += (
            " Methods that rely on it (SAE-TS, pinverse, rotation, FGAA) rest on a weak model here; measure more "
            "vectors (or more rollouts per vector) in 01."
        )
    return text
