"""Scoring: per-scale product of means, judge errors excluded and counted, max over scales with a
seeded bootstrap CI, and the paper-style tables."""

import numpy as np
import pandas as pd
import pytest

from saets_utils.config import JudgeConfig
from saets_utils.evaluation import scoring
from saets_utils.evaluation.reference_numbers import REFERENCE_TASKS, published_model, published_table


def _samples(cells, task="anger", method="SAE-TS"):
    """cells: {scale: (behaviour list, coherence list)} -> samples table."""
    rows = []
    for scale, (bs, cs) in cells.items():
        for i, (b, c) in enumerate(zip(bs, cs)):
            rows.append(
                dict(
                    task=task,
                    method=method,
                    scale=scale,
                    sample=i,
                    behaviour=b,
                    coherence=c,
                    behaviour_error=None,
                    coherence_error=None,
                )
            )
    return pd.DataFrame(rows)


def _noisy(rng, n, means, task="anger", method="SAE-TS"):
    """n texts per scale; behaviour ~ Bernoulli-ish around means[scale][0], coherence around [1]."""
    cells = {
        s: (np.clip(rng.normal(b, 0.25, n), 0, 1), np.clip(rng.normal(c, 0.25, n), 0, 1)) for s, (b, c) in means.items()
    }
    return _samples(cells, task, method)


MEANS = {0: (0.1, 0.9), 20: (0.4, 0.8), 40: (0.8, 0.7), 60: (0.9, 0.2)}


def test_product_is_mean_behaviour_times_mean_coherence():
    df = _samples({0: ([0.0, 0.2], [1.0, 0.8]), 20: ([0.5, 1.0, 0.0], [0.5, 0.5, 0.2])})
    t = scoring.by_scale(df)
    assert list(t.columns) == ["task", "method", "scale", "behaviour", "coherence", "product", "n", "unscored"]
    assert t["product"].tolist() == pytest.approx([0.1 * 0.9, 0.5 * 0.4])
    assert t["n"].tolist() == [2, 3] and t["unscored"].tolist() == [0, 0]


def test_errors_are_excluded_from_means_and_counted():
    df = _samples({0: ([0.0, 0.2, 0.4, 0.6], [1.0, 0.8, 0.6, 0.4])})
    df.loc[1, "behaviour"] = np.nan
    df.loc[1, "behaviour_error"] = "judge timeout"
    df.loc[2, "coherence_error"] = "bad json"  # a score left beside an error is not trusted either
    df.loc[3, "coherence"] = np.nan
    t = scoring.by_scale(df).iloc[0]
    # only text 0 has both scores: both means are taken over it alone, n counts scored texts
    assert t["behaviour"] == pytest.approx(0.0) and t["coherence"] == pytest.approx(1.0)
    assert t["n"] == 1 and t["unscored"] == 3
    # an all-errored scale gives NaN, never 0, and is skipped by the max
    df2 = pd.concat([df, _samples({20: ([np.nan], [0.5])})], ignore_index=True)
    s = scoring.summary(df2, n_boot=50)
    assert np.isnan(scoring.by_scale(df2)["product"].iloc[1])
    assert s["best_scale"].iloc[0] == 0 and np.isfinite(s["ci_low"].iloc[0])


def test_unnormalised_scores_rejected():
    with pytest.raises(ValueError, match="normalised"):
        scoring.by_scale(_samples({0: ([7.0], [0.5])}))
    with pytest.raises(ValueError, match="coherence"):
        scoring.by_scale(_samples({0: ([0.5], [0.5])}).drop(columns="coherence"))


def test_max_over_scales_picks_best_scale():
    s = scoring.summary(_noisy(np.random.default_rng(0), 200, MEANS), n_boot=200)
    row = s.iloc[0]
    assert row["best_scale"] == 40 and row["n"] == 200
    assert row["max_product"] == pytest.approx(row["behaviour"] * row["coherence"])
    assert row["max_product"] == pytest.approx(0.8 * 0.7, abs=0.05)


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_texts():
    rng = np.random.default_rng(1)
    widths = []
    for n in (32, 512):
        row = scoring.summary(_noisy(rng, n, MEANS), n_boot=300, seed=0).iloc[0]
        assert row["ci_low"] <= row["max_product"] <= row["ci_high"]
        widths.append(row["ci_high"] - row["ci_low"])
    assert widths[1] < widths[0] / 2


def test_bootstrap_is_seeded_and_per_method():
    df = _noisy(np.random.default_rng(2), 64, MEANS)
    a = scoring.summary(df, n_boot=100, seed=3)
    pd.testing.assert_frame_equal(a, scoring.summary(df, n_boot=100, seed=3))
    assert not a.equals(scoring.summary(df, n_boot=100, seed=4))
    both = pd.concat([_noisy(np.random.default_rng(5), 64, MEANS, method="CAA"), df], ignore_index=True)
    b = scoring.summary(both, n_boot=100, seed=3)
    assert b["method"].tolist() == ["CAA", "SAE-TS"]  # project order, not file order
    pd.testing.assert_frame_equal(b[b.method == "SAE-TS"].reset_index(drop=True), a)
    assert scoring.summary(df, n_boot=0)["ci_low"].isna().all()


def _summary_for(tasks, methods, value=0.2):
    return pd.DataFrame(
        [
            dict(
                task=t,
                method=m,
                best_scale=40.0,
                max_product=value + 0.01 * i,
                ci_low=value - 0.05,
                ci_high=value + 0.1,
                n=8,
            )
            for i, t in enumerate(tasks)
            for m in methods
        ]
    )


def test_paper_style_table():
    s = _summary_for(["love", "anger"], ["prompt", "SAE-TS", "CAA"])
    t = scoring.paper_style_table(s)
    assert list(t.index) == ["love", "anger", "average"]
    assert list(t.columns) == ["CAA", "SAE-TS", "prompt"]
    assert t.loc["average", "CAA"] == pytest.approx(0.205)


REF_JUDGE = JudgeConfig(kind="openai", model="gpt-4o-mini", template="reference")


def test_compare_with_published():
    assert scoring.compare_with_published(_summary_for(["anger"], ["CAA"]), "SmolLM2-135M-Instruct", REF_JUDGE) is None
    c = scoring.compare_with_published(
        _summary_for(["anger", "london"], ["CAA", "FGAA"]), "google/gemma-2-2b", REF_JUDGE
    )
    assert list(c.columns) == [
        "task",
        "method",
        "ours",
        "ci_low",
        "ci_high",
        "published",
        "difference",
        "judge",
        "comparable",
    ]
    assert c["comparable"].all() and c.attrs["warning"] is None
    row = c[(c.task == "anger") & (c.method == "CAA")].iloc[0]
    assert row["published"] == 0.1666 and row["difference"] == pytest.approx(0.2 - 0.1666)
    avg = c[(c.task == "average") & (c.method == "CAA")].iloc[0]
    assert avg["published"] == pytest.approx((0.1666 + 0.0476) / 2)  # over our tasks, not the paper's nine
    assert c[c.method == "FGAA"]["published"].isna().all()
    c9 = scoring.compare_with_published(_summary_for(list(REFERENCE_TASKS), ["SAE-TS"]), "gemma-2-9b", REF_JUDGE)
    assert c9[c9.task == "average"]["published"].tolist() == [0.3376]
    assert c9[c9.task != "average"]["published"].isna().all()


@pytest.mark.parametrize(
    "judge",
    [
        JudgeConfig(kind="openai", model="gpt-4o-mini", template="project"),
        JudgeConfig(kind="openai", model="gpt-4.1", template="reference"),
        JudgeConfig(kind="offline"),
    ],
)
def test_compare_with_published_labels_or_refuses_another_judge(judge):
    sm = _summary_for(["anger"], ["CAA"])
    with pytest.warns(UserWarning, match="NOT COMPARABLE"):
        c = scoring.compare_with_published(sm, "gemma-2-2b", judge)
    assert not c["comparable"].any() and "NOT COMPARABLE" in c.attrs["warning"]
    with pytest.raises(ValueError, match="reference template"):
        scoring.compare_with_published(sm, "gemma-2-2b", judge, strict=True)


def test_published_numbers():
    t = published_table("gemma-2-2b")
    wide = t.pivot(index="task", columns="method", values="product")
    assert list(wide.columns.sort_values()) == sorted(["CAA", "SAE", "SAE-TS", "pinverse", "rotation"])
    assert set(wide.index) == set(REFERENCE_TASKS) | {"average"}
    # the stated averages are the means of the nine tasks
    np.testing.assert_allclose(wide.drop(index="average").mean(), wide.loc["average"], atol=1e-4)
    assert wide.loc["london", "SAE-TS"] == 0.5380
    assert published_model("google/gemma-2-9b") == "gemma-2-9b"
    assert published_table("gemma-2-9b")["task"].unique().tolist() == ["average"]
    assert published_table("gemma-2-2b-it") is None and published_table("SmolLM2-135M") is None


def test_method_differences_pair_tasks_and_bracket_the_mean_difference():
    from saets_utils.evaluation.scoring import method_differences

    tasks = [f"t{i}" for i in range(8)]
    rows = [{"task": t, "method": "A", "v": 1.0 + 0.1 * i} for i, t in enumerate(tasks)]
    rows += [{"task": t, "method": "B", "v": 0.5 + 0.1 * i} for i, t in enumerate(tasks)]  # A - B = 0.5 everywhere
    rows += [{"task": t, "method": "C", "v": (-1) ** i * 0.3} for i, t in enumerate(tasks)]
    df = method_differences(pd.DataFrame(rows), "v", [("A", "B"), ("A", "C"), ("A", "missing")], n_boot=2000)
    ab = df[df.b == "B"].iloc[0]
    # paired: a constant difference has no spread although both methods vary a lot over tasks
    assert ab.mean_diff == pytest.approx(0.5) and ab.ci_low == pytest.approx(0.5) and ab.ci_high == pytest.approx(0.5)
    ac = df[df.b == "C"].iloc[0]
    assert ac.ci_low < ac.mean_diff < ac.ci_high and ac.n_tasks == 8
    assert "missing" not in set(df.b)


def test_behaviour_and_coherence_means_over_the_same_texts():
    # Regression: a text whose coherence failed used to count in the behaviour mean (and vice
    # versa), so the product mixed two different sets of texts.
    df = _samples({0: ([1.0, 0.0, 0.0], [0.2, 0.8, np.nan])})
    df.loc[2, "coherence_error"] = "timeout: no reply"
    t = scoring.by_scale(df).iloc[0]
    assert (t["behaviour"], t["coherence"]) == pytest.approx((0.5, 0.5)) and t["product"] == pytest.approx(0.25)
    assert (t["n"], t["unscored"]) == (2, 1)
    s = scoring.summary(df, n_boot=20).iloc[0]
    assert (s["n"], s["unscored"]) == (2, 1) and s["max_product"] == pytest.approx(0.25)
