"""Properties of the effect approximator: fits recover a known linear map (ridge, Adam, per-feature
ridge, reduced-rank ridge), metrics rank a perfect fit above the baselines and their intervals behave
(coverage, noise ceiling), the split is seeded, files round-trip."""

import json
import math

import pytest
import torch

from saets_utils.approximator.fits import (
    RidgePath,
    choose_ridge_lambda,
    cv_folds,
    fit_adam,
    fit_per_feature_grid,
    fit_reduced_rank,
    fit_ridge,
    fit_ridge_per_feature,
    moments,
    mse,
    ridge_cv_path,
)
from saets_utils.approximator.metrics import approximator_metrics, heldout_r2, noise_ceiling, split_half_reliability
from saets_utils.approximator.model import (
    EffectApproximator,
    load_rotation,
    pinverse,
    rank_rtol,
    rotation_matrix,
    split_holdout,
)

D_MODEL, D_SAE, N, NOISE = 16, 24, 400, 0.01


def unit_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def synthetic():
    """effects = X @ W + b + noise, X unit rows (as the real steering vectors)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D_MODEL, D_SAE, generator=g)
    b = torch.randn(D_SAE, generator=g) * 3
    X = unit_rows(N, D_MODEL, g)
    Y = X @ W + b + NOISE * torch.randn(N, D_SAE, generator=g)
    return X, Y, W, b


# Least-squares error of one W entry ~ NOISE / sqrt(N * Var(x_i)) = 0.01 / sqrt(400 / 16) = 0.002;
# the max over 384 entries stays below ~5 sigma = 0.01, so atol 0.02 has margin but catches any bug.
def test_ridge_recovers_known_map(synthetic):
    X, Y, W, b = synthetic
    approx = fit_ridge(X, Y, lam=1e-6)
    assert approx.W.shape == (D_MODEL, D_SAE) and approx.b.shape == (D_SAE,)
    torch.testing.assert_close(approx.W, W, atol=0.02, rtol=0)
    torch.testing.assert_close(approx.b, b, atol=0.01, rtol=0)


def test_ridge_bias_is_unpenalised(synthetic):
    X, Y, _, _b = synthetic
    # A huge penalty shrinks W to ~0, so b must become the mean effect (not be shrunk itself).
    approx = fit_ridge(X, Y, lam=1e9)
    assert approx.W.abs().max() < 1e-3
    torch.testing.assert_close(approx.b, Y.mean(0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("lam", [0.0, 1e-4])
def test_ridge_with_fewer_vectors_than_width(synthetic, lam):
    X, Y, _, _ = synthetic
    approx = fit_ridge(X[:10], Y[:10], lam=lam)  # n=10 < d_model=16: under-determined
    assert torch.isfinite(approx.W).all()
    # min-norm (or lightly ridged) solution interpolates the training points
    torch.testing.assert_close(approx.predict(X[:10]), Y[:10], atol=1e-2, rtol=0)


def test_ridge_chunking_does_not_change_result(synthetic):
    X, Y, _, _ = synthetic
    a, c = fit_ridge(X, Y, lam=1e-3), fit_ridge(X, Y, lam=1e-3, chunk_size=7)
    torch.testing.assert_close(a.W, c.W, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.b, c.b, atol=1e-5, rtol=0)


def test_fit_rejects_bad_shapes(synthetic):
    X, Y, _, _ = synthetic
    with pytest.raises(ValueError, match="same n"):
        fit_ridge(X, Y[:-1])
    with pytest.raises(ValueError, match="lam"):
        fit_ridge(X, Y, lam=-1)
    with pytest.raises(ValueError, match="non-finite"):
        fit_ridge(X, torch.where(torch.arange(N)[:, None] == 3, float("nan"), Y))


def test_adam_recovers_known_map_and_logs_history(synthetic):
    X, Y, W, b = synthetic
    X_tr, Y_tr, X_va, Y_va = X[:350], Y[:350], X[350:], Y[350:]
    approx, hist = fit_adam(X_tr, Y_tr, lr=0.05, epochs=40, batch_size=32, seed=0, X_val=X_va, Y_val=Y_va)
    # Same statistical error as ridge (~0.007 max here) plus Adam's residual optimisation error,
    # which the cosine decay to ~0 keeps small: a bit looser than the exact fit.
    torch.testing.assert_close(approx.W, W, atol=0.03, rtol=0)
    torch.testing.assert_close(approx.b, b, atol=0.01, rtol=0)
    assert [h["epoch"] for h in hist] == list(range(1, 41))
    assert hist[-1]["val_mse"] < 0.01 * hist[0]["val_mse"]
    assert hist[-1]["lr"] < hist[0]["lr"] == 0.05  # cosine decay
    json.dumps(hist)


def test_adam_is_seeded(synthetic):
    X, Y, _, _ = synthetic
    a, _ = fit_adam(X, Y, lr=0.01, epochs=2, batch_size=64, seed=3)
    c, _ = fit_adam(X, Y, lr=0.01, epochs=2, batch_size=64, seed=3)
    d, _ = fit_adam(X, Y, lr=0.01, epochs=2, batch_size=64, seed=4)
    assert torch.equal(a.W, c.W) and not torch.equal(a.W, d.W)


def test_split_holdout_is_seeded_disjoint_and_order_free():
    ids = torch.arange(100, 150)
    tr, va = split_holdout(ids, 10, seed=0)
    assert len(va) == 10 and len(tr) == 40
    assert set(tr.tolist()).isdisjoint(va.tolist()) and set(tr.tolist()) | set(va.tolist()) == set(range(50))
    assert torch.equal(va, split_holdout(ids, 10, seed=0)[1])
    assert not torch.equal(va, split_holdout(ids, 10, seed=1)[1])
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(5))
    _, va_perm = split_holdout(ids[perm], 10, seed=0)
    assert set(ids[perm][va_perm].tolist()) == set(ids[va].tolist())


@pytest.mark.parametrize("n_holdout", [0, 5, 6])
def test_split_holdout_rejects_impossible_sizes(n_holdout):
    with pytest.raises(ValueError, match="n_holdout"):
        split_holdout(torch.arange(5), n_holdout, seed=0)


def test_split_holdout_rejects_duplicate_ids():
    with pytest.raises(ValueError, match="duplicates"):
        split_holdout(torch.tensor([1, 2, 2, 3]), 1, seed=0)


def test_metrics_rank_perfect_mean_and_zero_predictors(synthetic):
    X, Y, W, b = synthetic
    X_va, Y_va = X[:50], X[:50] @ W + b
    mu = Y.mean(0)
    perfect = approximator_metrics(EffectApproximator(W, b), X_va, Y_va, mu)
    assert perfect.r2 == pytest.approx(1.0, abs=1e-6) and perfect.beats_mean_baseline
    assert perfect.mse < 1e-9 < perfect.mse_mean < perfect.mse_zero
    assert perfect.per_feature_r2_median == pytest.approx(1.0, abs=1e-6)
    assert perfect.per_feature_r2_frac_positive == 1.0
    assert perfect.cosine_mean == pytest.approx(1.0, abs=1e-6)
    assert len(perfect.per_feature_r2) == D_SAE

    zero = approximator_metrics(EffectApproximator(torch.zeros(D_MODEL, D_SAE), torch.zeros(D_SAE)), X_va, Y_va, mu)
    assert not zero.beats_mean_baseline and zero.r2 < 0
    assert zero.mse == pytest.approx(zero.mse_zero)

    mean = approximator_metrics(EffectApproximator(torch.zeros(D_MODEL, D_SAE), mu), X_va, Y_va, mu)
    assert not mean.beats_mean_baseline and mean.r2 == pytest.approx(0.0, abs=1e-6)
    for m in (perfect, zero, mean):
        json.dumps(m.as_dict(), allow_nan=False)


def test_metrics_decoder_top1_and_per_vector():
    g = torch.Generator().manual_seed(1)
    W_dec = torch.linalg.qr(torch.randn(D_MODEL, 8, generator=g))[0].T  # 8 orthonormal rows
    fid = torch.tensor([0, 3, 5, 7, -1])
    X = torch.cat([W_dec[fid[:4]], unit_rows(1, D_MODEL, g)])
    Y = 3 * X @ W_dec.T  # each decoder row excites its own feature most
    good = EffectApproximator(3 * W_dec.T, torch.zeros(8))
    bad = EffectApproximator(3 * W_dec.T[:, torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])], torch.zeros(8))
    m = approximator_metrics(good, X, Y, torch.zeros(8), val_ids=torch.arange(10, 15), decoder_feature_ids=fid)
    assert m.decoder_top1_predicted == 1.0 and m.decoder_top1_measured == 1.0 and m.n_decoder_rows == 4
    assert [r["id"] for r in m.per_vector] == list(range(10, 15))
    assert approximator_metrics(bad, X, Y, torch.zeros(8), decoder_feature_ids=fid).decoder_top1_predicted == 0.0
    with pytest.raises(ValueError, match="decoder_feature_ids"):
        approximator_metrics(good, X, Y, torch.zeros(8), decoder_feature_ids=torch.tensor([0, 1]))


def test_predict_and_correction(synthetic):
    _, _, W, b = synthetic
    approx = EffectApproximator(W, b)
    x = unit_rows(3, D_MODEL, torch.Generator().manual_seed(2))
    torch.testing.assert_close(approx.predict(x), x @ W + b)
    assert approx.correction.norm() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(EffectApproximator(W, torch.zeros(D_SAE)).correction, torch.zeros(D_MODEL))
    with pytest.raises(ValueError, match="width"):
        approx.predict(torch.zeros(2, D_MODEL + 1))
    with pytest.raises(ValueError, match="d_model, d_sae"):
        EffectApproximator(W, b[:-1])


def test_save_load_round_trip(tmp_path, synthetic):
    _, _, W, b = synthetic
    approx = EffectApproximator(W, b)
    W_dec = unit_rows(D_SAE, D_MODEL, torch.Generator().manual_seed(3))
    approx.save(tmp_path / "a.safetensors", W_dec=W_dec)
    back = EffectApproximator.load(tmp_path / "a.safetensors")
    assert torch.equal(back.W, W) and torch.equal(back.b, b)
    torch.testing.assert_close(load_rotation(tmp_path / "a.safetensors"), rotation_matrix(approx, W_dec))
    approx.save(tmp_path / "b.safetensors")
    assert load_rotation(tmp_path / "b.safetensors") is None


def test_rank_rtol_is_at_the_coarsest_storage_precision():
    assert rank_rtol((576, 4608), torch.float32) == 4608 * torch.finfo(torch.float32).eps
    assert rank_rtol((576, 4608), torch.float64) == 4608 * torch.finfo(torch.float64).eps
    assert rank_rtol((4, 3), torch.float64, torch.bfloat16) == 4 * torch.finfo(torch.bfloat16).eps
    assert rank_rtol((4, 3), torch.int64) == 4 * torch.finfo(torch.float64).eps


def test_low_rank_approximator_saves_a_rank_k_rotation_and_has_a_rank_k_pinverse(tmp_path):
    # A reduced-rank fit (rank 3) stored in float32: its pseudo-inverse and the rotation saved next
    # to it keep rank 3 instead of inverting / rotating float32 rounding noise.
    g = torch.Generator().manual_seed(4)
    W = (
        torch.randn(D_MODEL, 3, generator=g, dtype=torch.float64)
        @ torch.randn(3, D_SAE, generator=g, dtype=torch.float64)
    ).float()
    approx = EffectApproximator(W, torch.zeros(D_SAE))
    assert torch.linalg.matrix_rank(torch.linalg.pinv(W.double()), rtol=1e-9) > 3  # the old cut-off: noise
    assert torch.linalg.matrix_rank(pinverse(W), rtol=1e-9) == 3
    approx.save(tmp_path / "a.safetensors", W_dec=unit_rows(D_SAE, D_MODEL, g))
    R = load_rotation(tmp_path / "a.safetensors")
    assert R is not None and torch.linalg.matrix_rank(R.double(), rtol=1e-4) == 3


# ---- per-feature ridge ---------------------------------------------------------------------------


def test_per_feature_loo_is_exact_and_columns_are_ridge_fits():
    g = torch.Generator().manual_seed(7)
    n, d, m = 14, 5, 4
    X, Y = torch.randn(n, d, generator=g), torch.randn(n, m, generator=g)
    Y = Y + X @ torch.randn(d, m, generator=g)
    lams = (0.1, 1.0, 10.0, math.inf)
    approx, chosen, rows = fit_per_feature_grid(X, Y, lams, chunk_size=3, rule="min")
    for row in rows:  # closed-form LOO MSE == refitting n times without each vector
        lam, sse = row["ridge_lambda"], 0.0
        for i in range(n):
            keep = torch.arange(n) != i
            pred = Y[keep].mean(0) if math.isinf(lam) else fit_ridge(X[keep], Y[keep], lam).predict(X[i])
            sse += float(((Y[i] - pred) ** 2).sum())
        assert row["cv_mse"] == pytest.approx(sse / (n * m), rel=1e-6)
    assert sum(r["n_features"] for r in rows) == m
    for j in range(m):  # each column is the ordinary ridge fit at its chosen penalty
        lam = float(chosen[j])
        ref = fit_ridge(X, Y[:, j : j + 1], lam if math.isfinite(lam) else 1e15)
        torch.testing.assert_close(approx.W[:, j], ref.W[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(approx.b[j], ref.b[0], atol=1e-5, rtol=0)


def _mixed(seed: int):
    """8 features driven by x (low noise), 32 features that only move by large noise."""
    g = torch.Generator().manual_seed(seed)
    d, ns, nn, n = 12, 8, 32, 150
    W = torch.zeros(d, ns + nn)
    W[:, :ns] = 3 * torch.randn(d, ns, generator=g)
    sd = torch.cat([torch.full((ns,), 0.05), torch.full((nn,), 3.0)])
    X = unit_rows(n + 2000, d, g)
    Y = X @ W + torch.randn(ns + nn, generator=g) + sd * torch.randn(n + 2000, ns + nn, generator=g)
    return X[:n], Y[:n], X[n:], Y[n:], W, ns


@pytest.mark.parametrize("rule", ["one_se", "min"])
def test_per_feature_ridge_fits_signal_features_and_predicts_the_mean_elsewhere(rule):
    Xt, Yt, Xv, Yv, W, ns = _mixed(0)
    approx, lam = fit_ridge_per_feature(Xt, Yt, rule=rule)
    # LS error of a W entry ~ 0.05 / sqrt(150 / 12) = 0.014; small penalties barely shrink.
    torch.testing.assert_close(approx.W[:, :ns], W[:, :ns], atol=0.1, rtol=0)
    assert (lam[:ns] <= 1).all() and (lam[ns:] >= 100).float().mean() >= 0.75
    mse = lambda P, f: float(((P[:, f] - Yv[:, f]) ** 2).mean())
    noise = slice(ns, None)
    mean_pred = Yt.mean(0).expand_as(Yv)
    assert mse(approx.predict(Xv), noise) <= 1.02 * mse(mean_pred, noise)
    # one penalty for all features must compromise between the two groups; per-feature need not
    lam1, _ = choose_ridge_lambda(Xt, Yt, "cv", folds=5, seed=0)
    single = fit_ridge(Xt, Yt, lam1)
    assert mse(approx.predict(Xv), slice(None)) < 0.97 * mse(single.predict(Xv), slice(None))


def test_one_se_rule_keeps_pure_noise_at_the_mean():
    g = torch.Generator().manual_seed(1)
    X, Y = unit_rows(1200, 12, g), 2 + torch.randn(1200, 30, generator=g)
    (approx, lam), (loose, lam_min) = (fit_ridge_per_feature(X[:200], Y[:200], rule=r) for r in ("one_se", "min"))
    assert torch.isinf(lam).float().mean() >= 0.9 and (lam >= 100).all()
    assert torch.isfinite(lam_min).sum() > torch.isfinite(lam).sum()  # the plain minimum chases noise more often
    mse = lambda P: float(((P - Y[200:]) ** 2).mean())
    assert mse(approx.predict(X[200:])) <= min(
        1.001 * mse(Y[:200].mean(0).expand(1000, 30)), mse(loose.predict(X[200:]))
    )
    with pytest.raises(ValueError, match="lambdas"):
        fit_ridge_per_feature(X, Y, lambdas=(0.0, 1.0))


# ---- reduced-rank ridge --------------------------------------------------------------------------


def _low_rank(seed: int, n: int = 60):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(30, 3, generator=g) @ torch.randn(3, 40, generator=g)
    X = unit_rows(n, 30, g)
    return X, X @ W + 0.5 + 0.3 * torch.randn(n, 40, generator=g), W


@pytest.mark.parametrize("lam,rank", [(0.5, 2), (0.0, 3), (3.0, 29)])
def test_reduced_rank_is_the_projected_ridge_fit(lam, rank):
    X, Y, _ = _low_rank(0)
    approx, info = fit_reduced_rank(X, Y, lam=lam, rank=rank, chunk_size=7)
    W = fit_ridge(X, Y, lam).W.double()
    Xd = X.double()
    V = torch.linalg.svd((Xd - Xd.mean(0)) @ W, full_matrices=False).Vh[:rank].T
    W_k = W @ V @ V.T
    torch.testing.assert_close(approx.W.double(), W_k, atol=1e-5, rtol=0)
    torch.testing.assert_close(approx.b.double(), Y.double().mean(0) - Xd.mean(0) @ W_k, atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(approx.W.double(), rtol=1e-5) == rank == info.rank and info.history == []


def test_reduced_rank_cv_recovers_a_rank_3_map_better_than_ridge():
    X, Y, W = _low_rank(1)
    X_val, Y_val, _ = _low_rank(2, 40)
    approx, info = fit_reduced_rank(
        X, Y, lam="cv", rank="cv", folds=5, seed=0, X_val=X_val, Y_val=Y_val @ torch.eye(40)
    )
    lam, _ = choose_ridge_lambda(X, Y, "cv", folds=5, seed=0)
    err = lambda a: float((a.W - W).norm() / W.norm())
    assert info.rank == 3
    assert err(approx) < 0.5 * err(fit_ridge(X, Y, lam))
    ranks = {r["rank"] for r in info.history}
    assert {0, 1, 2, 3, info.rank_max} <= ranks and all("val_mse" in r for r in info.history)
    best = min(info.history, key=lambda r: r["cv_mse"])
    assert best["cv_mse"] <= min(r["cv_mse"] for r in info.history if r["rank"] == 0)


def test_reduced_rank_cv_on_pure_noise_stays_near_the_mean():
    g = torch.Generator().manual_seed(3)
    X, Y = unit_rows(80, 20, g), 1 + torch.randn(80, 30, generator=g)
    approx, info = fit_reduced_rank(X, Y, lam="cv", rank="cv")
    assert info.rank <= 2
    assert float((approx.predict(X) - Y.mean(0)).pow(2).mean()) < 0.05


# ---- held-out R^2 with intervals, noise ceiling ---------------------------------------------------


def test_bootstrap_ci_covers_the_true_r2():
    # Y = S + noise with equal variances; predicting S has population R^2 = 1 - 1/2 = 0.5 about mu = 0.
    g = torch.Generator().manual_seed(0)
    hits = 0
    for rep in range(200):
        S = torch.randn(40, 5, generator=g)
        r = heldout_r2(S, S + torch.randn(40, 5, generator=g), torch.zeros(5), n_boot=300, seed=rep)
        hits += r["r2_ci_low"] <= 0.5 <= r["r2_ci_high"]
        assert r["r2_ci_low"] > 0  # strong signal: the interval excludes 0
    assert 0.85 <= hits / 200 <= 0.99


def test_bootstrap_ci_includes_zero_on_pure_noise_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    X, Y = unit_rows(300, 12, g), 2 + torch.randn(300, 30, generator=g)
    lam, _ = choose_ridge_lambda(X[:200], Y[:200], "cv", folds=5, seed=0)
    P = fit_ridge(X[:200], Y[:200], lam).predict(X[200:])
    r = heldout_r2(P, Y[200:], Y[:200].mean(0), n_boot=500, seed=1)
    assert r["r2_ci_low"] < 0 < r["r2_ci_high"]
    assert r == heldout_r2(P, Y[200:], Y[:200].mean(0), n_boot=500, seed=1)
    assert heldout_r2(P, Y[200:], Y[:200].mean(0), n_boot=0)["r2_ci_low"] is None


def test_noise_ceiling_and_split_half_reliability():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(400, 20, generator=g)
    agree = noise_ceiling(S[:, None] + 0.05 * torch.randn(400, 2, 20, generator=g), torch.zeros(20), n_boot=300)
    assert agree["noise_ceiling"] > 0.99
    pure = noise_ceiling(torch.randn(400, 2, 20, generator=g), torch.zeros(20), n_boot=0)
    assert abs(pure["noise_ceiling"]) < 0.1  # sd of the estimate ~ sqrt(4 / (400 * 20)) = 0.022
    # its 95% interval contains the true ceiling 0 about 95% of the time
    hits = 0
    for rep in range(100):
        c = noise_ceiling(torch.randn(40, 2, 5, generator=g), torch.zeros(5), n_boot=300, seed=rep)
        hits += c["noise_ceiling_ci_low"] <= 0 <= c["noise_ceiling_ci_high"]
    assert 0.85 <= hits / 100 <= 1
    # In between, the ceiling is the R^2 of the true effects (the best predictor) on the noisy means.
    H = S[:, None] + torch.randn(400, 2, 20, generator=g)
    c = noise_ceiling(H, torch.zeros(20), n_boot=300)
    best = heldout_r2(S, H.mean(1), torch.zeros(20), n_boot=0)["r2"]
    assert c["noise_ceiling_ci_low"] <= best <= c["noise_ceiling_ci_high"] and abs(c["noise_ceiling"] - 2 / 3) < 0.05
    H = torch.cat([S[:, None, :5] + 0.1 * torch.randn(400, 2, 5, generator=g), torch.randn(400, 2, 15, generator=g)], 2)
    rel = split_half_reliability(H)
    assert (rel[:5] > 0.95).all() and rel[5:].abs().mean() < 0.1
    with pytest.raises(ValueError, match="Y_halves"):
        noise_ceiling(H[:, 0], torch.zeros(20))


def test_metrics_report_intervals_noise_ceiling_and_reliable_features():
    g = torch.Generator().manual_seed(4)
    X = unit_rows(60, D_MODEL, g)
    W = torch.zeros(D_MODEL, D_SAE)
    W[:, :4] = 5 * torch.randn(D_MODEL, 4, generator=g)
    S = X @ W
    H = S[:, None] + torch.randn(60, 2, D_SAE, generator=g)
    Y = H.mean(1)
    reliable = torch.arange(D_SAE) < 4
    m = approximator_metrics(
        EffectApproximator(W, torch.zeros(D_SAE)),
        X,
        Y,
        torch.zeros(D_SAE),
        Y_val_halves=H,
        n_boot=200,
        seed=0,
        reliable_features=reliable,
    )
    json.dumps(m.as_dict(), allow_nan=False)
    assert m.r2_ci_low <= m.r2 <= m.r2_ci_high and m.beats_mean_baseline == (m.r2_ci_low > 0)
    assert m.noise_ceiling_ci_low <= m.noise_ceiling <= m.noise_ceiling_ci_high
    assert m.n_features_reliable == 4 and m.r2_reliable > m.r2
    assert m.noise_ceiling_reliable > m.noise_ceiling
    # R^2 over the ceiling: the ratio of the two, with a paired interval that holds it
    assert m.r2_over_ceiling == pytest.approx(m.r2 / m.noise_ceiling)
    assert m.r2_over_ceiling_ci_low <= m.r2_over_ceiling <= m.r2_over_ceiling_ci_high
    assert m.r2_reliable_over_ceiling == pytest.approx(m.r2_reliable / m.noise_ceiling_reliable)
    assert m.r2_reliable_over_ceiling_ci_low <= m.r2_reliable_over_ceiling <= m.r2_reliable_over_ceiling_ci_high
    # the true map sits near its ceiling (the ratio near 1); predicting the mean sits at 0
    assert 0.8 < m.r2_reliable_over_ceiling < 1.2
    zero = approximator_metrics(
        EffectApproximator(torch.zeros_like(W), torch.zeros(D_SAE)), X, Y, Y.mean(0), Y_val_halves=H, n_boot=200
    )
    assert abs(zero.r2_over_ceiling) < 0.05 and zero.r2_over_ceiling_ci_low < 0 < zero.r2_over_ceiling_ci_high
    assert m.r2 == pytest.approx(heldout_r2(X @ W, Y, torch.zeros(D_SAE), n_boot=0)["r2"])
    plain = approximator_metrics(EffectApproximator(W, torch.zeros(D_SAE)), X, Y, torch.zeros(D_SAE), n_boot=0)
    assert plain.r2_ci_low is None and plain.noise_ceiling is None and plain.beats_mean_baseline
    with pytest.raises(ValueError, match="Y_val_halves"):
        approximator_metrics(EffectApproximator(W, torch.zeros(D_SAE)), X, Y, torch.zeros(D_SAE), Y_val_halves=H[:5])


def test_noise_ceiling_ignores_noise_shared_by_every_vector():
    """With common random numbers each half carries a large noise term common to all vectors; it
    sits in the bias, so it must not lower the ceiling."""
    g = torch.Generator().manual_seed(7)
    S = torch.randn(300, 1, 20, generator=g)  # vector-specific signal, same in both halves
    shared = 10 * torch.randn(1, 2, 20, generator=g)  # one draw per half, the same for every vector
    H = S + shared + 0.1 * torch.randn(300, 2, 20, generator=g)
    c = noise_ceiling(H, H.mean(1).mean(0), n_boot=0)
    assert c["noise_ceiling"] > 0.98


@pytest.mark.parametrize(("n", "d"), [(60, 8), (30, 40)])
def test_ridge_cv_path_equals_refitting_every_fold_and_penalty(n, d):
    """The one-decomposition-per-fold path gives the CV MSE of refitting fit_ridge per fold and
    penalty (more and fewer vectors than inputs; lam 0 = minimum-norm least squares)."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = (
        X @ torch.randn(d, 5, generator=g, dtype=torch.float64)
        + 0.5 * torch.randn(n, 5, generator=g, dtype=torch.float64)
        + 3
    )
    lams = [0.0, 1e-2, 1.0, 100.0]
    fast = ridge_cv_path(X, Y, lams, folds=5, seed=1)
    parts = cv_folds(n, 5, 1)
    for lam in lams:
        sse = 0.0
        for k, part in enumerate(parts):
            tr = torch.cat([p for j, p in enumerate(parts) if j != k])
            sse += mse(fit_ridge(X[tr], Y[tr], lam), X[part], Y[part]) * len(part)
        assert fast[lam] == pytest.approx(sse / n, rel=1e-5)
    best, cv = choose_ridge_lambda(X.float(), Y.float(), "cv", folds=5, seed=1)
    assert best == min(cv, key=cv.__getitem__) and len(cv) == 8


def test_ridge_cv_path_rejects_bad_penalties():
    X, Y = torch.randn(10, 3), torch.randn(10, 2)
    for bad in ([], [-1.0], [math.inf], [math.nan]):
        with pytest.raises(ValueError, match="lambdas"):
            ridge_cv_path(X, Y, bad)


@pytest.mark.parametrize(("n", "d"), [(60, 8), (30, 40)])
def test_ridge_path_equals_fit_ridge_and_its_training_error(n, d):
    """RidgePath (one pass, one eigendecomposition) gives fit_ridge's approximator for every penalty
    and its training MSE without another pass (more and fewer vectors than inputs; lam 0 =
    minimum-norm least squares)."""
    g = torch.Generator().manual_seed(n + d)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(d, 5, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, 5, generator=g) + 3
    path = RidgePath.of(moments(X, Y, chunk_size=7))
    for lam in (0.0, 1e-2, 1.0, 100.0):
        a, ref = path.fit(lam), fit_ridge(X, Y, lam)
        torch.testing.assert_close(a.W, ref.W, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(a.b, ref.b, atol=2e-4, rtol=1e-4)
        mse = float(((ref.predict(X.float()).double() - Y) ** 2).mean())
        assert path.train_mse(lam) == pytest.approx(mse, rel=1e-4, abs=1e-9)
    with pytest.raises(ValueError, match="lam"):
        path.fit(-1.0)


def test_fit_approximator_ridge_history_comes_from_the_path(synthetic):
    from saets_utils.approximator.fits import RIDGE_PATH
    from saets_utils.approximator.fitting import fit_approximator
    from saets_utils.config import ApproximatorConfig

    X, Y, _, _ = synthetic
    cfg = ApproximatorConfig(fit="ridge", ridge_lambda="cv")
    approx, info = fit_approximator(X[:300], Y[:300], cfg, seed=0, X_val=X[300:], Y_val=Y[300:])
    lam = info.ridge_lambda
    ref = fit_ridge(X[:300], Y[:300], lam)
    torch.testing.assert_close(approx.W, ref.W, atol=1e-4, rtol=1e-4)
    rows = {r["ridge_lambda"]: r for r in info.history}
    assert set(rows) >= set(RIDGE_PATH) and rows[lam]["cv_mse"] == min(r["cv_mse"] for r in rows.values())
    for lam_i, row in rows.items():
        a = fit_ridge(X[:300], Y[:300], lam_i)
        assert row["train_mse"] == pytest.approx(mse(a, X[:300], Y[:300]), rel=1e-3)
        assert row["val_mse"] == pytest.approx(mse(a, X[300:], Y[300:]), rel=1e-3)
