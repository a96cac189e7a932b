"""Properties of the effect approximator: fits recover a known linear map, metrics rank
a perfect fit above the baselines, the split is seeded, files round-trip."""

import json

import pytest
import torch

from saets_utils.approximator import (
    EffectApproximator, approximator_metrics, fit_adam, fit_ridge, load_rotation, rotation_matrix, split_holdout,
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
    X, Y, _, b = synthetic
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
    assert perfect["r2"] == pytest.approx(1.0, abs=1e-6) and perfect["beats_mean_baseline"]
    assert perfect["mse"] < 1e-9 < perfect["mse_mean"] < perfect["mse_zero"]
    assert perfect["per_feature_r2_median"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["per_feature_r2_frac_positive"] == 1.0
    assert perfect["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert len(perfect["per_feature_r2"]) == D_SAE

    zero = approximator_metrics(EffectApproximator(torch.zeros(D_MODEL, D_SAE), torch.zeros(D_SAE)), X_va, Y_va, mu)
    assert not zero["beats_mean_baseline"] and zero["r2"] < 0
    assert zero["mse"] == pytest.approx(zero["mse_zero"])

    mean = approximator_metrics(EffectApproximator(torch.zeros(D_MODEL, D_SAE), mu), X_va, Y_va, mu)
    assert not mean["beats_mean_baseline"] and mean["r2"] == pytest.approx(0.0, abs=1e-6)
    for m in (perfect, zero, mean):
        json.dumps(m, allow_nan=False)


def test_metrics_decoder_top1_and_per_vector():
    g = torch.Generator().manual_seed(1)
    W_dec = torch.linalg.qr(torch.randn(D_MODEL, 8, generator=g))[0].T  # 8 orthonormal rows
    fid = torch.tensor([0, 3, 5, 7, -1])
    X = torch.cat([W_dec[fid[:4]], unit_rows(1, D_MODEL, g)])
    Y = 3 * X @ W_dec.T  # each decoder row excites its own feature most
    good = EffectApproximator(3 * W_dec.T, torch.zeros(8))
    bad = EffectApproximator(3 * W_dec.T[:, torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])], torch.zeros(8))
    m = approximator_metrics(good, X, Y, torch.zeros(8), val_ids=torch.arange(10, 15), decoder_feature_ids=fid)
    assert m["decoder_top1_predicted"] == 1.0 and m["decoder_top1_measured"] == 1.0 and m["n_decoder_rows"] == 4
    assert [r["id"] for r in m["per_vector"]] == list(range(10, 15))
    assert approximator_metrics(bad, X, Y, torch.zeros(8), decoder_feature_ids=fid)["decoder_top1_predicted"] == 0.0
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
