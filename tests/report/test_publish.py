"""``python -m saets_utils.report.publish``: compact outputs copied, paired differences computed, and
replications pooled, on synthetic run folders (no pipeline run)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from helpers import build_run_cfg
from saets_utils.report import publish as pub

TASKS = ["anger", "love", "praise", "wedding"]


def fake_run(tmp_path, stem: str, shift: float):
    """A run folder with approximator metrics, a judge summary and a targeting table: SAE-TS-nobias
    scores ``shift`` above SAE on every task, SAE 0.1 above CAA; a raw effects file that must stay out."""
    run = build_run_cfg(tmp_path, stem=stem)
    p = run.paths
    p.approximator_metrics.parent.mkdir(parents=True, exist_ok=True)
    p.approximator_metrics.write_text(json.dumps({"r2": 0.4}))
    p.effects.write_bytes(b"raw effects")
    p.summary.parent.mkdir(parents=True, exist_ok=True)
    rows, trows = [], []
    for i, t in enumerate(TASKS):
        base = 0.2 + 0.05 * i
        for m, v in (("CAA", base - 0.1), ("SAE", base), ("SAE-TS-nobias", base + shift)):
            rows.append({"task": t, "method": m, "max_product": v})
            trows.append({"task": t, "method": m, "target_rank": 1 + 10 * (m == "CAA"), "ratio": v})
    pd.DataFrame(rows).to_csv(p.summary, index=False)
    pd.DataFrame(trows).to_csv(p.targeting, index=False)
    return run


@pytest.fixture
def published(tmp_path, monkeypatch):
    monkeypatch.setattr(pub, "published_dir", lambda run: tmp_path / "published" / run.name)
    return tmp_path / "published"


def diff(table: pd.DataFrame, a: str, b: str, value: str = "max_product") -> pd.Series:
    return table[(table.a == a) & (table.b == b) & (table.value == value)].iloc[0]


def test_publish_copies_compact_outputs_and_pairs_methods(tmp_path, published):
    run = fake_run(tmp_path, "main", shift=0.2)
    copied = pub.publish(run)
    dst = published / run.name
    assert (dst / run.paths.approximator_metrics.relative_to(run.results_dir)).is_file()
    assert not (dst / run.paths.effects.relative_to(run.results_dir)).exists()  # raw effects stay out
    listed = (dst / "MANIFEST.txt").read_text()
    assert all(str(p.relative_to(dst)) in listed for p in copied)
    d = pd.read_csv(dst / "eval" / "method_differences.csv")
    row = diff(d, "SAE-TS-nobias", "SAE")
    assert row.mean_diff == pytest.approx(0.2) and row.ci_low == pytest.approx(0.2) and row.n_tasks == 4
    assert diff(d, "SAE", "CAA").mean_diff == pytest.approx(0.1)
    assert diff(d, "SAE-TS-nobias", "CAA", "log10_rank").mean_diff == pytest.approx(-np.log10(11))
    assert not (dst / "eval" / "pooled_method_differences.csv").exists()


def test_pooled_differences_average_each_task_over_the_replications(tmp_path, published):
    first = fake_run(tmp_path, "first", shift=0.2)
    second = fake_run(tmp_path, "second", shift=0.0)
    with pytest.raises(FileNotFoundError, match="publish those runs first"):
        pub.publish(second, pool_with=[first])
    pub.publish(first)
    pub.publish(second, pool_with=[first])
    own = pd.read_csv(published / "second" / "eval" / "method_differences.csv")
    pooled = pd.read_csv(published / "second" / "eval" / "pooled_method_differences.csv")
    assert diff(own, "SAE-TS-nobias", "SAE").mean_diff == pytest.approx(0.0)
    row = diff(pooled, "SAE-TS-nobias", "SAE")
    assert row.mean_diff == pytest.approx(0.1) and row.runs == 2 and row.n_tasks == 4
    assert diff(pooled, "SAE", "CAA").mean_diff == pytest.approx(0.1)  # the same in both: unchanged
