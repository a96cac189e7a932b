"""Reduced-rank ridge (``fit: reduced_rank``): ridge, then ``W`` projected onto the top ``rank`` right
singular vectors of the centred fitted values; rank (0 = the mean effect .. full) and penalty by
k-fold CV, every rank scored at once in the SVD basis of the centred inputs. Reads the effects in
column blocks, so no float64 copy of the whole effect matrix is made.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from saets_utils.approximator.fits.common import (
    Basis,
    FitInfo,
    check_finite,
    check_lambdas,
    check_xy,
    column_chunks,
    cv_folds,
    svd_basis,
)
from saets_utils.approximator.fits.ridge import RIDGE_PATH
from saets_utils.approximator.model import EffectApproximator

if TYPE_CHECKING:
    from saets_utils.config import ApproximatorConfig


@dataclass(kw_only=True)
class ReducedRankInfo(FitInfo):
    """:class:`FitInfo` of reduced-rank ridge: also the largest rank the data allow (``rank_max``) and
    the rank asked for (``rank_requested``; None when chosen by CV)."""

    rank_max: int
    rank_requested: int | None = None


@dataclass
class _RRStats:
    """Sufficient statistics of one train/test split for reduced-rank ridge in the train SVD basis.

    With ``Z = U^T Yc [r, d_sae]`` (train), ``A = (X_te - mu_x) Vt^T diag(1/s)`` and ``Yt = Y_te -
    mean_train(Y)``: ``ZZ = Z Z^T``, ``ZB = Z Yt^T A``, ``AA = A^T A`` (all [r, r]), ``yy = ||Yt||^2``.
    """

    s: Tensor
    ZZ: Tensor
    ZB: Tensor | None
    AA: Tensor | None
    yy: float


def _rr_stats(
    Y: Tensor,
    tr: Tensor | None,
    B: Basis,
    chunk: int,
    X_te: Tensor | None = None,
    Y_te: Tensor | None = None,
    te: Tensor | None = None,
) -> _RRStats:
    dev = B.U.device
    r = B.s.numel()
    ZZ = torch.zeros(r, r, dtype=torch.float64, device=dev)
    ZB = AA = None
    yy = 0.0
    A = None
    if X_te is not None:
        A = ((X_te.to(dev, torch.float64) - B.mu_x) @ B.Vt.T) / B.s
        AA = A.T @ A
        ZB = torch.zeros(r, r, dtype=torch.float64, device=dev)
    te_chunks = column_chunks(Y_te, te, chunk, dev) if Y_te is not None else None
    for _c, Yc in column_chunks(Y, tr, chunk, dev):
        mu = Yc.mean(0)
        Z = B.U.T @ (Yc - mu)
        ZZ += Z @ Z.T
        if te_chunks is not None:
            assert ZB is not None and A is not None  # test rows come with their inputs X_te
            _, Yt = next(te_chunks)
            Yt -= mu
            yy += float((Yt * Yt).sum())
            ZB += Z @ (Yt.T @ A)
    return _RRStats(B.s, ZZ, ZB, AA, yy)


def _rr_directions(st: _RRStats, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """For penalty ``lam``: shrinkage ``D = s^2/(s^2+lam)`` [r], eigenvalues (descending) and
    eigenvectors ``Q`` of ``G G^T`` with ``G = diag(D) Z``: the fitted values are ``U G``, so the top
    right singular vectors of the centred fit are ``G^T Q_k / sigma``."""
    s2 = st.s**2
    D = s2 / (s2 + lam)
    ev, Q = torch.linalg.eigh(D[:, None] * st.ZZ * D[None, :])
    return D, ev.flip(0).clamp_min(0), Q.flip(1)


def _rr_sse(st: _RRStats, lam: float) -> Tensor:
    """Test SSE of reduced-rank ridge at penalty ``lam`` for every rank k = 0..r ([r + 1], float64).

    ``P_k = A Q_k Q_k^T G``, so ``SSE_k = yy - 2 sum_{j<=k} q_j^T diag(D) ZB q_j + sum_{j<=k} ev_j q_j^T AA q_j``.
    """
    assert st.ZB is not None and st.AA is not None, "_rr_stats was given no test rows"
    D, ev, Q = _rr_directions(st, lam)
    cross = ((D[:, None] * st.ZB) @ Q * Q).sum(0)
    norm = ev * (st.AA @ Q * Q).sum(0)
    steps = torch.cumsum(norm - 2 * cross, 0)
    return torch.cat([steps.new_zeros(1), steps]).cpu() + st.yy


def _rank_grid(r: int) -> list[int]:
    """Ranks reported in the history: 0, 1, 2, 3, 4, 6, 8, 12, 16, ... and r."""
    out, k = {0, r}, 1
    while k < r:
        out |= {k, min(r, k + k // 2)} if k >= 2 else {k}
        k *= 2
    return sorted(v for v in out if v <= r)


def fit_reduced_rank(
    X: Float[Tensor, "n d_model"],
    Y: Float[Tensor, "n d_sae"],
    *,
    lam: float | Literal["cv"] = "cv",
    rank: int | Literal["cv"] = "cv",
    folds: int = 5,
    seed: int = 0,
    lambdas: Sequence[float] = RIDGE_PATH,
    chunk_size: int = 1024,
    X_val: Tensor | None = None,
    Y_val: Tensor | None = None,
) -> tuple[EffectApproximator, ReducedRankInfo]:
    """Reduced-rank ridge: the ridge fit ``W`` (penalty ``lam``, unpenalised bias), projected onto the
    top ``rank`` right singular vectors ``V_k`` of the centred fitted values ``Xc W``: ``W V_k V_k^T``.

    ``lam`` / ``rank`` set to ``"cv"`` are chosen by ``folds``-fold CV on ``(X, Y)`` over ``lambdas``
    and ranks 0 (the mean effect) .. full (plain ridge); ties go to the lower rank and larger penalty.
    Every rank is scored at once: in the SVD basis the CV error of each rank is a running sum of
    [r, r] quadratic forms. A fixed rank above the data's rank is capped. ``X_val``/``Y_val`` (never
    used to choose) add ``val_mse`` to the history. Returns the approximator and its
    :class:`ReducedRankInfo`: ``ridge_lambda``, ``rank``, ``history`` (rows ``ridge_lambda, rank,
    cv_mse[, val_mse]`` over a grid of ranks; empty when nothing is cross-validated).
    """
    check_xy(X, Y)
    if lam != "cv" and float(lam) < 0:
        raise ValueError(f"reduced-rank lam must be >= 0 or 'cv'; got {lam}")
    if rank != "cv" and int(rank) < 0:
        raise ValueError(f"reduced-rank rank must be >= 0 or 'cv'; got {rank}")
    if (X_val is None) != (Y_val is None):
        raise ValueError("pass both X_val and Y_val, or neither")
    lams = [float(lam)] if lam != "cv" else [float(v) for v in check_lambdas(lambdas)]  # descending
    B = svd_basis(X)
    r_full = min(B.s.numel(), Y.shape[1])
    cv: dict[float, Tensor] = {}
    if lam == "cv" or rank == "cv":
        parts = cv_folds(X.shape[0], folds, seed)
        if len(parts) < 2:
            raise ValueError("cross-validation needs at least 2 vectors")
        cv = {v: torch.zeros(r_full + 1, dtype=torch.float64) for v in lams}
        for k in range(len(parts)):
            tr = torch.cat([p for j, p in enumerate(parts) if j != k]).sort().values
            te = parts[k].sort().values
            Bf = svd_basis(X[tr.to(X.device)])
            st = _rr_stats(Y, tr, Bf, chunk_size, X[te.to(X.device)], Y, te)
            for v in lams:
                e = _rr_sse(st, v)[: r_full + 1]
                cv[v] += torch.cat([e, e[-1:].expand(r_full + 1 - e.numel())])  # ranks above this fold's: full fit
    ranks = list(range(r_full + 1)) if rank == "cv" else [min(int(rank), r_full)]
    best_lam, best_rank, best = lams[0], ranks[0], math.inf
    if cv:
        for v in lams:  # descending penalty, ascending rank: strict '<' keeps the simplest on ties
            for k in ranks:
                if float(cv[v][k]) < best * (1 - 1e-12):
                    best_lam, best_rank, best = v, k, float(cv[v][k])
    st = _rr_stats(Y, None, B, chunk_size, X_val, Y_val, None)
    D, _, Q = _rr_directions(st, best_lam)
    Qk = Q[:, :best_rank]
    C = B.Vt.T @ ((Qk @ (Qk.T * D[None, :])) / B.s[:, None])  # [d, r]: W = C U^T Yc
    W = torch.empty(X.shape[1], Y.shape[1], dtype=torch.float32, device=B.U.device)
    b = torch.empty(Y.shape[1], dtype=torch.float32, device=B.U.device)
    for c, Yc in column_chunks(Y, None, chunk_size, B.U.device):
        mu = Yc.mean(0)
        Wc = C @ (B.U.T @ (Yc - mu))
        W[:, c], b[c] = Wc.float(), (mu - B.mu_x @ Wc).float()
    history: list[dict[str, Any]] = []
    if cv:
        n_el = X.shape[0] * Y.shape[1]
        grid = _rank_grid(r_full) if rank == "cv" else ranks
        for v in lams:
            val = _rr_sse(st, v) if X_val is not None else None
            for k in grid:
                row: dict[str, Any] = {"ridge_lambda": v, "rank": k, "cv_mse": float(cv[v][k]) / n_el}
                if val is not None and Y_val is not None:
                    row["val_mse"] = float(val[min(k, val.numel() - 1)]) / Y_val.numel()
                history.append(row)
    info = ReducedRankInfo(
        fit="reduced_rank",
        ridge_lambda=best_lam,
        rank=best_rank,
        rank_max=r_full,
        rank_requested=None if rank == "cv" else int(rank),
        history=history,
    )
    return check_finite(EffectApproximator(W, b)), info


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
) -> tuple[EffectApproximator, ReducedRankInfo]:
    """``fit: reduced_rank`` with ``cfg.ridge_lambda``, ``cfg.rank`` (each fixed or ``cv``) and ``cfg.cv_folds``."""
    return fit_reduced_rank(
        X, Y, lam=cfg.ridge_lambda, rank=cfg.rank, folds=cfg.cv_folds, seed=seed, X_val=X_val, Y_val=Y_val
    )
