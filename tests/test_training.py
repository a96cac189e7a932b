"""Choosing the ridge penalty by cross-validation on the training vectors only."""

import pytest
import torch

from saets_utils.training import RIDGE_PATH, choose_ridge_lambda


def _data(n: int, noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 16, generator=g)
    X = X / X.norm(dim=-1, keepdim=True)
    W = torch.randn(16, 40, generator=g)
    return X, X @ W + 0.3 + noise * torch.randn(n, 40, generator=g)


def test_cv_picks_a_small_penalty_for_clean_data_and_a_large_one_for_noise():
    lam_clean, cv_clean = choose_ridge_lambda(*_data(200, 0.01), "cv", 5, 0)
    lam_noise, cv_noise = choose_ridge_lambda(*_data(20, 5.0), "cv", 5, 0)
    assert lam_clean <= 1e-2 < 10 <= lam_noise
    assert set(cv_clean) == set(RIDGE_PATH) and min(cv_clean.values()) == cv_clean[lam_clean]


def test_fixed_penalty_is_used_as_is():
    assert choose_ridge_lambda(*_data(30, 0.1), 0.5, 5, 0) == (0.5, {})


def test_cv_is_seeded():
    X, Y = _data(40, 1.0)
    assert choose_ridge_lambda(X, Y, "cv", 4, 3) == choose_ridge_lambda(X, Y, "cv", 4, 3)


def test_negative_penalty_is_refused():
    from saets_utils.config import ApproximatorConfig

    with pytest.raises(ValueError, match="ridge_lambda"):
        ApproximatorConfig(ridge_lambda=-1.0)
