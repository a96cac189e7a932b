"""The fit families of the effect approximator, one module each (``approximator/fitting.py`` holds
the table that ``approximator.fit`` picks from):

- :mod:`.ridge`: closed-form ridge with one penalty, by CV over :data:`RIDGE_PATH` (``fit: ridge``, the
  default); :class:`RidgePath`, :func:`ridge_cv_path`: every penalty's fit and CV error from one pass.
- :mod:`.per_feature`: a penalty per SAE feature by exact leave-one-out CV (``ridge_per_feature``).
- :mod:`.reduced_rank`: ridge projected onto its top singular directions, rank and penalty by CV
  (``reduced_rank``).
- :mod:`.decoder_prior`: the SAE's decoder rows with a gain per feature plus a low-rank part, fitted
  for targeting (``decoder_prior``).
- :mod:`.adam`: the reference training (``adam``).
- :mod:`.common`: what they share, and :class:`FitInfo`, the typed record of what a fit chose.
"""

from saets_utils.approximator.fits.adam import fit_adam
from saets_utils.approximator.fits.common import FitInfo, cv_folds, mse
from saets_utils.approximator.fits.decoder_prior import DecoderPriorInfo, fit_decoder_prior
from saets_utils.approximator.fits.per_feature import (
    PER_FEATURE_LAMBDAS,
    PerFeatureInfo,
    fit_per_feature_grid,
    fit_ridge_per_feature,
)
from saets_utils.approximator.fits.reduced_rank import ReducedRankInfo, fit_reduced_rank
from saets_utils.approximator.fits.ridge import (
    RIDGE_PATH,
    RidgePath,
    choose_ridge_lambda,
    fit_ridge,
    moments,
    ridge_cv_path,
)

__all__ = [
    "PER_FEATURE_LAMBDAS",
    "RIDGE_PATH",
    "DecoderPriorInfo",
    "FitInfo",
    "PerFeatureInfo",
    "ReducedRankInfo",
    "RidgePath",
    "choose_ridge_lambda",
    "cv_folds",
    "fit_adam",
    "fit_decoder_prior",
    "fit_per_feature_grid",
    "fit_reduced_rank",
    "fit_ridge",
    "fit_ridge_per_feature",
    "moments",
    "mse",
    "ridge_cv_path",
]
