#!/usr/bin/env python
"""Does the secant scale search find the reference sweep's scales, at what cost?

On a run's measured vectors (its 01 plan: vectors, loss chunks, unsteered loss), side by side in
one run, block by block:

- **sweep**: the reference's search (grid upwards until the loss exceeds the target, linear
  interpolation between the last two grid points), batched as 01 ran it before; the oracle.
- **secant**: :func:`saets_utils.effects.calibration.calibrate_scales_secant` with the run's
  settings and the run's starting scale (the sweep's median over the SAE's first 4 decoder rows; the
  demo's vectors 0-3 are those rows).
- **variants** (``--variant RTOL:MAX_EVALS``, repeatable): the secant search with other settings,
  each measured the same way, to choose the settings from.
- **truth** (every vector the sweep finds crossing): the crossing located by bisection inside the
  sweep's bracketing grid interval to ``--truth-tol`` scale units, so every answer can be set
  against the curve's actual crossing.

Prints the distribution of |scale_secant - scale_sweep| (absolute and relative), the status
agreement, every method's error against the true crossing and the paired difference of errors
(method minus sweep: mean with a 95% bootstrap CI over vectors), the loss evaluations per vector
and the wall-clock ratio of each search to the sweep.

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


def _parse_variant(text: str, coarse_default: int | None) -> tuple[float, int, int | None]:
    """``RTOL:MAX_EVALS[:COARSE_CHUNKS]`` -> (rtol, max_evals, coarse_chunks)."""
    parts = text.split(":")
    return float(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else coarse_default


def _vname(rtol: float, max_evals: int, coarse: int | None) -> str:
    return f"secant {rtol:g}/{max_evals}" + (f"/c{coarse}" if coarse else "")


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--vectors", type=int, default=128, help="how many of the plan's vectors")
    ap.add_argument("--truth-tol", type=float, default=0.05, help="bisection stops at this bracket width")
    ap.add_argument(
        "--truth-from", default=None, help="reuse the true crossings of an earlier run's JSON (same params)"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="RTOL:MAX_EVALS[:COARSE_CHUNKS]",
        help="also run the secant search with these settings (repeatable)",
    )
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
    variants = [_parse_variant(v, e.calibration.coarse_chunks) for v in a.variant]
    var_s: dict[str, list[float]] = {_vname(*v): [] for v in variants}
    var_ev: dict[str, list[float]] = {_vname(*v): [] for v in variants}
    var_t: dict[str, float] = {_vname(*v): 0.0 for v in variants}
    sweep_s, secant_s, sweep_st, secant_st, evals_sw, evals_se = [], [], [], [], [], []
    t_sweep = t_secant = 0.0
    sw_loss_rows: list[torch.Tensor] = []
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
        for r, m, cc in variants:
            t3 = time.perf_counter()
            va = calibrate_scales_secant(model, hook, tokens, resid, blk, grid, target, l0, hint, cc, r, m)
            var_t[_vname(r, m, cc)] += time.perf_counter() - t3
            var_s[_vname(r, m, cc)] += va.scales.tolist()
            assert va.evaluations is not None
            var_ev[_vname(r, m, cc)] += va.evaluations.tolist()
        sweep_s += sw.scales.tolist()
        sw_loss_rows.append(sw.losses)
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

    sw_losses = torch.cat(sw_loss_rows)
    # the true crossing: bisection inside the sweep's bracketing grid interval, all vectors at once
    tgt = loss_target_value(target, l0)
    g = sorted(float(x) for x in grid)
    idx = [i for i in range(vecs.shape[0]) if sweep_st[i] in ("ok", "non_monotone")]
    truth = np.full(vecs.shape[0], np.nan)
    if a.truth_from:
        old = json.loads(Path(a.truth_from).read_text())
        truth = np.array(old["truth"][: vecs.shape[0]], dtype=float)
    elif idx:
        first_above = [int(torch.isfinite(sw_losses[i]).sum()) - 1 for i in idx]  # the sweep stops there
        hi = torch.tensor([g[j] for j in first_above], dtype=torch.float64)
        lo = hi - (g[1] - g[0])
        l_lo = torch.tensor([float(sw_losses[i][j - 1]) for i, j in zip(idx, first_above)])
        l_hi = torch.tensor([float(sw_losses[i][j]) for i, j in zip(idx, first_above)])
        sub = vecs[idx]
        while float((hi - lo).max()) > a.truth_tol:
            mid = (lo + hi) / 2
            lm = steered_losses(model, hook, tokens, resid, sub * mid[:, None].float())
            up = lm > tgt
            hi, l_hi = torch.where(up, mid, hi), torch.where(up, lm, l_hi)
            lo, l_lo = torch.where(up, lo, mid), torch.where(up, l_lo, lm)
        cross = lo + (tgt - l_lo) * (hi - lo) / (l_hi - l_lo)
        truth[idx] = cross.numpy()
    errors = {"sweep": np.abs(sw_a - truth), "secant": np.abs(se_a - truth)}
    for name, sc in var_s.items():
        errors[name] = np.abs(np.array(sc) - truth)
    has = np.isfinite(truth) & np.all([np.isfinite(x) for x in errors.values()], axis=0)
    rng = np.random.default_rng(0)
    boot = rng.integers(0, int(has.sum()), (2000, int(has.sum()))) if has.any() else None

    def paired(name: str) -> dict:
        d = (errors[name] - errors["sweep"])[has]
        if boot is None:
            return {"mean": float("nan"), "ci95": [float("nan")] * 2}
        means = d[boot].mean(1)
        return {"mean": float(d.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}

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
        "evals_per_vector": {
            "sweep": float(np.mean(evals_sw)),
            "secant": float(np.mean(evals_se)),
            **{name: float(np.mean(ev)) for name, ev in var_ev.items()},
        },
        "seconds": {"sweep": t_sweep, "secant": t_secant, **var_t},
        "ratio": t_sweep / t_secant,
        "truth_tol": a.truth_tol,
        "truth": truth.tolist(),
        "truth_abs_error": {name: err[has].tolist() for name, err in errors.items()},
        "error_minus_sweep": {name: paired(name) for name in errors if name != "sweep"},
    }
    print(f"\ncalibration agreement on {n} vectors of {a.params} (loss chunks {list(tokens.shape)}, start {hint})")
    print(f"  settings: {e.calibration.model_dump()}")
    print(f"  |secant - sweep|: {_pct(diff)}")
    print(f"  |secant - sweep| / sweep: {_pct(rel)}")
    print(f"  statuses sweep->secant: {confusion}; agreement {100 * agree:.1f}% (ok and non_monotone count as one)")
    print(f"  loss evaluations on all chunks per vector: sweep {np.mean(evals_sw):.2f}, secant {np.mean(evals_se):.2f}")
    print(f"  wall: sweep {t_sweep:.1f} s, secant {t_secant:.1f} s -> {t_sweep / t_secant:.2f}x")
    print(f"  against the true crossing (bisection to {a.truth_tol:g}; {int(has.sum())} vectors):")
    for name, err in errors.items():
        ev = res["evals_per_vector"][name]
        secs = res["seconds"][name]
        line = f"    {name:<16} evals/vector {ev:.2f}, {t_sweep / secs:.2f}x the sweep; |error| {_pct(err[has])}"
        if name != "sweep":
            pe = res["error_minus_sweep"][name]
            line += f"; minus sweep's: mean {pe['mean']:+.3f} [{pe['ci95'][0]:+.3f}, {pe['ci95'][1]:+.3f}]"
        print(line)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
