"""The decoder-prior + low-rank effect approximator recovers a map of that form and falls back sensibly."""

from __future__ import annotations

import math

import pytest
import torch

from saets_utils.approximator.fits.decoder_prior import decoder_directions, fit_decoder_prior, prior_gains
from saets_utils.approximator.fitting import fit_approximator
from saets_utils.config import ApproximatorConfig


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _synthetic(
    n_rows: int = 120, n_random: int = 120, noise: float = 0.01, seed: int = 0, d_model: int = 24, low: float = 0.3
):
    g = torch.Generator().manual_seed(seed)
    d_sae = 160
    W_dec = _unit_rows(torch.randn(d_sae, d_model, generator=g, dtype=torch.float64)) * 3.0  # norms do not matter
    P = decoder_directions(W_dec)
    gamma = 0.5 + torch.rand(d_sae, generator=g, dtype=torch.float64)
    L = torch.randn(d_model, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, d_sae, generator=g, dtype=torch.float64
    )
    W_true = P * gamma + low * L
    b_true = torch.randn(d_sae, generator=g, dtype=torch.float64)
    X = torch.cat(
        [_unit_rows(W_dec[:n_rows]), _unit_rows(torch.randn(n_random, d_model, generator=g, dtype=torch.float64))]
    )
    Y = X @ W_true + b_true + noise * torch.randn(X.shape[0], d_sae, generator=g, dtype=torch.float64)
    return X.float(), Y.float(), W_dec.float(), W_true, b_true, gamma


def test_recovers_prior_plus_low_rank_map():
    X, Y, W_dec, W_true, b_true, _ = _synthetic()
    approx, info = fit_decoder_prior(X, Y, W_dec, kappa="cv", lam="cv", rank="cv")
    err = (approx.W.double() - W_true).norm() / W_true.norm()
    assert err < 0.1, f"relative error of W {err:.3f}"
    assert torch.allclose(approx.b.double(), b_true, atol=0.05)
    assert info.rank >= 2
    # a feature whose own decoder row was measured: its gain column points along its decoder row
    P = decoder_directions(W_dec)
    cos = torch.nn.functional.cosine_similarity(approx.W.double()[:, 3], W_true[:, 3], dim=0)
    assert cos > 0.95
    assert float(P[:, 3] @ approx.W.double()[:, 3]) == pytest.approx(float(P[:, 3] @ W_true[:, 3]), rel=0.1)


def test_beats_reduced_rank_on_heldout_with_few_vectors():
    """The point of the prior: with fewer vectors than d_model, a feature-specific column for every
    feature predicts held-out decoder rows' own features better than the best low-rank ridge."""
    X, Y, W_dec, W_true, b_true, _ = _synthetic(n_rows=40, n_random=0, noise=0.05, d_model=64, low=0.05)
    Xv = _unit_rows(W_dec[40:120].double()).float()
    Yv = (Xv.double() @ W_true + b_true).float()
    prior, _ = fit_decoder_prior(X, Y, W_dec)
    rr, _ = fit_approximator(X, Y, ApproximatorConfig(fit="reduced_rank"))
    own = torch.arange(40, 120)
    rows = torch.arange(80)
    err_prior = float(((prior.predict(Xv) - Yv)[rows, own] ** 2).mean())
    err_rr = float(((rr.predict(Xv) - Yv)[rows, own] ** 2).mean())
    assert err_prior < 0.5 * err_rr
    assert float(((prior.predict(Xv) - Yv) ** 2).mean()) < float(((rr.predict(Xv) - Yv) ** 2).mean())


def test_gains_shrink_to_pooled_gain():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(50, 8, generator=g, dtype=torch.float64)
    A[:, 5] = 0.0  # a feature the data say nothing about
    Yc = A * torch.arange(1, 9, dtype=torch.float64)
    free, g0 = prior_gains(A, Yc, 0.0)
    assert torch.allclose(free[:5], torch.arange(1, 6, dtype=torch.float64))
    assert free[5] == pytest.approx(g0)
    same, g0b = prior_gains(A, Yc, math.inf)
    assert g0b == pytest.approx(g0) and torch.allclose(same, torch.full_like(same, g0))
    mid, _ = prior_gains(A, Yc, 10.0)
    assert ((mid - g0).abs() <= (free - g0).abs() + 1e-12).all()  # shrinkage moves every gain toward g0
    with pytest.raises(ValueError, match="kappa"):
        prior_gains(A, Yc, -1.0)


def test_fit_approximator_needs_w_dec_and_checks_shapes():
    X, Y, W_dec, *_ = _synthetic(n_rows=20, n_random=20)
    cfg = ApproximatorConfig(fit="decoder_prior")
    with pytest.raises(ValueError, match="W_dec"):
        fit_approximator(X, Y, cfg)
    with pytest.raises(ValueError, match="W_dec must be"):
        fit_approximator(X, Y, cfg, W_dec=W_dec[:, :-1])
    approx, info = fit_approximator(X, Y, cfg, W_dec=W_dec, X_val=X[:5], Y_val=Y[:5])
    assert approx.W.shape == (X.shape[1], Y.shape[1]) and info.kappa in (0.0, 0.01, 0.1, 1.0, 10.0, 100.0, math.inf)
    assert any(r.get("part") == "prior+low_rank" for r in info.history)
