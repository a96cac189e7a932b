"""One call for every ``ApproximatorConfig.fit``: the table of fit families that notebook 02, the
design study and the diagnosis pick from (ridge, per-feature ridge, reduced rank, decoder prior, Adam).

Each family is a module of :mod:`saets_utils.approximator.fits` with a ``fit_from_config``; this module
only picks. Adding a family: a module there and one entry in :data:`FITS` (and its name in
``ApproximatorConfig.fit``; ``tests/approximator/test_training.py`` checks the two agree).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxtyping import Float
from torch import Tensor

from saets_utils.approximator.fits import adam, decoder_prior, per_feature, reduced_rank, ridge
from saets_utils.approximator.fits.common import FitFamily, FitInfo
from saets_utils.approximator.model import EffectApproximator

if TYPE_CHECKING:
    from saets_utils.config import ApproximatorConfig

__all__ = ["FITS", "fit_approximator"]

FITS: dict[str, FitFamily] = {
    "ridge": ridge.fit_from_config,
    "ridge_per_feature": per_feature.fit_from_config,
    "reduced_rank": reduced_rank.fit_from_config,
    "decoder_prior": decoder_prior.fit_from_config,
    "adam": adam.fit_from_config,
}


def fit_approximator(
    X: Float[Tensor, "n d_model"],
    Y: Float[Tensor, "n d_sae"],
    cfg: ApproximatorConfig,
    *,
    seed: int = 0,
    X_val: Tensor | None = None,
    Y_val: Tensor | None = None,
    progress: bool = False,
    W_dec: Tensor | None = None,
) -> tuple[EffectApproximator, FitInfo]:
    """Fit as ``cfg.fit`` says on the training vectors ``(X, Y)``; any choice (penalty, rank) uses
    them only. ``X_val``/``Y_val`` only add validation MSE to the history rows.

    Returns the approximator and its :class:`~saets_utils.approximator.fits.FitInfo`: ``fit``,
    ``ridge_lambda`` (None for adam and ridge_per_feature), ``rank`` (reduced_rank, decoder_prior),
    ``history`` (rows: the ridge path, the per-feature grid with how many features chose each
    penalty, the rank CV curve, or Adam's epochs), and each family's own fields
    (:class:`~saets_utils.approximator.fits.PerFeatureInfo`: the penalty per feature, ...).
    """
    if (X_val is None) != (Y_val is None):
        raise ValueError("pass both X_val and Y_val, or neither")
    family = FITS.get(cfg.fit)
    if family is None:
        raise ValueError(f"unknown approximator.fit {cfg.fit!r}; use one of {', '.join(FITS)}")
    return family(X, Y, cfg, seed=seed, X_val=X_val, Y_val=Y_val, W_dec=W_dec, progress=progress)
