"""Every benchmark runs: ``python -m benchmarks.<name> --smoke`` on the tiny model (or toy sizes), as a
person runs it, and writes a well-formed result (the columns present, ratios finite). Timings are
never asserted: they depend on the machine and its load. Slow tier, except the check that the
committed ratios still follow from the committed runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "2026-11-30"


def run_benchmark(name: str, out: Path, *args: str) -> dict:
    """``python -m benchmarks.<name> *args --json out`` from the repo root; its JSON result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.setdefault("OMP_NUM_THREADS", "1")  # a shared CI machine: no spinning threads
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


@pytest.fixture(scope="module")
def throughput(tmp_path_factory) -> dict[str, Path]:
    """The JSON of the effects throughput smoke run on the tiny model and on the 2-layer Gemma-2-shaped model."""
    tmp = tmp_path_factory.mktemp("throughput")
    run_benchmark("effects_throughput", tmp / "tiny.json", "--smoke")
    run_benchmark("effects_throughput", tmp / "gemma.json", "--smoke", "--gemma-shaped")
    return {"tiny": tmp / "tiny.json", "gemma": tmp / "gemma.json"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny", "gemma"])
def test_effects_throughput_smoke(throughput, kind):
    res = json.loads(throughput[kind].read_text())
    for key in (
        "ratio_wall",
        "ratio_cpu",
        "ratio_calibration",
        "ratio_rollouts",
        "ratio_wall_vs_stock_ref",
        "ratio_calibration_vs_stock_ref",
        "effects_fraction_of_raw",
        "raw_forward_tokens_per_s",
        "calibration_chunk_evals_per_vector",
    ):
        assert finite(res[key]) and res[key] > 0, key
    # --smoke runs every option: (a), (b), (a'), (b'), the sweep alone on our vectors, the profile
    assert res["ref"]["vectors"] == 1 and res["fast"]["vectors"] == 4 and res["stock_ref"]["vectors"] == 1
    assert res["stock_fast"]["vectors"] == 2
    assert {"ref.calibration", "ref.effect", "ref.generate"} <= set(res["ref"]["phases_wall_s"])
    assert {"fast.calibration", "fast.measure_effects"} <= set(res["fast"]["phases_wall_s"])
    per = res["per_vector_s"]
    assert len(per["ref"]) == 1 and len(per["stock_ref"]) == 1 and sum(b[2] for b in per["fast"]) == 4
    assert len(per["ref_calibration"]) == len(per["stock_ref_calibration"]) == 4
    assert all(finite(x) for row in per["ref"] + per["fast"] for x in row)
    counts = res["fast"]["counts"]
    assert counts["gen_calls"] >= 1 and counts["rollout_tokens"] == counts["gen_rows"] * res["settings"]["total_tokens"]
    assert res["ref"]["flops"] > 0 and res["fast"]["flops"] > 0
    # the same vector through both paths: both find a scale, their effects point roughly the same way
    assert len(res["ref_scales"]) == len(res["fast_scales_same_vectors"]) == len(res["effect_cosines"]) == 1
    assert all(-1.0 <= c <= 1.0 for c in res["effect_cosines"])
    assert "SPEED-UP (b)/(a)" in res["report"] and "--profile" in res["report"]


@pytest.mark.slow
def test_ratio_interval_pools_smoke_runs(throughput, tmp_path):
    paths = [str(p) for p in throughput.values()]
    res = run_benchmark("ratio_interval", tmp_path / "ratios.json", *paths, "--reps", "200")
    for key in ("ref.overall", "ref.calibration", "stock_ref.overall", "stock_ref.calibration"):
        r = res[key]
        assert finite(r["ratio"]) and r["ratio"] > 0 and r["runs"] == 2, key
        lo, hi = r["ci95_runs_and_vectors"]
        assert finite(lo) and finite(hi) and lo <= hi and len(r["per_run"]) == 2
    assert finite(res["ref_calibration.calibration"]["ratio"])


def test_ratio_interval_reproduces_the_committed_ratios(tmp_path):
    """docs/performance.md's pooled ratios come from these four committed runs (the point estimates
    do not depend on the bootstrap)."""
    runs = ["aligned_gqa_run1", "aligned_gqa_run2", "calibration64", "calibration64_run2"]
    paths = [str(RESULTS / f"effects_cpu_demo_{r}.json") for r in runs]
    res = run_benchmark("ratio_interval", tmp_path / "ratios.json", *paths, "--reps", "10")
    committed = json.loads((RESULTS / "ratio_interval_demo.json").read_text())
    for key, value in committed.items():
        if isinstance(value, dict):
            assert res[key]["ratio"] == pytest.approx(value["ratio"], rel=1e-12), key


@pytest.mark.slow
def test_calibration_agreement_smoke(tmp_path):
    res = run_benchmark("calibration_agreement", tmp_path / "cal.json", "--smoke", "--variant", "0.2:2")
    assert res["vectors"] == 8 and len(res["truth"]) == 8
    assert set(res["evals_per_vector"]) == set(res["seconds"]) == {"sweep", "secant", "secant 0.2/2"}
    assert all(finite(x) and x > 0 for x in res["evals_per_vector"].values())
    assert finite(res["ratio"]) and 0.0 <= res["status_agreement"] <= 1.0
    assert set(res["error_minus_sweep"]) == {"secant", "secant 0.2/2"}
    assert sum(res["status_confusion"].values()) == 8


@pytest.mark.slow
def test_rollout_identity_smoke(tmp_path):
    for against in ("generate", "aligned"):
        opts = ("--smoke", "--blocks", "2", "--against", against)
        res = run_benchmark("rollout_identity", tmp_path / "rollouts.json", *opts)
        assert res["rows"] == 2 * 2 * 2 * 2  # blocks x vectors x prompts x samples
        assert res["tokens"] == res["rows"] * 12 and 0 <= res["differing_rows"] <= res["rows"]
        assert finite(res["max_rel_activation_diff"]) and finite(res["seconds_new"]) and finite(res["seconds_old"])
        assert res["engine"] == "static" and res["against"] == against


@pytest.mark.slow
def test_engine_speed_smoke(tmp_path):
    res = run_benchmark("engine_speed", tmp_path / "engine.json", "--smoke")
    assert res["rows"] == 2 * 2 * 2 and res["total_tokens"] == 12  # vectors x prompts x samples
    keys = ("rollouts_static_over_tl", "effects_step_static_over_tl", "rollouts_static_fraction_of_raw")
    for key in (*keys, "calibration_gradient_over_hint", "effects_step_new_over_today"):
        r = res[key]
        assert finite(r["ratio"]) and r["ci"][0] <= r["ratio"] <= r["ci"][1] and len(r["per_rep"]) == 2, key
    assert all(finite(v) and v > 0 for v in res["tokens_per_s"].values())
    assert res["rows_differing"] == [0, 0]  # the engines draw the same tokens (fp32 on the CPU)
    cal = res["calibration"]
    assert cal["evaluations_per_vector.hint"] >= 1 and cal["evaluations_per_vector.gradient"] >= 1
    assert cal["same_status"] <= 2 and len(res["once_per_worker_s"]) >= 2


@pytest.mark.slow
def test_step_vs_commit_smoke(tmp_path):
    """The repository against itself given as a folder (no git needed), each side in a child process."""
    res = run_benchmark("step_vs_commit", tmp_path / "step.json", "--smoke", "--commit", str(ROOT))
    assert res["commit"] == str(ROOT.resolve()) and res["reps"] == 2
    for key in ("effects_step_now_over_then", "fast.calibration_now_over_then", "fast.measure_effects_now_over_then"):
        r = res[key]
        assert finite(r["ratio"]) and r["ci"][0] <= r["ratio"] <= r["ci"][1] and len(r["per_rep"]) == 2, key
    assert all(v >= 1 for v in res["evaluations_per_vector"].values())


@pytest.mark.slow
def test_ridge_cv_smoke(tmp_path):
    res = run_benchmark("ridge_cv", tmp_path / "ridge.json", "--smoke")
    small, full = res["small"], res["full"]
    assert finite(small["ratio"]) and finite(small["fit_approximator"]["ratio"])
    # the path's CV errors are refitting's (a property, not a timing)
    assert small["max_rel_diff_cv_mse"] < 1e-5 and small["best_lambda"][0] == small["best_lambda"][1]
    assert finite(full["path_s"]) and finite(full["final_fit_s"])
    assert full["best_lambda"] in [float(lam) for lam in full["cv_mse"]]
    assert len(full["cv_mse"]) == 8 and all(finite(v) for v in full["cv_mse"].values())


@pytest.mark.slow
def test_playground_latency_smoke(tmp_path):
    clicks = run_benchmark("playground_latency", tmp_path / "clicks.json", "--smoke")
    assert len(clicks) == 5
    assert all({"task", "method", "targets", "error", "first_text_s", "all_text_s"} <= set(c) for c in clicks)
    assert all(finite(c["all_text_s"]) for c in clicks)
    prepared = clicks[:3]  # the prepared selection twice, another task's SAE-TS: no error, text shown
    assert all(not c["error"] and finite(c["first_text_s"]) for c in prepared)


@pytest.mark.slow
def test_offline_judge_rescore_smoke(tmp_path):
    res = run_benchmark("offline_judge_rescore", tmp_path / "judge.json", "--smoke")
    assert res["labelled_spearman"] and all(finite(r) for r in res["labelled_spearman"].values())
    for name in ("stored", "now"):
        s = res["samples"][name]
        assert s["texts"] > 0 and all(finite(s[k]) for k in ("share_1", "share_10", "scale0_mean"))


def test_every_benchmark_has_a_smoke_test():
    """Each runnable benchmark module (one with ``if __name__ == "__main__"``) is run by a test here
    (gpu_check through benchmarks/gpu_check.sh, in tests/steering/test_engine.py)."""
    source = Path(__file__).read_text()
    runnable = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if '__name__ == "__main__"' in p.read_text()} - {
        "gpu_check"
    }
    untested = sorted(m for m in runnable if f'run_benchmark("{m}"' not in source)
    assert runnable and not untested, f"benchmarks without a smoke test in this file: {untested}"
