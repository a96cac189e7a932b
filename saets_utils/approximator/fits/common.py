"""What every fit of the effect approximator shares: input checks, the check for finite weights,
the MSE of a fit on a set of vectors, CV folds, the thin SVD of centred inputs, column blocks of the
effects, and :class:`FitInfo`, the typed record of what a fit chose.

A fit family is a module of this package with a ``fit_from_config`` (:class:`FitFamily`);
``approximator/fitting.py`` holds the table of families.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from saets_utils.approximator.model import EffectApproximator

if TYPE_CHECKING:
    from saets_utils.config import ApproximatorConfig


@dataclass(kw_only=True)
class FitInfo:
    """What a fit chose and how it got there: ``fit`` (its ``approximator.fit`` name), the ridge
    penalty and rank it chose (None where the family has none) and its ``history`` (rows: the ridge
    path, the per-feature grid, the rank CV curve or Adam's epochs). Families add their own fields."""

    fit: str
    ridge_lambda: float | None = None
    rank: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Every field by name, in declaration order (base fields first)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def reported(self) -> dict[str, Any]:
        """The family's own numbers that 02 adds to ``approximator_metrics.json`` (beyond the penalty
        and rank every fit reports)."""
        return {}


class FitFamily(Protocol):
    """A family's entry in the table of fits: fit ``(X [n, d_model], Y [n, d_sae])`` as ``cfg`` says;
    ``X_val``/``Y_val`` only add validation MSE to the history; ``W_dec [d_sae, d_model]``: the SAE's
    decoder (the decoder prior needs it)."""

    def __call__(
        self,
        X: Tensor,
        Y: Tensor,
        cfg: ApproximatorConfig,
        *,
        seed: int,
        X_val: Tensor | None,
        Y_val: Tensor | None,
        W_dec: Tensor | None,
        progress: bool,
    ) -> tuple[EffectApproximator, FitInfo]: ...


def check_xy(X: Tensor, Y: Tensor) -> None:
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"need X [n, d_model] and Y [n, d_sae] with the same n; got X {tuple(X.shape)}, Y {tuple(Y.shape)}"
        )
    if X.shape[0] < 2:
        raise ValueError(f"need at least 2 (vector, effect) pairs to fit; got {X.shape[0]}")


def check_finite(approx: EffectApproximator) -> EffectApproximator:
    if not (torch.isfinite(approx.W).all() and torch.isfinite(approx.b).all()):
        raise ValueError("fit produced non-finite weights; check the effects for NaN/inf rows or raise lam / lower lr")
    return approx


@torch.no_grad()
def mse(approx: EffectApproximator, X: Tensor, Y: Tensor, chunk: int = 4096) -> float:
    total = 0.0
    for i in range(0, X.shape[0], chunk):
        pred = approx.predict(X[i : i + chunk].to(approx.W.device))
        total += F.mse_loss(pred, Y[i : i + chunk].to(pred), reduction="sum").item()
    return total / (X.shape[0] * Y.shape[1])


def cv_folds(n: int, folds: int, seed: int) -> list[Tensor]:
    folds = min(folds, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[i::folds] for i in range(folds)]


@dataclass(frozen=True)
class Basis:
    """Thin SVD of centred inputs: ``X - mu_x = U diag(s) Vt``; U [n, r], s [r], Vt [r, d] (float64)."""

    mu_x: Tensor
    U: Tensor
    s: Tensor
    Vt: Tensor


def svd_basis(X: Tensor) -> Basis:
    Xd = X.double()
    mu = Xd.mean(0)
    U, s, Vt = torch.linalg.svd(Xd - mu, full_matrices=False)
    # Centring removes one dimension (and duplicates more): drop numerically-zero directions.
    keep = s > (s.max() if s.numel() else 0) * max(X.shape) * torch.finfo(torch.float64).eps
    return Basis(mu, U[:, keep], s[keep], Vt[keep])


def column_chunks(Y: Tensor, rows: Tensor | None, chunk: int, device: torch.device) -> Iterator[tuple[slice, Tensor]]:
    """Column blocks ``Y[rows, c]`` as float64 on ``device`` (only the block is copied)."""
    for c0 in range(0, Y.shape[1], chunk):
        c = slice(c0, min(c0 + chunk, Y.shape[1]))
        yield c, (Y[:, c] if rows is None else Y[rows.to(Y.device), c]).to(device, torch.float64)


def check_lambdas(lambdas: Sequence[float]) -> Tensor:
    lam = torch.tensor(sorted({float(v) for v in lambdas}, reverse=True), dtype=torch.float64)
    if lam.numel() == 0 or not (lam > 0).all() or torch.isnan(lam).any():
        raise ValueError(f"lambdas must be a non-empty list of penalties > 0 (inf allowed); got {list(lambdas)}")
    return lam
