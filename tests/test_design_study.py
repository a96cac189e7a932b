"""Design study on synthetic effects with a known signal: reliability sees the vector-specific part
only, the learning curve rises with data toward the noise ceiling, and pure noise shows no signal."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from saets_utils.approximator.design_study import ceiling_by_tokens, learning_curve, reliability_summary
from saets_utils.effects.store import Effects

D_MODEL, D_SAE, N = 16, 40, 400


def synthetic_effects(signal: float, noise: float, seed: int = 0) -> Effects:
    """Effects = shared bias + signal * x @ W (on 8 of 40 features) + independent noise per half."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D_MODEL, generator=g)
    X = X / X.norm(dim=1, keepdim=True)
    W = torch.zeros(D_MODEL, D_SAE)
    W[:, :8] = torch.randn(D_MODEL, 8, generator=g) * signal
    bias = torch.randn(D_SAE, generator=g) * 3  # large shared part, as the dense features have
    halves = (X @ W + bias)[:, None, :] + noise * torch.randn(N, 2, D_SAE, generator=g)
    eff = halves.mean(1)
    meta = {"effects": {"samples_per_prompt": 2, "prompts": ["", "a"]}}
    return Effects(
        effects=eff,
        vectors=X,
        scales=torch.ones(N),
        vector_ids=torch.arange(N),
        table=pd.DataFrame(),
        baseline_mean=torch.zeros(D_SAE),
        baseline_density=torch.zeros(D_SAE),
        meta=meta,
        halves=halves,
    )


def test_reliability_counts_only_the_vector_specific_part():
    strong = reliability_summary(synthetic_effects(signal=4.0, noise=0.5).halves)
    noise = reliability_summary(synthetic_effects(signal=0.0, noise=0.5).halves)
    assert strong["reliability"] > 0.8 and strong["features_r_above_0.5"] >= 6
    # the large shared bias makes raw halves agree even for pure noise, but centred they do not
    assert noise["raw_cosine_median"] > 0.9
    assert abs(noise["reliability"]) < 0.1 and noise["features_r_above_0.5"] == 0
    assert noise["shared_fraction"] > 0.9


def test_learning_curve_rises_toward_the_ceiling_and_stays_at_zero_without_signal():
    curve = learning_curve(
        synthetic_effects(signal=2.0, noise=1.0),
        sizes=[16, 64, 256],
        fits=["ridge_per_feature"],
        holdout=100,
        n_boot=200,
    )
    full = curve[(curve.fit == "ridge_per_feature") & (curve.target == "full")].set_index("n_train")
    assert full.loc[256, "r2"] > full.loc[16, "r2"] and full.loc[256, "r2_ci_low"] > 0
    ceiling = curve[curve.fit == "noise_ceiling"].iloc[0]
    assert full.loc[256, "r2"] <= ceiling["r2_ci_high"] + 0.02
    # over the features with positive split-half reliability (chosen on the training pool): signal only
    assert full.loc[256, "r2_reliable"] >= full.loc[256, "r2"] - 0.01 and ceiling["n_features_reliable"] > 0
    assert full.loc[256, "r2_reliable"] <= ceiling["r2_reliable_ci_high"] + 0.02
    half = curve[(curve.fit == "ridge_per_feature") & (curve.target == "half")].set_index("n_train")
    assert (half["rollouts"] * 2 == full["rollouts"]).all()  # half the rollouts per vector
    flat = learning_curve(
        synthetic_effects(signal=0.0, noise=1.0), sizes=[64, 256], fits=["ridge_per_feature"], holdout=100, n_boot=200
    )
    row = flat[(flat.fit == "ridge_per_feature") & (flat.target == "full") & (flat.n_train == 256)].iloc[0]
    assert row["r2_ci_low"] <= 0 <= row["r2_ci_high"] or abs(row["r2"]) < 0.01


def test_learning_curve_needs_a_holdout_that_leaves_training_vectors():
    with pytest.raises(ValueError, match="n_holdout"):
        learning_curve(synthetic_effects(1.0, 1.0), sizes=[8], holdout=N)


def test_ceiling_by_tokens_matches_a_measured_design_with_more_rollouts():
    """The projection to k x tokens agrees with a design that really averages k x as many rollouts."""
    g = torch.Generator().manual_seed(0)
    n, d = 400, 20
    signal = torch.randn(n, d, generator=g)

    def halves(reps: int) -> torch.Tensor:
        noise = torch.randn(n, 2, reps, d, generator=g).mean(2) * 2.0  # each half averages `reps` rollouts
        return signal[:, None] + noise

    one = ceiling_by_tokens(halves(1), (0.5, 1.0, 4.0)).set_index("token_multiplier")
    four = ceiling_by_tokens(halves(4), (1.0,)).set_index("token_multiplier")
    assert one.loc[4.0, "ci_low"] <= four.loc[1.0, "noise_ceiling"] <= one.loc[4.0, "ci_high"]
    assert one.loc[0.5, "noise_ceiling"] < one.loc[1.0, "noise_ceiling"] < one.loc[4.0, "noise_ceiling"]
    # true ceiling of the 1x design: signal var 1 per feature, noise of the mean of two halves 4 / 2 = 2
    assert abs(one.loc[1.0, "noise_ceiling"] - 1 / 3) < 0.05
