"""Decoder prior + low rank: an effect approximator fitted for targeting.

``W = P diag(gamma) + L`` with ``P`` the SAE's unit decoder directions as columns ([d_model, d_sae]),
a gain ``gamma_j`` per feature and a reduced-rank ridge ``L`` fitted to what the prior leaves over.

Why: a map fitted by total MSE (ridge, reduced rank) spends its few reliable directions on the dense
features that dominate the squared error, so a sparse target feature's column ``W[:, j]`` is mostly
noise and SAE-TS built from it loses to the plain decoder row. Here every feature has its own column
from the start: steering along decoder row ``j`` moves feature ``j`` (its self-effect, ``gamma_j``), and
the low-rank part takes the effects every vector shares in varying amounts (dense features, sinks).
Each gain is shrunk toward one pooled gain ``g0`` with strength ``kappa`` (empirical Bayes): a feature
whose decoder row was never measured gets ``g0``, so with strong shrinkage SAE-TS falls back to SAE
steering plus the low-rank correction instead of noise. ``kappa`` is chosen by k-fold CV on the
training vectors; the low-rank part's penalty and rank by :func:`.reduced_rank.fit_reduced_rank`'s own CV.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from saets_utils.approximator.fits.common import FitInfo, check_finite, check_xy, cv_folds, mse
from saets_utils.approximator.fits.reduced_rank import fit_reduced_rank
from saets_utils.approximator.model import EffectApproximator

if TYPE_CHECKING:
    from saets_utils.config import ApproximatorConfig

__all__ = ["PRIOR_KAPPAS", "DecoderPriorInfo", "decoder_directions", "fit_decoder_prior", "prior_gains"]

# Shrinkage strengths of the per-feature gains toward the pooled gain (inf: one gain for all features).
PRIOR_KAPPAS = (0.0, 0.01, 0.1, 1.0, 10.0, 100.0, math.inf)


@dataclass(kw_only=True)
class DecoderPriorInfo(FitInfo):
    """:class:`FitInfo` of the decoder prior: the chosen shrinkage ``kappa``, the pooled gain
    ``prior_gain`` (``g0``), the median per-feature gain, and the low-rank part's ``rank_max``."""

    kappa: float
    prior_gain: float
    gain_median: float
    rank_max: int

    def reported(self) -> dict[str, Any]:
        return {"kappa": self.kappa, "prior_gain": self.prior_gain}


def decoder_directions(W_dec: Float[Tensor, "d_sae d_model"]) -> Float[Tensor, "d_model d_sae"]:
    """``P``: the decoder rows as unit columns (float64; an all-zero row of a dead feature stays 0)."""
    D = W_dec.double()
    return (D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)).T


def prior_gains(
    A: Float[Tensor, "n d_sae"], Yc: Float[Tensor, "n d_sae"], kappa: float, g0: float | None = None
) -> tuple[Float[Tensor, " d_sae"], float]:
    """Per-feature gains ``gamma_j = (sum_i a_ij y_ij + kappa g0) / (sum_i a_ij^2 + kappa)`` and ``g0``.

    ``A = Xc P``: each (centred) training vector's cosine with each decoder direction; ``Yc`` the
    centred effects. ``g0`` (default: the pooled least-squares gain over all features) is what a
    feature gets when its own data say nothing; ``kappa = inf`` gives every feature ``g0``.
    """
    if kappa < 0:
        raise ValueError(f"kappa must be >= 0; got {kappa}")
    num, den = (A * Yc).sum(0), (A * A).sum(0)
    if g0 is None:
        g0 = float(num.sum() / den.sum()) if float(den.sum()) > 0 else 0.0
    if math.isinf(kappa):
        return torch.full_like(num, g0), g0
    safe = den + kappa
    gamma = torch.where(safe > 0, (num + kappa * g0) / safe.clamp_min(1e-300), torch.full_like(num, g0))
    return gamma, g0


def _choose_kappa(
    X: Tensor, Y: Tensor, P: Tensor, kappas: Sequence[float], folds: int, seed: int
) -> tuple[float, list[dict[str, Any]]]:
    sse = dict.fromkeys(kappas, 0.0)
    for te in cv_folds(X.shape[0], folds, seed):
        tr = torch.ones(X.shape[0], dtype=torch.bool)
        tr[te] = False
        mu_x, mu_y = X[tr].mean(0), Y[tr].mean(0)
        A_tr, A_te = (X[tr] - mu_x) @ P, (X[te] - mu_x) @ P
        Y_tr, Y_te = Y[tr] - mu_y, Y[te] - mu_y
        for k in kappas:
            gamma, _ = prior_gains(A_tr, Y_tr, k)
            sse[k] += float(((Y_te - A_te * gamma) ** 2).sum())
    n_el = X.shape[0] * Y.shape[1]
    rows = [{"stage": "prior", "kappa": k, "cv_mse": v / n_el} for k, v in sse.items()]
    best, best_sse = math.inf, math.inf
    for k in sorted(kappas, reverse=True):  # ties go to the stronger shrinkage (the simpler model)
        if sse[k] < best_sse * (1 - 1e-12):
            best, best_sse = k, sse[k]
    return best, rows


@torch.no_grad()
def fit_decoder_prior(
    X: Float[Tensor, "n d_model"],
    Y: Float[Tensor, "n d_sae"],
    W_dec: Float[Tensor, "d_sae d_model"],
    *,
    kappa: float | Literal["cv"] = "cv",
    lam: float | Literal["cv"] = "cv",
    rank: int | Literal["cv"] = "cv",
    folds: int = 5,
    seed: int = 0,
    kappas: Sequence[float] = PRIOR_KAPPAS,
    X_val: Tensor | None = None,
    Y_val: Tensor | None = None,
) -> tuple[EffectApproximator, DecoderPriorInfo]:
    """Fit ``effect ~= x @ (P diag(gamma) + L) + b`` on unit steering vectors ``X`` and effects ``Y``.

    Stage 1: the gains (``kappa`` fixed or by CV, :func:`prior_gains`). Stage 2: reduced-rank ridge
    of the residual ``Yc - Xc P diag(gamma)`` (``lam``, ``rank`` fixed or by CV). ``X_val``/``Y_val``
    are never used to choose; they add ``val_mse`` rows. Returns the approximator and its
    :class:`DecoderPriorInfo` (``kappa``, ``prior_gain`` = ``g0``, ``ridge_lambda``, ``rank``, ``history``).
    """
    check_xy(X, Y)
    if W_dec.ndim != 2 or W_dec.shape != (Y.shape[1], X.shape[1]):
        raise ValueError(
            f"W_dec must be [d_sae, d_model] = [{Y.shape[1]}, {X.shape[1]}] to match the effects; got {tuple(W_dec.shape)}"
        )
    if kappa != "cv" and float(kappa) < 0:
        raise ValueError(f"approximator.prior_kappa must be >= 0 or 'cv'; got {kappa}")
    dev = X.device
    Xd, Yd = X.double(), Y.to(dev, torch.float64)
    P = decoder_directions(W_dec.to(dev))
    history: list[dict[str, Any]] = []
    if kappa == "cv":
        k, history = _choose_kappa(Xd, Yd, P, list(kappas), folds, seed)
    else:
        k = float(kappa)
    mu_x, mu_y = Xd.mean(0), Yd.mean(0)
    A = (Xd - mu_x) @ P
    gamma, g0 = prior_gains(A, Yd - mu_y, k)
    W_prior = P * gamma  # [d_model, d_sae]
    resid = (Yd - mu_y - A * gamma).float()
    low, rr = fit_reduced_rank(X, resid, lam=lam, rank=rank, folds=folds, seed=seed)
    W = W_prior + low.W.double()
    approx = check_finite(EffectApproximator(W.float(), (mu_y - mu_x @ W).float()))
    history += [{"stage": "low_rank", **row} for row in rr.history]
    if X_val is not None and Y_val is not None:
        prior_only = EffectApproximator(W_prior.float(), (mu_y - mu_x @ W_prior).float())
        history += [
            {"stage": "val", "part": "prior", "val_mse": mse(prior_only, X_val, Y_val)},
            {"stage": "val", "part": "prior+low_rank", "val_mse": mse(approx, X_val, Y_val)},
        ]
    info = DecoderPriorInfo(
        fit="decoder_prior",
        kappa=k,
        prior_gain=g0,
        gain_median=float(gamma.median()),
        ridge_lambda=rr.ridge_lambda,
        rank=rr.rank,
        rank_max=rr.rank_max,
        history=history,
    )
    return approx, info


def fit_from_config(
    X: Float[Tensor, "n d_model"],
    Y: Float[Tensor, "n d_sae"],
    cfg: ApproximatorConfig,
    *,
    seed: int = 0,
    X_val: Tensor | None = None,
    Y_val: Tensor | None = None,
    W_dec: Tensor | None = None,
    progress: bool = False,
) -> tuple[EffectApproximator, DecoderPriorInfo]:
    """``fit: decoder_prior`` with ``cfg.prior_kappa``, ``cfg.ridge_lambda``, ``cfg.rank`` and
    ``cfg.cv_folds``; needs the SAE's ``W_dec [d_sae, d_model]``."""
    if W_dec is None:
        raise ValueError("approximator.fit: decoder_prior needs the SAE's W_dec [d_sae, d_model]")
    return fit_decoder_prior(
        X,
        Y,
        W_dec,
        kappa=cfg.prior_kappa,
        lam=cfg.ridge_lambda,
        rank=cfg.rank,
        folds=cfg.cv_folds,
        seed=seed,
        X_val=X_val,
        Y_val=Y_val,
    )
