#!/usr/bin/env python
"""Does the secant scale search find the reference sweep's scales, at what cost?

On a run's measured vectors (its 01 plan: vectors, loss chunks, unsteered loss), side by side in
one run, block by block:

- **sweep**: the reference's search (grid upwards until the loss exceeds the target, linear
  interpolation between the last two grid points), batched as 01 ran it before; the oracle.
- **secant**: :func:`saets_utils.effects.calibration.calibrate_scales_secant` with the run's
  settings and the run's starting scale (the sweep's median over the SAE's first 4 decoder rows; the
  demo's vectors 0-3 are those rows).
- **dense** (the first ``--dense`` vectors): the loss at every ``--dense-step`` within +-20 of the
  sweep's scale, so both answers can be set against the curve's actual crossing.

Prints the distribution of |scale_secant - scale_sweep| (absolute and relative), the status
agreement, both errors against the dense crossing, the loss evaluations per vector and the
wall-clock ratio of the two searches.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/calibration_agreement.py \
        --params params/demo.yaml --json results/demo/calibration_agreement.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from saets_utils.config import load_config  # noqa: E402
from saets_utils.effects.calibration import (  # noqa: E402
    calibrate_scales,
    calibrate_scales_secant,
    interpolate_scale,
    loss_target_value,
    resid_at_hook,
    scale_hint,
    steered_losses,
)
from saets_utils.effects.plan import Plan  # noqa: E402


def _pct(x: np.ndarray) -> str:
    if x.size == 0:
        return "n/a"
    q = np.percentile(x, [50, 90, 99, 100])
    return f"median {q[0]:.3g}, p90 {q[1]:.3g}, p99 {q[2]:.3g}, max {q[3]:.3g} (n={x.size})"


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--vectors", type=int, default=128, help="how many of the plan's vectors")
    ap.add_argument("--dense", type=int, default=16, help="vectors whose loss curve is evaluated densely")
    ap.add_argument("--dense-step", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rtol", type=float, default=None, help="override effects.calibration.rtol")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from saets_utils.models.loading import load_model

    run = load_config(a.params)
    plan_path = run.results_dir / "effects_work" / "plan.safetensors"
    if not plan_path.is_file():
        raise SystemExit(f"{plan_path} not found: run notebook 01 on {a.params} first (it writes the plan)")
    plan = Plan.load(plan_path)
    if a.rtol is not None:
        cal_cfg = run.effects.calibration.model_copy(update={"rtol": a.rtol})
        run = run.model_copy(update={"effects": run.effects.model_copy(update={"calibration": cal_cfg})})
    e = run.effects
    model = load_model(run.model, "cpu")
    hook, grid, target = run.sae.hook_name, e.scale_grid.values(), e.loss_target
    tokens = plan.loss_tokens
    resid = resid_at_hook(model, hook, tokens)
    l0 = float(steered_losses(model, hook, tokens, resid, torch.zeros(1, model.cfg.d_model))[0])
    vecs = plan.vectors[: a.vectors].float()
    hint = scale_hint(model, hook, tokens, resid, vecs[:4], grid, target, l0)
    k = e.vectors_per_batch
    sweep_s, secant_s, sweep_st, secant_st, evals_sw, evals_se = [], [], [], [], [], []
    t_sweep = t_secant = 0.0
    for lo in range(0, vecs.shape[0], k):
        blk = vecs[lo : lo + k]
        t0 = time.perf_counter()
        sw = calibrate_scales(model, hook, tokens, resid, blk, grid, target, l0)
        t1 = time.perf_counter()
        c = e.calibration
        se = calibrate_scales_secant(
            model, hook, tokens, resid, blk, grid, target, l0, hint, c.coarse_chunks, c.rtol, c.max_evals
        )
        t2 = time.perf_counter()
        t_sweep, t_secant = t_sweep + t1 - t0, t_secant + t2 - t1
        sweep_s += sw.scales.tolist()
        secant_s += se.scales.tolist()
        sweep_st += sw.status
        secant_st += se.status
        assert sw.evaluations is not None and se.evaluations is not None
        evals_sw += sw.evaluations.tolist()
        evals_se += se.evaluations.tolist()
        print(f"  vectors {lo}..{lo + len(blk) - 1}: sweep {t1 - t0:.1f} s, secant {t2 - t1:.1f} s", flush=True)
    sw_a, se_a = np.array(sweep_s), np.array(secant_s)
    both = np.isfinite(sw_a) & np.isfinite(se_a)
    diff = np.abs(se_a - sw_a)[both]
    rel = diff / np.maximum(sw_a[both], 1e-9)
    statuses = sorted(set(sweep_st) | set(secant_st))
    confusion = {
        f"{x}->{y}": sum(1 for p, q in zip(sweep_st, secant_st) if p == x and q == y)
        for x in statuses
        for y in statuses
    }
    confusion = {key: n for key, n in confusion.items() if n}
    agree = float(np.mean([(p == q) or ({p, q} <= {"ok", "non_monotone"}) for p, q in zip(sweep_st, secant_st)]))

    # dense curves around the sweep's crossing
    tgt = loss_target_value(target, l0)
    dense_sw, dense_se = [], []
    for i in range(min(a.dense, vecs.shape[0])):
        if not np.isfinite(sw_a[i]) or sweep_st[i] == "not_reached":
            continue
        lo_s = max(0.0, sw_a[i] - 20)
        pts = np.arange(lo_s, sw_a[i] + 20 + 1e-9, a.dense_step)
        losses = steered_losses(
            model, hook, tokens, resid, vecs[i][None] * torch.tensor(pts, dtype=torch.float32)[:, None]
        )
        ls = losses.numpy()
        if ls[0] > tgt:  # the dense window starts above the target: the crossing lies lower
            continue
        truth, _ = interpolate_scale(pts.tolist(), ls.tolist(), tgt)
        dense_sw.append(abs(sw_a[i] - truth))
        dense_se.append(abs(se_a[i] - truth))
    n = vecs.shape[0]
    res = {
        "params": a.params,
        "vectors": n,
        "calibration": e.calibration.model_dump(),
        "start": None if hint is None else vars(hint),
        "loss_chunks": list(tokens.shape),
        "abs_diff": diff.tolist(),
        "rel_diff": rel.tolist(),
        "status_confusion": confusion,
        "status_agreement": agree,
        "evals_per_vector": {"sweep": float(np.mean(evals_sw)), "secant": float(np.mean(evals_se))},
        "seconds": {"sweep": t_sweep, "secant": t_secant},
        "ratio": t_sweep / t_secant,
        "dense_abs_error": {"sweep": dense_sw, "secant": dense_se},
    }
    print(f"\ncalibration agreement on {n} vectors of {a.params} (loss chunks {list(tokens.shape)}, start {hint})")
    print(f"  settings: {e.calibration.model_dump()}")
    print(f"  |secant - sweep|: {_pct(diff)}")
    print(f"  |secant - sweep| / sweep: {_pct(rel)}")
    print(f"  statuses sweep->secant: {confusion}; agreement {100 * agree:.1f}% (ok and non_monotone count as one)")
    print(f"  loss evaluations on all chunks per vector: sweep {np.mean(evals_sw):.2f}, secant {np.mean(evals_se):.2f}")
    print(f"  wall: sweep {t_sweep:.1f} s, secant {t_secant:.1f} s -> {t_sweep / t_secant:.2f}x")
    print(f"  against the dense crossing (step {a.dense_step:g}): |sweep - dense| {_pct(np.array(dense_sw))}")
    print(f"                                            |secant - dense| {_pct(np.array(dense_se))}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
