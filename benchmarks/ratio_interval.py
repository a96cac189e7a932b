#!/usr/bin/env python
"""Speed ratios of ``effects_throughput.py`` runs with a bootstrap interval, pooled over runs.

Each run's JSON holds the seconds per vector of every reference vector and of every block of ours
(``per_vector_s``: total and calibration). For each comparison (ours against (a) the reference loop
on our model, and against (a') the reference loop on a stock TransformerLens model) this prints the
ratio of the pooled means with a 95% percentile-bootstrap interval (vectors and blocks resampled
within each run, so every run keeps its weight), and each run's own ratio.

    python benchmarks/ratio_interval.py benchmarks/results/2026-11-30/effects_cpu_demo_final_run*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def pooled_ratio(runs: list[dict], ref: str, column: int, reps: int, seed: int) -> tuple[float, float, float, list]:
    """Ratio mean(ref s/vector) / mean(ours s/vector) over all runs (``column`` 0: total, 1:
    calibration), its 95% bootstrap interval and each run's ratio."""
    used = [r for r in runs if r["per_vector_s"][ref]]  # runs that timed this reference
    refs = [np.array([v[column] for v in r["per_vector_s"][ref]]) for r in used]
    ours = [np.array([v[column] for v in r["per_vector_s"]["fast"]]) for r in used]
    point = np.concatenate(refs).mean() / np.concatenate(ours).mean()
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(reps):
        a = np.concatenate([x[rng.integers(0, len(x), len(x))] for x in refs])
        b = np.concatenate([x[rng.integers(0, len(x), len(x))] for x in ours])
        boot.append(a.mean() / b.mean())
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(point), float(lo), float(hi), [float(x.mean() / y.mean()) for x, y in zip(refs, ours, strict=True)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="JSON files written by effects_throughput.py --json")
    ap.add_argument("--reps", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the ratios to this file")
    args = ap.parse_args(argv)
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    missing = [p for p, r in zip(args.runs, runs, strict=True) if "per_vector_s" not in r]
    if missing:
        raise SystemExit(
            f"no per_vector_s in {missing}: rerun effects_throughput.py (it records them since 2026-11-30)"
        )
    out = {}
    n = {k: sum(len(r["per_vector_s"][k]) for r in runs) for k in ("ref", "stock_ref", "fast")}
    print(f"{len(runs)} runs: {n['ref']} vectors of (a), {n['stock_ref']} of (a'), {n['fast']} blocks of (b)")
    for ref, label in (
        ("ref", "(b)/(a)  reference loop on our model"),
        ("stock_ref", "(b)/(a') reference loop, stock TL"),
    ):
        if n[ref] == 0:
            continue
        for column, what in ((0, "overall"), (1, "calibration")):
            point, lo, hi, each = pooled_ratio(runs, ref, column, args.reps, args.seed)
            out[f"{ref}.{what}"] = {"ratio": point, "ci95": [lo, hi], "per_run": each}
            print(
                f"{label}, {what:<11}: {point:6.1f}x [95% CI {lo:.1f}, {hi:.1f}]; per run {[round(x, 1) for x in each]}"
            )
    for ref, label in (("ref_calibration", "(a)"), ("stock_ref_calibration", "(a')")):
        # the reference's sweep alone on the same vectors as ours (--ref-calibration-vectors)
        sweeps = [np.array(r["per_vector_s"].get(ref, [])) for r in runs]
        if sum(len(x) for x in sweeps) == 0:
            continue
        ours = [
            np.array([v[1] for v in r["per_vector_s"]["fast"]]) for r, x in zip(runs, sweeps, strict=True) if len(x)
        ]
        sweeps = [x for x in sweeps if len(x)]
        point = np.concatenate(sweeps).mean() / np.concatenate(ours).mean()
        rng = np.random.default_rng(args.seed)
        boot = [
            np.concatenate([x[rng.integers(0, len(x), len(x))] for x in sweeps]).mean()
            / np.concatenate([y[rng.integers(0, len(y), len(y))] for y in ours]).mean()
            for _ in range(args.reps)
        ]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out[f"{ref}.alone"] = {"ratio": float(point), "ci95": [float(lo), float(hi)]}
        print(
            f"calibration alone, the reference's sweep {label} on the same vectors as ours: {point:.1f}x "
            f"[95% CI {lo:.1f}, {hi:.1f}] ({sum(len(x) for x in sweeps)} sweeps, {sum(len(y) for y in ours)} blocks)"
        )
    fr = [r.get("effects_fraction_of_raw") for r in runs]
    print(
        f"rollout tokens/s as a fraction of a raw forward of the same shape, per run: {[round(x, 3) for x in fr if x]}"
    )
    out["effects_fraction_of_raw"] = fr
    out["runs"] = list(args.runs)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
