"""One call for every ``ApproximatorConfig.fit``: the table of fit families notebook 02, the design
study and the diagnosis dispatch through (ridge, per-feature ridge, reduced rank, decoder prior, Adam).

Each family lives in its own module (:mod:`.fits` for the ridge families and Adam,
:mod:`.decoder_prior` for the decoder prior + low rank); this one only picks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from saets_utils.approximator.decoder_prior import fit_decoder_prior
from saets_utils.approximator.fits import (
    PER_FEATURE_LAMBDAS,
    RIDGE_PATH,
    RidgePath,
    _mse,
    _per_feature,
    choose_ridge_lambda,
    fit_adam,
    fit_reduced_rank,
    moments,
)
from saets_utils.approximator.model import EffectApproximator

if TYPE_CHECKING:
    from saets_utils.config import ApproximatorConfig

__all__ = ["fit_approximator"]


def fit_approximator(
    X: Float[Tensor, "n d_model"],
    Y: Float[Tensor, "n d_sae"],
    cfg: ApproximatorConfig,
    seed: int = 0,
    X_val: Tensor | None = None,
    Y_val: Tensor | None = None,
    progress: bool = False,
    W_dec: Tensor | None = None,
) -> tuple[EffectApproximator, dict[str, Any]]:
    """Fit as ``cfg.fit`` says on the training vectors ``(X, Y)``; any choice (penalty, rank) uses
    them only. ``X_val``/``Y_val`` only add validation MSE to the history rows.

    Returns the approximator and ``info``: ``fit``, ``ridge_lambda`` (None for adam and
    ridge_per_feature), ``rank`` (reduced_rank only), ``history`` (list of rows: the ridge path, the
    per-feature grid with how many features chose each penalty, the rank CV curve, or Adam's
    epochs); ridge_per_feature adds ``lambda_per_feature`` (float64 [d_sae], inf = mean) and
    ``frac_features_mean`` (the fraction predicted by their training mean).
    """
    if (X_val is None) != (Y_val is None):
        raise ValueError("pass both X_val and Y_val, or neither")
    info: dict[str, Any] = {"fit": cfg.fit, "ridge_lambda": None, "rank": None}
    if cfg.fit == "ridge":
        # one pass over the data for the CV path, the chosen fit and every history row
        total = moments(X, Y)
        lam, cv = choose_ridge_lambda(X, Y, cfg.ridge_lambda, cfg.cv_folds, seed, total=total)
        path = RidgePath.of(total)
        rows = []
        for lam_i in sorted({*RIDGE_PATH, lam}):
            row = {"ridge_lambda": lam_i, "train_mse": path.train_mse(lam_i), "cv_mse": cv.get(lam_i)}
            if X_val is not None and Y_val is not None:
                row["val_mse"] = _mse(path.fit(lam_i), X_val, Y_val)
            rows.append(row)
        approx = path.fit(lam)
        info.update(ridge_lambda=lam, history=rows)
    elif cfg.fit == "ridge_per_feature":
        approx, chosen, rows = _per_feature(X, Y, PER_FEATURE_LAMBDAS, 512, X_val, Y_val)
        fin = chosen[torch.isfinite(chosen)]
        info.update(
            history=rows,
            lambda_per_feature=chosen,
            frac_features_mean=float(torch.isinf(chosen).double().mean()),
            ridge_lambda_median_finite=float(fin.quantile(0.5)) if fin.numel() else None,
        )
    elif cfg.fit == "reduced_rank":
        approx, rr = fit_reduced_rank(X, Y, cfg.ridge_lambda, cfg.rank, cfg.cv_folds, seed, X_val=X_val, Y_val=Y_val)
        info.update(rr)
    elif cfg.fit == "decoder_prior":
        if W_dec is None:
            raise ValueError("approximator.fit: decoder_prior needs the SAE's W_dec [d_sae, d_model]")
        approx, dp = fit_decoder_prior(
            X, Y, W_dec, cfg.prior_kappa, cfg.ridge_lambda, cfg.rank, cfg.cv_folds, seed, X_val=X_val, Y_val=Y_val
        )
        info.update(dp)
    elif cfg.fit == "adam":
        approx, rows = fit_adam(
            X, Y, cfg.lr, cfg.epochs, cfg.batch_size, seed, X_val, Y_val, progress=progress, init=cfg.adam_init
        )
        info.update(history=rows)
    else:
        raise ValueError(
            f"unknown approximator.fit {cfg.fit!r}; use ridge, ridge_per_feature, reduced_rank, decoder_prior or adam"
        )
    return approx, info
