"""Speed ratios of ``benchmarks.effects_throughput`` runs with a bootstrap interval, pooled over runs.

Each run's JSON holds the seconds per vector of every reference vector and of every block of ours
(``per_vector_s``: total and calibration, and a block's number of vectors, its weight). For each
comparison (ours against (a) the reference loop on our model, and against (a') the reference loop on
a stock TransformerLens model; and the reference's sweep alone on the same vectors as ours) this
prints the ratio of the pooled means, a 95% percentile-bootstrap interval that resamples the runs
and, within each run, its vectors and blocks (so machine load that differs between runs widens it),
and each run's own ratio.

    python -m benchmarks.ratio_interval benchmarks/results/2026-11-30/effects_cpu_demo_aligned_gqa_run*.json \
        benchmarks/results/2026-11-30/effects_cpu_demo_calibration64*.json

Its smoke test pools the JSON of two ``python -m benchmarks.effects_throughput --smoke --json`` runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.output import write_json

Sample = tuple[np.ndarray, np.ndarray]  # values (s/vector) and weights (vectors)


def samples(run: dict, key: str, column: int | None) -> Sample:
    """``run["per_vector_s"][key]`` as values and weights: entries ``[s, calibration s(, vectors)]``
    (``column`` picks one) or plain seconds (``column`` None), weight 1 unless recorded."""
    rows = run["per_vector_s"].get(key, [])
    if column is None:
        return np.asarray(rows, dtype=float), np.ones(len(rows))
    return (
        np.asarray([r[column] for r in rows], dtype=float),
        np.asarray([r[2] if len(r) > 2 else 1.0 for r in rows], dtype=float),
    )


def _mean(parts: list[Sample]) -> float:
    x = np.concatenate([p[0] for p in parts])
    w = np.concatenate([p[1] for p in parts])
    return float((x * w).sum() / w.sum())


def ratio_interval(pairs: list[tuple[Sample, Sample]], reps: int, seed: int) -> tuple[float, float, float, list]:
    """Ratio of the pooled (weighted) means ``reference / ours`` over runs given as ``(reference,
    ours)`` samples, its 95% two-level bootstrap interval (runs, then entries within each run) and
    each run's ratio."""
    rng = np.random.default_rng(seed)

    def resample(sample: Sample) -> Sample:
        i = rng.integers(0, len(sample[0]), len(sample[0]))
        return sample[0][i], sample[1][i]

    boot = []
    for _ in range(reps):
        chosen = [pairs[j] for j in rng.integers(0, len(pairs), len(pairs))]
        boot.append(_mean([resample(a) for a, _ in chosen]) / _mean([resample(b) for _, b in chosen]))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    point = _mean([a for a, _ in pairs]) / _mean([b for _, b in pairs])
    return point, float(lo), float(hi), [_mean([a]) / _mean([b]) for a, b in pairs]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="JSON files written by benchmarks.effects_throughput --json")
    ap.add_argument("--reps", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the ratios to this file")
    args = ap.parse_args(argv)
    runs = [json.loads(Path(p).read_text()) for p in args.runs]
    missing = [p for p, r in zip(args.runs, runs, strict=True) if "per_vector_s" not in r]
    if missing:
        raise SystemExit(
            f"no per_vector_s in {missing}: rerun benchmarks.effects_throughput (it records them since 2026-11-30)"
        )
    out: dict = {"runs": list(args.runs)}
    comparisons = [
        ("ref", 0, 0, "(b)/(a)  reference loop on our model, overall"),
        ("ref", 1, 1, "(b)/(a)  reference loop on our model, calibration"),
        ("stock_ref", 0, 0, "(b)/(a') reference loop on stock TransformerLens, overall"),
        ("stock_ref", 1, 1, "(b)/(a') reference loop on stock TransformerLens, calibration"),
        ("ref_calibration", None, 1, "calibration alone: the reference's sweep (a) on the same vectors as ours"),
        ("stock_ref_calibration", None, 1, "calibration alone: the reference's sweep (a') on the same vectors as ours"),
    ]
    for key, col, ours_col, label in comparisons:
        pairs = [(samples(r, key, col), samples(r, "fast", ours_col)) for r in runs]
        pairs = [(a, b) for a, b in pairs if len(a[0]) and len(b[0])]  # runs that timed both
        if not pairs:
            continue
        point, lo, hi, each = ratio_interval(pairs, args.reps, args.seed)
        n_ref = sum(len(a[0]) for a, _ in pairs)
        out[f"{key}.{'overall' if col == 0 else 'calibration'}"] = {
            "ratio": point,
            "ci95_runs_and_vectors": [lo, hi],
            "per_run": each,
            "runs": len(pairs),
            "reference_samples": n_ref,
        }
        print(
            f"{label}: {point:.1f}x [95% CI {lo:.1f}, {hi:.1f}]; per run {[round(x, 1) for x in each]} "
            f"({len(pairs)} runs, {n_ref} reference samples)"
        )
    fr = [r.get("effects_fraction_of_raw") for r in runs]
    print(
        f"rollout tokens/s as a fraction of a raw forward of the same shape, per run: {[round(x, 3) for x in fr if x]}"
    )
    out["effects_fraction_of_raw"] = fr
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
