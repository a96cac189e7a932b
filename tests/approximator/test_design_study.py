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


# --- run_study and compare_designs on a run's files ------------------------------------------------


def write_effects(run, signal: float, noise: float, n: int = 96, seed: int = 0, halves: bool = True) -> None:
    """01's files for ``run`` (tiny model and SAE: d_model 32, d_sae 64), effects synthetic as in
    :func:`synthetic_effects`; vector 3 failed calibration (NaN scale), as some do in a real run.
    96 vectors: 02's design-study cell needs at least 64."""
    from helpers import D_MODEL as DM
    from helpers import D_SAE as DS
    from saets_utils.io_utils import atomic_save_safetensors, atomic_write_json

    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, DM, generator=g)
    X = X / X.norm(dim=1, keepdim=True)
    W = torch.zeros(DM, DS)
    W[:, :12] = torch.randn(DM, 12, generator=g) * signal
    H = (X @ W + torch.randn(DS, generator=g) * 3)[:, None, :] + noise * torch.randn(n, 2, DS, generator=g)
    scales = torch.full((n,), 20.0)
    scales[3] = float("nan")
    d = run.results_dir
    d.mkdir(parents=True, exist_ok=True)
    tensors = {"effects": H.mean(1), "vectors": X, "scales": scales, "vector_ids": torch.arange(n)}
    atomic_save_safetensors({**tensors, **({"effect_halves": H} if halves else {})}, d / "effects.safetensors")
    atomic_save_safetensors({"mean": torch.zeros(DS), "density": torch.zeros(DS)}, d / "baseline.safetensors")
    status = ["failed" if i == 3 else "ok" for i in range(n)]
    pd.DataFrame({"id": range(n), "scale": scales.tolist(), "status": status, "seconds": 2.5}).to_csv(
        d / "effects_table.csv", index=False
    )
    atomic_write_json(d / "effects_meta.json", {"effects": run.effects.model_dump(), "seconds_per_vector_mean": 2.5})


def study_run(tmp_path, stem: str = "study", **effects):
    from helpers import build_run_cfg

    return build_run_cfg(tmp_path, stem=stem, approximator={"holdout": 16}, effects=effects)


def test_run_study_writes_reliability_and_learning_curve_of_the_valid_vectors(tmp_path):
    import json

    from saets_utils.approximator.design_study import run_study

    run = study_run(tmp_path)
    write_effects(run, signal=3.0, noise=0.5)
    res = run_study(run, fits=["ridge", "decoder_prior"], n_boot=100)
    out = run.results_dir / "study"
    rel = json.loads((out / "reliability.json").read_text())
    assert rel == pytest.approx(res["reliability"], nan_ok=True)
    assert rel["n_vectors"] == 95 and rel["seconds_per_vector"] == 2.5  # vector 3 (NaN scale) left out
    assert rel["reliability"] > 0.8  # a strong vector-specific signal, measured twice
    curve = pd.read_csv(out / "learning_curve.csv")
    pd.testing.assert_frame_equal(curve, res["curve"].reset_index(drop=True), check_dtype=False)
    # default sizes: every power-of-two step below the pool, then the whole pool (95 - 16 held out)
    pool = 95 - 16
    fitted = curve[curve.fit != "noise_ceiling"]
    assert sorted(set(fitted.n_train)) == [32, 64, pool] and (curve.n_val == 16).all()
    assert len(fitted) == 3 * 2 * 2  # sizes x fits x (full, half rollouts)
    assert (curve.fit == "noise_ceiling").sum() == 1
    for fit in ("ridge", "decoder_prior"):
        full = fitted[(fitted.fit == fit) & (fitted.target == "full")].set_index("n_train")
        assert full.loc[pool, "r2"] > 0.5 and full.loc[pool, "r2_ci_low"] > 0, fit
    ext = res["extrapolation"]
    assert (out / "extrapolation.csv").is_file() == (ext is not None)


def test_run_study_needs_effect_halves(tmp_path):
    from saets_utils.approximator.design_study import run_study

    run = study_run(tmp_path)
    write_effects(run, signal=1.0, noise=1.0, halves=False)
    with pytest.raises(ValueError, match=r"no effect halves.*samples_per_prompt >= 2"):
        run_study(run, fits=["ridge"], n_boot=10)
    assert not (run.results_dir / "study").exists()


def test_compare_designs_reports_each_runs_settings_and_reliability(tmp_path):
    from saets_utils.approximator.design_study import compare_designs, main

    quiet = study_run(tmp_path, "quiet", samples_per_prompt=8, common_random_numbers=True)
    noisy = study_run(tmp_path, "noisy", samples_per_prompt=2, total_tokens=8)
    no_halves = study_run(tmp_path, "nohalves")
    write_effects(quiet, signal=2.0, noise=0.3, seed=1)
    write_effects(noisy, signal=2.0, noise=3.0, seed=2)
    write_effects(no_halves, signal=2.0, noise=1.0, halves=False)
    df = compare_designs([quiet, noisy, no_halves]).set_index("run")
    assert list(df.index) == ["quiet", "noisy"]  # a run without halves has nothing to compare
    for run in (quiet, noisy):
        row, e = df.loc[run.name], run.effects
        assert (row.crn, row.prompts, row.samples_per_prompt, row.total_tokens) == (
            e.common_random_numbers,
            len(e.prompts),
            e.samples_per_prompt,
            e.total_tokens,
        )
        assert row.rollout_tokens_per_vector == len(e.prompts) * e.samples_per_prompt * e.total_tokens
        assert row.loss_target == "relative:0.3" and row.seconds_per_vector == 2.5 and row.n_vectors == 95
    assert df.loc["quiet", "reliability"] > df.loc["noisy", "reliability"]
    same = compare_designs([quiet, noisy], max_id=40).set_index("run")  # the same vectors in both runs
    assert (same["n_vectors"] == 39).all()  # ids 0..39, vector 3 not valid
    out = tmp_path / "designs.csv"
    main(
        [
            str(tmp_path / "params" / "quiet.yaml"),
            str(tmp_path / "params" / "noisy.yaml"),
            "--compare",
            "--out",
            str(out),
        ]
    )
    assert list(pd.read_csv(out)["run"]) == ["quiet", "noisy"]
    ceilings = pd.read_csv(tmp_path / "designs_ceilings.csv")
    assert set(ceilings["run"]) == {"quiet", "noisy"} and set(ceilings["token_multiplier"]) == {0.5, 1.0, 2.0, 4.0}
