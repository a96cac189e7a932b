"""Judge-free targeting: the metric on constructed effects, and end to end on the tiny model, a
vector built to write one token, scored against an SAE feature built to detect that token."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import BOS, HOOK, build_run_cfg
from saets_utils.config import ConfigError
from saets_utils.effects.calibration import calibrate, resid_at_hook
from saets_utils.effects.measure import measure_effects
from saets_utils.effects.plan import Plan, work_dir
from saets_utils.effects.runner import plan_scale_hint, prepare_plan, rollout_spec
from saets_utils.evaluation.targeting import (
    COLUMNS,
    TARGETING_ID_OFFSET,
    measure_targeting,
    targeting_differences,
    targeting_metrics,
    targeting_summary,
    targeting_vector_id,
)
from saets_utils.evaluation.task_vectors import TaskVectors
from saets_utils.steering.generation import generate

FEATURE = 17  # the SAE feature rebuilt as a detector of TOKEN
TOKEN = "z"


# --- the metric on constructed effects ----------------------------------------------------------


def test_target_raised_above_all_others_ranks_first():
    e = np.linspace(-1, 1, 50)
    e[7] = 3.0
    m = targeting_metrics(e, [(7, 1.0)])
    assert m["target_rank"] == 1 and m["target_rank_mean"] == 1 and m["best_target"] == 7
    assert m["target_effect"] == 3.0
    assert math.isnan(m["target_effect_se"])  # no halves given
    e[7] = 0.5  # now 12 features (the largest of linspace) lie above it
    assert targeting_metrics(torch.tensor(e), [(7, 1.0)])["target_rank"] == 1 + (e > 0.5).sum()


def test_off_target_norm_excludes_targets_and_ratio_follows_target_sign():
    e = np.zeros(10)
    e[[2, 5]] = [4.0, -1.0]
    e[[0, 9]] = [3.0, 4.0]
    m = targeting_metrics(e, [(2, 1.0), (5, 1.0)])
    assert m["off_target_norm"] == pytest.approx(5.0)  # sqrt(3^2 + 4^2); targets 2 and 5 left out
    assert m["target_effect"] == pytest.approx(1.5) and m["ratio"] == pytest.approx(0.3)
    neg = targeting_metrics(-e, [(2, 1.0), (5, 1.0)])
    assert neg["target_effect"] == pytest.approx(-1.5) and neg["ratio"] == pytest.approx(-0.3)
    assert neg["off_target_norm"] == pytest.approx(5.0)
    # a negative weight asks for a decrease: lowering feature 5 counts as hitting it
    down = targeting_metrics(e, [(5, -1.0)])
    assert down["target_effect"] == pytest.approx(1.0) and down["target_rank"] == 1 and down["ratio"] > 0
    # nothing moved off target: +inf; nothing moved at all: NaN
    only = np.zeros(10)
    only[2] = 1.0
    assert targeting_metrics(only, [(2, 1.0)])["ratio"] == math.inf
    assert math.isnan(targeting_metrics(np.zeros(10), [(2, 1.0)])["ratio"])


def test_weighted_mean_rank_and_effect():
    e = np.array([10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0])
    m = targeting_metrics(e, [(1, 3.0), (6, 1.0)])  # ranks 2 and 7
    assert m["target_rank"] == 2 and m["best_target"] == 1
    assert m["target_rank_mean"] == pytest.approx((3 * 2 + 1 * 7) / 4)
    assert m["target_effect"] == pytest.approx((3 * 9 + 1 * 4) / 4)


def test_ties_share_the_mean_rank():
    e = np.zeros(9)
    e[0] = 1.0
    # target 4 ties with 7 other unmoved features below feature 0: ranks 2..9, mean 5.5
    assert targeting_metrics(e, [(4, 1.0)])["target_rank"] == 5.5


def test_standard_error_from_halves_and_nan_effects():
    e = np.zeros(6)
    e[1] = 2.0
    halves = np.zeros((2, 6))
    halves[:, 1] = [1.0, 3.0]
    assert targeting_metrics(e, [(1, 1.0)], halves)["target_effect_se"] == pytest.approx(1.0)
    assert math.isnan(targeting_metrics(e, [(1, 1.0)], np.full((2, 6), np.nan))["target_effect_se"])
    m = targeting_metrics(np.full(6, np.nan), [(1, 1.0)])  # a vector that could not be calibrated
    assert all(math.isnan(v) for v in m.values())
    with pytest.raises(ValueError, match="out of range"):
        targeting_metrics(e, [(6, 1.0)])


def test_summary_per_method_with_bootstrap_over_tasks():
    df = pd.DataFrame(
        {
            "task": ["a", "b", "c", "a", "b", "c"],
            "method": ["SAE"] * 3 + ["CAA"] * 3,
            "target_rank": [1.0, 3.0, np.nan, 10.0, 20.0, 30.0],
            "target_rank_mean": [1.0, 3.0, np.nan, 10, 20, 30],
            "ratio": [2.0, 4.0, np.nan, 0.1, np.inf, 0.3],
            "target_effect": [1.0, 2.0, np.nan, 0.1, 0.2, 0.3],
        }
    )
    s = targeting_summary(df, n_boot=200, seed=0)
    assert s["method"].tolist() == ["CAA", "SAE"]  # project order
    sae = s.set_index("method").loc["SAE"]
    assert sae["n_tasks"] == 2 and sae["mean_rank"] == 2 and sae["mean_ratio"] == 3
    assert 1 <= sae["rank_ci_low"] <= sae["mean_rank"] <= sae["rank_ci_high"] <= 3
    caa = s.set_index("method").loc["CAA"]
    assert caa["mean_ratio"] == pytest.approx(0.2)  # the infinite ratio is left out
    assert s.equals(targeting_summary(df, n_boot=200, seed=0))
    assert targeting_summary(df, n_boot=0)["rank_ci_low"].isna().all()


# A heavy tail: most tasks rank their target near the top, one task at ~10^4. The arithmetic mean
# (~2000) says nothing about the typical task; the median (7) and the geometric mean do.
HEAVY_RANKS = np.array([1.0, 3.0, 5.0, 7.0, 9.0, 12.0, 20000.0])


def _heavy_frame() -> pd.DataFrame:
    n = len(HEAVY_RANKS)
    tasks = [f"t{i}" for i in range(n)]
    ratios = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 300.0])
    # CAA: every task's rank exactly twice SAE's times a factor whose logs cancel (mean log = log 2),
    # its ratio 0.5 lower on every task but with spread, so the CIs are not points
    wobble = np.exp(np.array([-0.3, 0.3, -0.2, 0.2, -0.1, 0.1, 0.0]))
    shift = np.array([0.4, 0.6, 0.3, 0.7, 0.5, 0.45, 0.55])
    return pd.DataFrame(
        {
            "task": tasks * 2,
            "method": ["SAE"] * n + ["CAA"] * n,
            "target_rank": np.r_[HEAVY_RANKS, 2 * HEAVY_RANKS * wobble],
            "target_rank_mean": np.r_[HEAVY_RANKS, 2 * HEAVY_RANKS * wobble],
            "ratio": np.r_[ratios, ratios - shift],
            "target_effect": np.r_[ratios, ratios - shift],
        }
    )


def test_summary_median_and_geometric_mean_with_bootstrap_ci():
    df = _heavy_frame()
    s = targeting_summary(df, n_boot=2000, seed=0).set_index("method")
    sae = s.loc["SAE"]
    assert sae["n_tasks"] == len(HEAVY_RANKS)
    assert sae["median_rank"] == np.median(HEAVY_RANKS) == 7.0
    assert sae["mean_rank"] == pytest.approx(HEAVY_RANKS.mean()) and sae["mean_rank"] > 100 * sae["median_rank"]
    assert sae["geomean_rank"] == pytest.approx(np.exp(np.log(HEAVY_RANKS).mean()))
    assert sae["median_rank"] < sae["geomean_rank"] < sae["mean_rank"]
    assert HEAVY_RANKS.min() <= sae["median_rank_ci_low"] <= 7.0 <= sae["median_rank_ci_high"] < HEAVY_RANKS.max()
    assert sae["median_rank_ci_low"] < sae["median_rank_ci_high"]
    assert sae["geomean_rank_ci_low"] < sae["geomean_rank"] < sae["geomean_rank_ci_high"]
    assert sae["median_ratio"] == 2.0
    assert sae["median_ratio_ci_low"] <= 2.0 <= sae["median_ratio_ci_high"] < 300
    caa = s.loc["CAA"]
    assert caa["median_rank"] == pytest.approx(np.median(df.loc[df["method"] == "CAA", "target_rank"]))
    assert caa["geomean_rank"] == pytest.approx(2 * sae["geomean_rank"])  # the wobble's logs cancel
    no_ci = targeting_summary(df, n_boot=0)
    assert no_ci[[c for c in no_ci if "_ci_" in c]].isna().all().all() and (no_ci["median_rank"] > 0).all()
    assert targeting_summary(df, n_boot=300, seed=1).equals(targeting_summary(df, n_boot=300, seed=1))


def test_summary_and_differences_average_replicates_within_task_first():
    """Two measurement seeds per (task, method): one value per task (the geometric mean of the
    replicates' ranks), so n_tasks counts tasks and the bootstrap resamples tasks."""
    df = _heavy_frame()
    other = df.assign(target_rank=df["target_rank"] * 4, ratio=df["ratio"] + 1)
    both = pd.concat([df.assign(seed=0), other.assign(seed=1)], ignore_index=True)
    s = targeting_summary(both, n_boot=200).set_index("method")
    assert s.loc["SAE", "n_tasks"] == len(HEAVY_RANKS)
    assert s.loc["SAE", "median_rank"] == pytest.approx(2 * 7.0)  # sqrt(r * 4r) = 2r
    assert s.loc["SAE", "median_ratio"] == pytest.approx(2.5)
    d = targeting_differences(both, n_boot=200).set_index("method")
    assert d.loc["CAA", "n_tasks"] == len(HEAVY_RANKS) and d.loc["CAA", "rank_ratio"] == pytest.approx(2.0)


def test_paired_differences_against_the_baseline():
    df = _heavy_frame()
    d = targeting_differences(df, baseline="SAE", n_boot=2000, seed=0)
    assert d["method"].tolist() == ["CAA"] and (d["baseline"] == "SAE").all()  # the baseline gets no row
    caa = d.set_index("method").loc["CAA"]
    assert caa["n_tasks"] == caa["n_tasks_ratio"] == len(HEAVY_RANKS)
    assert caa["mean_log_rank_diff"] == pytest.approx(math.log(2))
    assert caa["rank_ratio"] == pytest.approx(2.0)  # uniformly 2x worse (the geometric means' ratio)
    assert 1 < caa["rank_ratio_ci_low"] < 2 < caa["rank_ratio_ci_high"] and caa["rank_ratio_excludes_1"]
    assert caa["ratio_diff"] == pytest.approx(-0.5)
    assert caa["ratio_diff_ci_low"] < -0.5 < caa["ratio_diff_ci_high"] < 0 and caa["ratio_diff_excludes_0"]
    # paired: the huge spread across tasks would swamp an unpaired CI; pairing removes it
    rev = targeting_differences(df, baseline="CAA", n_boot=2000, seed=0).set_index("method").loc["SAE"]
    assert rev["rank_ratio"] == pytest.approx(0.5) and rev["rank_ratio_ci_high"] < 1
    # a method no different from the baseline: CI around 1 (ratio) and 0 (difference), not excluded
    rng = np.random.default_rng(0)
    same = df[df["method"] == "SAE"].assign(method="SAE-TS")
    same["target_rank"] *= np.exp(rng.normal(0, 0.5, len(same)))
    same["ratio"] += rng.normal(0, 0.5, len(same))
    dd = targeting_differences(pd.concat([df, same]), n_boot=2000).set_index("method").loc["SAE-TS"]
    assert dd["rank_ratio_ci_low"] < 1 < dd["rank_ratio_ci_high"] and not dd["rank_ratio_excludes_1"]
    assert dd["ratio_diff_ci_low"] < 0 < dd["ratio_diff_ci_high"] and not dd["ratio_diff_excludes_0"]


def test_differences_edge_cases():
    df = _heavy_frame()
    assert targeting_differences(df, baseline="rotation").empty  # baseline not scored
    one = targeting_differences(df[df["task"].isin(["t0"])], n_boot=100).iloc[0]
    assert one["n_tasks"] == 1 and one["rank_ratio"] == pytest.approx(2 * math.exp(-0.3))
    assert math.isnan(one["rank_ratio_ci_low"]) and not one["rank_ratio_excludes_1"]
    # only tasks scored by both methods are paired; a NaN (uncalibrated) rank drops its task
    partial = df.drop(df.index[(df["method"] == "CAA") & (df["task"] == "t6")])
    partial.loc[(partial["method"] == "SAE") & (partial["task"] == "t0"), "target_rank"] = np.nan
    assert targeting_differences(partial, n_boot=0).iloc[0]["n_tasks"] == len(HEAVY_RANKS) - 2


def test_vector_ids_never_alias_effects_ids():
    ids = {targeting_vector_id(t, m) for t in ("anger", "love", "wedding") for m in ("CAA", "SAE", "SAE-TS")}
    assert len(ids) == 9
    assert all(TARGETING_ID_OFFSET <= i < 2**31 for i in ids)  # row_seed keys are taken mod 2**32


# --- end to end on the tiny model ---------------------------------------------------------------

# The tiny run of these tests: decoder rows 0 and 1 measured in 01, seed 1.
TARGETING = {
    "seed": 1,
    "effects": {"vectors": {"source": "decoder_rows", "ids": [0, 1]}, "vectors_per_batch": 4},
    "eval": {"bootstrap": 20},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """A run whose SAE feature FEATURE detects TOKEN and whose decoder row is a vector that makes the
    model write TOKEN, and 01's plan (loss chunks, baseline) made with that SAE: steering with the
    decoder row must rank its own feature first.

    The vector: the direction that, added at the hook and growing, dominates the last layers and
    the final LayerNorm and so raises TOKEN's logit (the centred unembedding column of TOKEN). The
    feature: encoder direction = mean activation at positions holding TOKEN minus elsewhere (in
    rollouts written with that vector), threshold halfway, gain 10. Steered rollouts hold far more
    TOKENs than unsteered ones, and the unsteered model re-encodes each TOKEN position onto the
    feature, so the feature's measured effect is large; any other feature moves only through the
    changed text at its ordinary gain of 0.5.
    """
    from saets_utils.models.tiny import tiny_sae

    tmp = tmp_path_factory.mktemp("targeting")
    run = build_run_cfg(tmp, TARGETING, stem="tinytarget")
    model = tiny_model
    tok_id = model.tokenizer.encode(TOKEN, add_special_tokens=False)[0]
    w_u = model.W_U.detach()
    u = w_u[:, tok_id] - w_u.mean(1)
    u = u - u.mean()
    u = u / u.norm()
    spec = rollout_spec(run, model, BOS)
    gen = generate(
        model,
        torch.tensor([spec.prompts[0]] * 32),
        15,
        list(range(32)),
        sampling=spec.sampling,
        hook_name=HOOK,
        delta=u * 20,
    )
    acts, is_tok = resid_at_hook(model, HOOK, gen.tokens)[:, 1:], gen.tokens[:, 1:] == tok_id
    assert 0.1 < is_tok.float().mean() < 0.9
    d = acts[is_tok].mean(0) - acts[~is_tok].mean(0)
    d = d / d.norm()
    threshold = 0.5 * float((acts[is_tok] @ d).mean() + (acts[~is_tok] @ d).mean())
    sae = tiny_sae(d_in=32, d_sae=64, k=4)
    with torch.no_grad():
        sae.W_enc[:, FEATURE] = 10 * d
        sae.b_enc[FEATURE] = -10 * threshold
        sae.W_dec[FEATURE] = u  # the feature's decoder row is the vector that writes TOKEN
    plan = prepare_plan(run, model, sae)
    other = sae.W_dec[5].clone()  # an unrelated direction, as a second "method"
    row = sae.W_dec[FEATURE].detach().clone()  # the SAE method's vector: the target's own decoder row
    tvs = {"zeds": TaskVectors("zeds", vectors={"CAA": other, "SAE": row}, targets={"SAE": [(FEATURE, 1.0)]})}
    df = measure_targeting(run, model, sae, task_vectors=tvs, progress=False)
    return run, model, sae, plan, tvs, df


def test_vector_writing_the_detected_token_ranks_its_feature_first(setup):
    run, _, _, _, _, df = setup
    assert list(df.columns) == list(COLUMNS)
    assert df[["task", "method"]].values.tolist() == [["zeds", "CAA"], ["zeds", "SAE"]]
    assert (df["targets"] == json.dumps([[FEATURE, 1.0]])).all() and (df["targets_from"] == "SAE").all()
    sae_row = df.set_index("method").loc["SAE"]
    assert sae_row["status"] == "ok" and 10 < sae_row["scale"] < 40  # calibrated inside the grid
    assert sae_row["target_rank"] == 1 and sae_row["best_target"] == FEATURE
    eff = load_file(run.results_dir / "eval" / "targeting_effects.safetensors")
    e = eff["effects"][1]
    others = torch.cat([e[:FEATURE], e[FEATURE + 1 :]])
    assert e[FEATURE] > 3 * others.abs().max()  # a wide margin, not a near tie
    caa_row = df.set_index("method").loc["CAA"]
    assert sae_row["ratio"] > 2 * caa_row["ratio"] and sae_row["target_effect"] > 3 * caa_row["target_effect"]
    assert np.isfinite(
        df[["target_effect", "target_effect_se", "target_rank", "off_target_norm", "ratio"]].to_numpy(float)
    ).all()


def test_measurement_is_01s_at_the_calibrated_scale(setup):
    """Scales are 01's calibration, effects 01's measurement with the plan's baseline, and the
    metrics are computed from those measured effects."""
    run, model, sae, plan, tvs, df = setup
    eff = load_file(run.results_dir / "eval" / "targeting_effects.safetensors")
    assert eff["vector_ids"].tolist() == df["vector_id"].tolist()
    assert not set(df["vector_id"]) & set(plan.vector_ids.tolist())
    vecs = torch.stack([tvs["zeds"].vectors[m] for m in ("CAA", "SAE")])
    resid = resid_at_hook(model, HOOK, plan.loss_tokens)
    cal = calibrate(
        model,
        HOOK,
        plan.loss_tokens,
        resid,
        vecs,
        cfg=run.effects.calibration,
        grid=run.effects.scale_grid.values(),
        target=run.effects.loss_target,
        unsteered_loss=plan.unsteered_loss,
        start=plan_scale_hint(run, model, sae, plan, resid=resid),
    )
    torch.testing.assert_close(eff["scales"], cal.scales)
    assert df["status"].tolist() == cal.status
    blk = measure_effects(
        model,
        sae,
        HOOK,
        rollout_spec(run, model, BOS),
        vectors=vecs,
        vector_ids=df["vector_id"].tolist(),
        scales=cal.scales,
        baseline_mean=plan.baseline_mean,
        seed=run.seed,
        baseline_halves=plan.baseline_halves,
    )
    torch.testing.assert_close(eff["effects"], blk.effects, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eff["effect_halves"], blk.halves, atol=1e-5, rtol=1e-5)
    for i, row in df.iterrows():
        m = targeting_metrics(eff["effects"][i], [(FEATURE, 1.0)], eff["effect_halves"][i])
        assert row["target_rank"] == m["target_rank"] and row["ratio"] == pytest.approx(m["ratio"])
        assert row["target_effect_se"] == pytest.approx(m["target_effect_se"])
    written = pd.read_csv(run.results_dir / "eval" / "targeting.csv")
    pd.testing.assert_frame_equal(written, df, check_dtype=False)
    summ = pd.read_csv(run.results_dir / "eval" / "targeting_summary.csv")
    assert summ["method"].tolist() == ["CAA", "SAE"] and (summ["n_tasks"] == 1).all()
    diff = pd.read_csv(run.results_dir / "eval" / "targeting_differences.csv")
    assert diff["method"].tolist() == ["CAA"] and diff["baseline"].tolist() == ["SAE"]
    assert diff["n_tasks"].tolist() == [1]


def test_reads_03s_files_and_gives_the_same_table(setup, tmp_path):
    run, model, sae, _, tvs, df = setup
    ev = run.results_dir / "eval"
    save_file({f"zeds/{m}": v.contiguous() for m, v in tvs["zeds"].vectors.items()}, str(ev / "vectors.safetensors"))
    (ev / "targets.json").write_text(
        json.dumps([{"task": "zeds", "method": "SAE", "targets": json.dumps([[FEATURE, 1.0]]), "how": "test"}])
    )
    again = measure_targeting(run, model, sae, progress=False)  # from eval/vectors.safetensors + targets.json
    pd.testing.assert_frame_equal(again, df)


def test_targets_resolved_when_03_recorded_none(setup, monkeypatch):
    """Only CAA evaluated: the task's targets are discovered the way 03 would have discovered them."""
    from saets_utils.evaluation.task_vectors import load_context, resolve_targets
    from saets_utils.steering import tasks

    run, model, sae, plan, tvs, _ = setup
    run = run.model_copy(
        update={"eval": run.eval.model_copy(update={"fgaa_density_max": 1.0})}
    )  # all tiny features are dense
    short = tasks.Task(
        name="short",
        behaviour="b",
        coherence="c",
        steering_prompt="p",  # fits the tiny n_ctx
        positive=[f"zz zap {i} zzz" for i in range(8)],
        negative=[f"aa cap {i} aaa" for i in range(8)],
    )
    monkeypatch.setattr(tasks, "load_task", lambda name, *a, **k: short)
    save_file(
        {"mean": plan.baseline_mean, "density": plan.baseline_density}, str(run.results_dir / "baseline.safetensors")
    )
    try:
        df = measure_targeting(
            run,
            model,
            sae,
            task_vectors={"short": TaskVectors("short", vectors={"CAA": tvs["zeds"].vectors["CAA"]})},
            progress=False,
        )
        expected = resolve_targets(short, load_context(run, model, sae, require_approximator=False))[0]["SAE-TS"]
    finally:
        os.remove(run.results_dir / "baseline.safetensors")
    assert df["targets_from"].tolist() == ["resolved"] and df["method"].tolist() == ["CAA"]
    assert json.loads(df["targets"].iloc[0]) == [[f, w] for f, w in expected]


def test_missing_or_stale_plan_fails_clearly(setup, tmp_path, tiny_model, tiny_sae):
    run, *_ = setup
    fresh = build_run_cfg(tmp_path, TARGETING, stem="tinytarget")
    with pytest.raises(FileNotFoundError, match="01_effects"):
        measure_targeting(fresh, tiny_model, tiny_sae, task_vectors={}, progress=False)
    changed = build_run_cfg(
        tmp_path, TARGETING, stem="tinytarget", results_root=run.results_root, effects={"loss_target": {"value": 0.6}}
    )
    assert work_dir(changed) == work_dir(run) and Plan.load(work_dir(run) / "plan.safetensors")
    with pytest.raises(ConfigError, match="other effects settings"):
        measure_targeting(changed, tiny_model, tiny_sae, task_vectors={}, progress=False)


def test_targeting_figure(setup, tmp_path):
    import matplotlib.pyplot as plt

    from saets_utils.report import plots

    *_, df = setup
    many = pd.concat([df.assign(task=t, target_rank=df["target_rank"] * (i + 1)) for i, t in enumerate("abc")])
    many.loc[many.index[0], ["target_rank", "ratio"]] = np.nan
    path = plots.save_figure(plots.plot_targeting(many), tmp_path / "targeting.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    assert plt.get_fignums() == []


# --- wiring: 03's evaluate_run, 04's figures, the report index ----------------------------------


def test_evaluate_run_measures_targeting_and_04_draws_it(setup, tmp_path, monkeypatch):
    """03 on the tiny run (a fake judge; short examples that fit the tiny context) writes the
    targeting table next to its own; 04 draws it; the report index lists it; switched off, no
    stale table or figure is left behind."""
    import shutil
    from types import SimpleNamespace

    from saets_utils.evaluation import evaluate
    from saets_utils.judges.base import JudgeResult
    from saets_utils.report import figures, pipeline
    from saets_utils.steering import tasks

    run, model, sae, plan, _, _ = setup
    short = tasks.Task(
        name="short",
        behaviour="b",
        coherence="c",
        steering_prompt="p",
        positive=[f"zz zap {i} zzz" for i in range(8)],
        negative=[f"aa cap {i} aaa" for i in range(8)],
    )
    short_file = tmp_path / "short.yaml"  # config checks task files at load; given by path
    short_file.write_text(yaml.safe_dump(short.model_dump()))
    new = build_run_cfg(
        tmp_path,
        TARGETING,
        stem="tinytarget",
        eval={
            "tasks": [str(short_file)],
            "methods": ["CAA", "SAE", "prompt"],
            "scale_grid": {"start": 0, "stop": 20, "step": 20},
            "samples_per_scale": 2,
            "new_tokens": 4,
            "bootstrap": 10,
            "fgaa_density_max": 1.0,
        },
    )
    (work_dir(new)).mkdir(parents=True)
    shutil.copy(work_dir(run) / "plan.safetensors", work_dir(new) / "plan.safetensors")  # 01's plan, same settings
    save_file(
        {"mean": plan.baseline_mean, "density": plan.baseline_density}, str(new.results_dir / "baseline.safetensors")
    )
    monkeypatch.setattr(evaluate, "load_tasks", lambda names: [short])
    judge = SimpleNamespace(judge_id="fake", stats=SimpleNamespace(as_dict=lambda: {"calls": 0}))
    monkeypatch.setattr(evaluate, "make_judge", lambda *a, **k: judge)
    monkeypatch.setattr(
        evaluate,
        "score_requests",
        lambda j, reqs, progress=True: [JudgeResult.scored(1 + len(q.text) % 10, "fake") for q in reqs],
    )

    report = evaluate.evaluate_run(new, model, sae, progress=False)
    ev = new.results_dir / "eval"
    assert report.targeting is not None and report.targeting_summary is not None
    assert report.targeting[["task", "method"]].values.tolist() == [["short", "CAA"], ["short", "SAE"]]
    assert (report.targeting["targets_from"] == "SAE").all()
    targets = json.loads((ev / "targets.json").read_text())
    assert json.loads(report.targeting["targets"].iloc[0]) == json.loads(targets[0]["targets"])
    pd.testing.assert_frame_equal(
        pd.read_csv(ev / "targeting_summary.csv"), report.targeting_summary, check_dtype=False
    )
    assert np.isfinite(report.targeting["target_rank"]).all()

    made = figures.make_all_figures(new)
    assert new.results_dir / "figures" / "targeting.png" in made
    index = pipeline.write_index(new).read_text()
    assert "Targeting (judge-free)" in index and "targeting.png" in index

    off = new.model_copy(update={"eval": new.eval.model_copy(update={"targeting": False})})
    report = evaluate.evaluate_run(off, model, sae, progress=False)
    assert report.targeting is None and not (ev / "targeting.csv").exists()
    figures.make_all_figures(off)
    assert not (new.results_dir / "figures" / "targeting.png").exists()
    assert "Targeting (judge-free)" not in pipeline.write_index(off).read_text()
    empty = measure_targeting(
        new, model, sae, task_vectors={}, progress=False
    )  # nothing to measure: empty tables, no error
    assert list(empty.columns) == list(COLUMNS) and empty.empty
    assert pd.read_csv(ev / "targeting_summary.csv").empty
