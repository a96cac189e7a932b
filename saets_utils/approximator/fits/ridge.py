"""Closed-form ridge, ``min ||X W + b - Y||^2 + lam ||W||^2`` with an unpenalised bias (``fit: ridge``,
the default: exact and fast).

:func:`fit_ridge` fits one penalty; :class:`RidgePath` gives every penalty's fit and training error
from one pass and one eigendecomposition, and :func:`ridge_cv_path` the k-fold CV error of every
penalty at about the cost of one fit; ``fit: ridge`` picks the penalty from :data:`RIDGE_PATH` by CV
(:func:`choose_ridge_lambda`) unless ``approximator.ridge_lambda`` fixes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from saets_utils.approximator.fits.common import FitInfo, check_finite, check_xy, cv_folds, mse
from saets_utils.approximator.model import EffectApproximator

if TYPE_CHECKING:
    from saets_utils.config import ApproximatorConfig

RIDGE_PATH = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


def fit_ridge(
    X: Float[Tensor, "n d_model"], Y: Float[Tensor, "n d_sae"], lam: float = 1e-3, chunk_size: int = 4096
) -> EffectApproximator:
    """Closed-form ridge fit, ``min ||X W + b - Y||^2 + lam ||W||^2`` with an unpenalised bias.

    Centres X and Y, solves in float64 (primal d_model x d_model system, or the n x n dual when
    n < d_model); ``lam = 0`` gives the minimum-norm least-squares solution. ``Y`` is read in row
    chunks so a 50k x 16k effect matrix is never copied whole to float64.
    """
    check_xy(X, Y)
    if lam < 0:
        raise ValueError(f"ridge lam must be >= 0; got {lam}")
    n, d = X.shape
    dev = X.device
    Xd = X.double()
    mu_x = Xd.mean(0)
    Xc = Xd - mu_x
    mu_y = sum(Y[i : i + chunk_size].to(dev, torch.float64).sum(0) for i in range(0, n, chunk_size)) / n
    if n >= d:
        G = Xc.T @ Xc
        # Xc^T 1 = 0, so Xc^T Y equals Xc^T (Y - mean): no centred copy of Y is needed.
        XtY = sum(
            Xc[i : i + chunk_size].T @ Y[i : i + chunk_size].to(dev, torch.float64) for i in range(0, n, chunk_size)
        )
        if lam > 0:
            W = torch.linalg.solve(G + lam * torch.eye(d, dtype=G.dtype, device=dev), XtY)
        else:
            W = torch.linalg.pinv(G, hermitian=True) @ XtY
    else:
        K = Xc @ Xc.T
        Yc = Y.to(dev, torch.float64) - mu_y
        A = (
            torch.linalg.solve(K + lam * torch.eye(n, dtype=K.dtype, device=dev), Yc)
            if lam > 0
            else torch.linalg.pinv(K, hermitian=True) @ Yc
        )
        W = Xc.T @ A
    b = mu_y - mu_x @ W
    return check_finite(EffectApproximator(W.float(), b.float()))


def choose_ridge_lambda(
    X: Tensor, Y: Tensor, setting: float | str, *, folds: int, seed: int, total: _Moments | None = None
) -> tuple[float, dict[float, float]]:
    """The ridge penalty to use: ``setting`` itself, or with ``"cv"`` the value of :data:`RIDGE_PATH`
    with the lowest k-fold cross-validated MSE on the training vectors ``X [n, d_model]``,
    ``Y [n, d_sae]`` (:func:`ridge_cv_path`). Returns it and the CV MSE per candidate (empty when
    not cross-validated). ``total``: the moments of all rows, if already computed (:func:`moments`)."""
    if setting != "cv":
        return float(setting), {}
    cv = ridge_cv_path(X, Y, RIDGE_PATH, folds=folds, seed=seed, total=total)
    return min(cv, key=cv.__getitem__), cv


@dataclass
class _Moments:
    """Sums over a set of rows: ``G = X^T X [d, d]``, ``XtY [d, d_sae]``, ``sx [d]``, ``sy [d_sae]``,
    ``yy = sum(Y**2)`` and the row count ``n`` (float64, on X's device)."""

    G: Tensor
    XtY: Tensor
    sx: Tensor
    sy: Tensor
    yy: Tensor
    n: int

    def __sub__(self, o: _Moments) -> _Moments:
        return _Moments(self.G - o.G, self.XtY - o.XtY, self.sx - o.sx, self.sy - o.sy, self.yy - o.yy, self.n - o.n)

    def centred(self, mu_x: Tensor, mu_y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(X - mu_x)^T (X - mu_x)``, ``(X - mu_x)^T (Y - mu_y)`` and ``||Y - mu_y||^2`` of these rows."""
        G = self.G - torch.outer(self.sx, mu_x) - torch.outer(mu_x, self.sx) + self.n * torch.outer(mu_x, mu_x)
        C = self.XtY - torch.outer(self.sx, mu_y) - torch.outer(mu_x, self.sy) + self.n * torch.outer(mu_x, mu_y)
        yy = self.yy - 2 * (mu_y @ self.sy) + self.n * (mu_y @ mu_y)
        return G, C, yy


def moments(X: Float[Tensor, "n d_model"], Y: Float[Tensor, "n d_sae"], chunk_size: int = 4096) -> _Moments:
    """The sums ridge needs over all rows of ``X``, ``Y`` (one pass, float64, on X's device)."""
    check_xy(X, Y)
    return _moments(X, Y, None, chunk_size)


def _moments(X: Tensor, Y: Tensor, rows: Tensor | None, chunk: int) -> _Moments:
    dev = X.device
    rows = torch.arange(X.shape[0]) if rows is None else rows
    d, k = X.shape[1], Y.shape[1]
    m = _Moments(
        torch.zeros(d, d, dtype=torch.float64, device=dev),
        torch.zeros(d, k, dtype=torch.float64, device=dev),
        torch.zeros(d, dtype=torch.float64, device=dev),
        torch.zeros(k, dtype=torch.float64, device=dev),
        torch.zeros((), dtype=torch.float64, device=dev),
        int(rows.numel()),
    )
    for i in range(0, rows.numel(), chunk):
        r = rows[i : i + chunk]
        x = X[r.to(X.device)].to(dev, torch.float64)
        y = Y[r.to(Y.device)].to(dev, torch.float64)
        m.G += x.T @ x
        m.XtY += x.T @ y
        m.sx += x.sum(0)
        m.sy += y.sum(0)
        m.yy += (y * y).sum()
    return m


@torch.no_grad()
def ridge_cv_path(
    X: Float[Tensor, "n d_model"],
    Y: Float[Tensor, "n d_sae"],
    lambdas: Sequence[float] = RIDGE_PATH,
    *,
    folds: int = 5,
    seed: int = 0,
    chunk_size: int = 4096,
    total: _Moments | None = None,
) -> dict[float, float]:
    """k-fold cross-validated MSE of :func:`fit_ridge` for every penalty in ``lambdas`` (``0`` =
    minimum-norm least squares), equal to refitting per fold and penalty, at about the cost of one fit.

    One pass over the data gives ``X^T X``, ``X^T Y`` and the sums of all rows and of each fold.
    Per fold, the training set's centred Gram matrix is diagonalised once, ``Q diag(e) Q^T``; with
    ``R = Q^T C`` (``C`` its centred ``X^T Y``), the held-out fold's ``Z = Q^T Gv Q`` and
    ``a = rowsum((Q^T Cv) * R)``, the held-out squared error of penalty ``lam`` is
    ``||Yv - mu_y||^2 - 2 a.D + D^T (Z * R R^T) D`` with ``D = 1 / (e + lam)``: the whole path then
    costs ``O(d^2)`` per penalty. Cost: 2 passes of ``n d d_sae`` flops plus 3 ``d^2 d_sae`` per
    fold; memory: two ``[d, d_sae]`` float64 matrices beyond the data. ``total``: the moments of
    all rows (:func:`moments`), if the caller already has them (the pass over the data is skipped).
    """
    check_xy(X, Y)
    lam = torch.tensor([float(v) for v in lambdas], dtype=torch.float64)
    if lam.numel() == 0 or bool((lam < 0).any()) or not bool(torch.isfinite(lam).all()):
        raise ValueError(f"lambdas must be a non-empty list of finite penalties >= 0; got {list(lambdas)}")
    n = X.shape[0]
    total = total if total is not None else moments(X, Y, chunk_size)
    sse = torch.zeros(lam.numel(), dtype=torch.float64)
    for part in cv_folds(n, folds, seed):
        held = _moments(X, Y, part, chunk_size)
        fit = RidgePath.of(total - held)  # the training rows' eigendecomposition and R
        Gv, Cv, yy = held.centred(fit.mu_x, fit.mu_y)
        a = ((fit.Q.T @ Cv) * fit.R).sum(1)
        ZM = (fit.Q.T @ Gv @ fit.Q) * (fit.R @ fit.R.T)
        for j, lj in enumerate(lam.tolist()):
            D = fit.inverse(lj)
            sse[j] += float(yy - 2 * (D @ a) + D @ ZM @ D)
    return {float(v): float(s) / (n * Y.shape[1]) for v, s in zip(lam.tolist(), sse.tolist(), strict=True)}


@dataclass(frozen=True)
class RidgePath:
    """:func:`fit_ridge` for every penalty from one eigendecomposition of the centred Gram matrix
    ``Xc^T Xc = Q diag(e) Q^T``: ``W(lam) = Q diag(1 / (e + lam)) R`` with ``R = Q^T Xc^T Yc
    [d, d_sae]``, and its training SSE ``||Yc||^2 - 2 sum_i D_i s_i + sum_i D_i^2 e_i s_i``
    (``D = 1 / (e + lam)``, ``s_i = ||R_i||^2``) without another pass over the data. ``lam = 0``
    is the minimum-norm least-squares fit (eigenvalues under pinv's cut-off dropped)."""

    mu_x: Tensor  # [d]
    mu_y: Tensor  # [d_sae]
    e: Tensor  # [d]
    Q: Tensor  # [d, d]
    R: Tensor  # [d, d_sae]
    yy: Tensor  # ||Yc||^2
    n: int

    @classmethod
    def of(cls, total: _Moments) -> RidgePath:
        """From the moments of all training rows (:func:`moments`)."""
        mu_x, mu_y = total.sx / total.n, total.sy / total.n
        G, C, yy = total.centred(mu_x, mu_y)
        e, Q = torch.linalg.eigh(G)
        return cls(mu_x, mu_y, e, Q, Q.T @ C, yy, total.n)

    def inverse(self, lam: float) -> Tensor:
        """``1 / (e + lam)`` ``[d]``; for ``lam = 0``, eigenvalues under pinv's cut-off give 0."""
        if lam < 0:
            raise ValueError(f"ridge lam must be >= 0; got {lam}")
        if lam == 0:
            keep = self.e > self.e.abs().max() * self.e.numel() * torch.finfo(self.e.dtype).eps
            return torch.where(keep, 1.0 / self.e, torch.zeros_like(self.e))
        return 1.0 / (self.e + lam)

    def fit(self, lam: float) -> EffectApproximator:
        """The approximator :func:`fit_ridge` gives with this penalty (equal up to float64 rounding)."""
        W = self.Q @ (self.inverse(lam)[:, None] * self.R)
        return check_finite(EffectApproximator(W.float(), (self.mu_y - self.mu_x @ W).float()))

    def train_mse(self, lam: float) -> float:
        """Mean squared error of :meth:`fit` on its own training rows, per entry of ``Y``."""
        D, s = self.inverse(lam), (self.R * self.R).sum(1)
        sse = self.yy - 2 * (D * s).sum() + (D * D * self.e * s).sum()
        return max(float(sse), 0.0) / (self.n * self.R.shape[1])


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
) -> tuple[EffectApproximator, FitInfo]:
    """``fit: ridge``: the penalty ``cfg.ridge_lambda`` (or by ``cfg.cv_folds``-fold CV over
    :data:`RIDGE_PATH`); the history has a row per penalty of the path (training, CV and validation
    MSE), all from one pass over the data."""
    total = moments(X, Y)
    lam, cv = choose_ridge_lambda(X, Y, cfg.ridge_lambda, folds=cfg.cv_folds, seed=seed, total=total)
    path = RidgePath.of(total)
    rows = []
    for lam_i in sorted({*RIDGE_PATH, lam}):
        row = {"ridge_lambda": lam_i, "train_mse": path.train_mse(lam_i), "cv_mse": cv.get(lam_i)}
        if X_val is not None and Y_val is not None:
            row["val_mse"] = mse(path.fit(lam_i), X_val, Y_val)
        rows.append(row)
    return path.fit(lam), FitInfo(fit="ridge", ridge_lambda=lam, history=rows)
