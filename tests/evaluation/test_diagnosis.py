"""The SAE-TS diagnosis builds each variant by its formula and scores it offline."""

from __future__ import annotations

import pytest
import torch

from saets_utils.approximator.model import EffectApproximator
from saets_utils.evaluation import methods as M
from saets_utils.evaluation.diagnosis import build_variants, diagnosis_fits, feature_targets, offline_rows


def _data(n: int = 60, d_model: int = 12, d_sae: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_model, generator=g)
    P = (W_dec / W_dec.norm(dim=1, keepdim=True)).T
    X = torch.randn(n, d_model, generator=g)
    X = X / X.norm(dim=1, keepdim=True)
    Y = X @ (2 * P) + 0.5 + 0.01 * torch.randn(n, d_sae, generator=g)
    return X, Y, W_dec


def test_variants_follow_their_formulas():
    X, Y, W_dec = _data()
    fits = diagnosis_fits(X, Y, W_dec, ranks=(2,))
    assert set(fits) == {"reduced_rank", "ridge", "rank2", "decoder_prior"}
    targets = [(7, 1.0)]
    vs = {v.variant: v for v in build_variants("t", targets, fits, W_dec, X=X, Y=Y, extra={"CAA": 3 * torch.ones(12)})}
    assert torch.allclose(vs["SAE"].vector, W_dec[7] / W_dec[7].norm())
    for name, a in fits.items():
        assert torch.allclose(vs[f"SAE-TS[{name}]"].vector, M.build_sae_ts_vector(a, targets), atol=1e-6)
    lam0 = fits["decoder_prior"].W[:, 7]
    assert torch.allclose(vs["SAE-TS[decoder_prior] lam0"].vector, lam0 / lam0.norm(), atol=1e-6)
    assert torch.allclose(vs["-bias"].vector, -fits["reduced_rank"].correction)
    Xc, Yc = X.double() - X.double().mean(0), Y.double() - Y.double().mean(0)
    xc = Xc.T @ Yc[:, 7]
    assert torch.allclose(vs["xcorr"].vector.double(), xc / xc.norm(), atol=1e-6)
    assert torch.allclose(vs["CAA"].vector, torch.ones(12) / 12**0.5)
    for v in vs.values():
        assert abs(float(v.vector.norm()) - 1) < 1e-5
    # the random control is seeded per task and differs between tasks
    other = {v.variant: v for v in build_variants("u", targets, fits, W_dec, X=X, Y=Y)}
    again = {v.variant: v for v in build_variants("t", targets, fits, W_dec, X=X, Y=Y)}
    assert torch.equal(again["random"].vector, vs["random"].vector)
    assert not torch.equal(other["random"].vector, vs["random"].vector)


def test_offline_rows_rank_the_target_by_the_fit_itself():
    X, Y, W_dec = _data()
    fits = diagnosis_fits(X, Y, W_dec, ranks=())
    rows = offline_rows(build_variants("t", [(7, 1.0)], fits, W_dec, X=X, Y=Y), fits).set_index("variant")
    assert rows.loc["SAE", "cos_sae"] == 1.0
    # on this map (effect ~ 2 x cosine with each decoder row) the decoder row is the best direction,
    # and every fit that learned the map predicts the target on top for it and for its SAE-TS vector
    assert rows.loc["SAE", "pred_rank_prior"] == 1.0
    assert rows.loc["SAE-TS[decoder_prior]", "pred_rank_own"] <= 2.0
    assert rows.loc["random", "pred_rank_prior"] > 1.0 or rows.loc["random", "cos_sae"] > 0.5
    a = EffectApproximator(fits["ridge"].W, fits["ridge"].b)
    t = torch.zeros(40, dtype=torch.float64)
    t[7] = 1
    want = torch.nn.functional.cosine_similarity(a.W.double() @ t, a.W.double() @ a.b.double(), dim=0)
    assert abs(rows.loc["SAE-TS[ridge]", "cos_Wt_Wb"] - float(want)) < 1e-9


def test_feature_targets_are_unmeasured_sparse_and_seeded():
    density = torch.full((50,), 0.001)
    density[:5] = 0.2  # dense
    density[45:] = 0.0  # dead
    measured = torch.arange(5, 20)
    got = feature_targets(density, measured, 10, seed=3)
    assert len(got) == 10 and all(20 <= j < 45 for j in got)
    assert got == feature_targets(density, measured, 10, seed=3) != feature_targets(density, measured, 10, seed=4)
    with pytest.raises(ValueError, match="fewer targets"):
        feature_targets(density, measured, 26)
