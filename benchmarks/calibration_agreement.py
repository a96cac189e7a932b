"""Does the secant scale search find the reference sweep's scales, at what cost?

On a run's measured vectors (its 01 plan: vectors, loss chunks), side by side in one run, block by
block:

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

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m benchmarks.calibration_agreement \
        --params params/demo.yaml --json results/demo/calibration_agreement.json
    python -m benchmarks.calibration_agreement --smoke --variant 0.2:2    # the tiny model, no plan needed
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from benchmarks.output import write_json
from saets_utils.config import CalibrationConfig, LossTarget, load_config
from saets_utils.effects.calibration import (
    calibrate_scales,
    calibrate_scales_secant,
    loss_target_value,
    resid_at_hook,
    scale_hint,
    steered_losses,
)


@dataclass
class Inputs:
    """The vectors ``[n, d_model]`` to calibrate, the loss chunks ``tokens [c, seq]`` and the settings."""

    model: Any
    hook: str
    tokens: torch.Tensor
    vectors: torch.Tensor
    grid: list[float]
    target: LossTarget
    calibration: CalibrationConfig
    block: int
    label: str


def plan_inputs(params: str, vectors: int, rtol: float | None) -> Inputs:
    """The first ``vectors`` vectors of the run's 01 plan, on the CPU."""
    from saets_utils.effects.plan import Plan, work_dir
    from saets_utils.models.loading import load_model

    run = load_config(params)
    plan_path = work_dir(run) / "plan.safetensors"
    if not plan_path.is_file():
        raise SystemExit(f"{plan_path} not found: run notebook 01 on {params} first (it writes the plan)")
    plan = Plan.load(plan_path)
    e = run.effects
    cal = e.calibration if rtol is None else e.calibration.model_copy(update={"rtol": rtol})
    return Inputs(
        model=load_model(run.model, "cpu"),
        hook=run.sae.hook_name,
        tokens=plan.loss_tokens,
        vectors=plan.vectors[:vectors].float(),
        grid=e.scale_grid.values(),
        target=e.loss_target,
        calibration=cal,
        block=e.vectors_per_batch,
        label=params,
    )


def smoke_inputs(rtol: float | None) -> Inputs:
    """The tiny run's 8 decoder rows (``benchmarks.throughput.setup``), no plan needed."""
    from benchmarks.throughput.setup import params_setup

    s = params_setup(params="", vectors=8, smoke=True)
    cal = s.calibration if rtol is None else s.calibration.model_copy(update={"rtol": rtol})
    return Inputs(s.model, s.hook, s.loss_tokens, s.vectors, s.grid, s.target, cal, s.vectors_per_batch, "--smoke")


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


@dataclass
class Searched:
    """One search's scales, statuses, evaluations per vector and seconds over all blocks."""

    scales: list[float]
    status: list[str]
    evals: list[float]
    seconds: float = 0.0

    def add(self, cal, seconds: float) -> None:
        assert cal.evaluations is not None
        self.scales += cal.scales.tolist()
        self.status += cal.status
        self.evals += cal.evaluations.tolist()
        self.seconds += seconds


@torch.no_grad()
def search_all(inp: Inputs, resid: torch.Tensor, l0: float, hint, variants: list) -> tuple[dict, torch.Tensor]:
    """Every search on every block of ``inp.block`` vectors, side by side; and the sweep's losses."""
    common = {"model": inp.model, "hook_name": inp.hook, "tokens": inp.tokens, "resid": resid}
    common |= {"grid": inp.grid, "target": inp.target, "unsteered_loss": l0}
    c = inp.calibration
    settings = {"secant": (c.rtol, c.max_evals, c.coarse_chunks), **{_vname(*v): v for v in variants}}
    out = {name: Searched([], [], []) for name in ("sweep", *settings)}
    sweep_losses = []
    for lo in range(0, inp.vectors.shape[0], inp.block):
        blk = inp.vectors[lo : lo + inp.block]
        t0 = time.perf_counter()
        sw = calibrate_scales(vectors=blk, **common)
        out["sweep"].add(sw, time.perf_counter() - t0)
        sweep_losses.append(sw.losses)
        line = f"  vectors {lo}..{lo + len(blk) - 1}: sweep {time.perf_counter() - t0:.1f} s"
        for name, (rtol, max_evals, coarse) in settings.items():
            t0 = time.perf_counter()
            se = calibrate_scales_secant(
                vectors=blk, start=hint, coarse_chunks=coarse, rtol=rtol, max_evals=max_evals, **common
            )
            out[name].add(se, time.perf_counter() - t0)
            if name == "secant":
                line += f", secant {time.perf_counter() - t0:.1f} s"
        print(line, flush=True)
    return out, torch.cat(sweep_losses)


@torch.no_grad()
def true_crossings(
    inp: Inputs, resid, sweep: Searched, sweep_losses: torch.Tensor, l0: float, tol: float
) -> np.ndarray:
    """The crossing of every vector the sweep finds crossing, by bisection inside the sweep's
    bracketing grid interval to ``tol`` scale units (all vectors at once); NaN for the others."""
    tgt = loss_target_value(inp.target, l0)
    g = sorted(float(x) for x in inp.grid)
    idx = [i for i, st in enumerate(sweep.status) if st in ("ok", "non_monotone")]
    truth = np.full(inp.vectors.shape[0], np.nan)
    if not idx:
        return truth
    first_above = [int(torch.isfinite(sweep_losses[i]).sum()) - 1 for i in idx]  # the sweep stops there
    hi = torch.tensor([g[j] for j in first_above], dtype=torch.float64)
    lo = hi - (g[1] - g[0])
    l_lo = torch.tensor([float(sweep_losses[i][j - 1]) for i, j in zip(idx, first_above)])
    l_hi = torch.tensor([float(sweep_losses[i][j]) for i, j in zip(idx, first_above)])
    sub = inp.vectors[idx]
    while float((hi - lo).max()) > tol:
        mid = (lo + hi) / 2
        lm = steered_losses(inp.model, inp.hook, inp.tokens, resid, sub * mid[:, None].float())
        up = lm > tgt
        hi, l_hi = torch.where(up, mid, hi), torch.where(up, lm, l_hi)
        lo, l_lo = torch.where(up, lo, mid), torch.where(up, l_lo, lm)
    truth[idx] = (lo + (tgt - l_lo) * (hi - lo) / (l_hi - l_lo)).numpy()
    return truth


def compare(inp: Inputs, found: dict[str, Searched], truth: np.ndarray) -> dict:
    """Agreement of the secant with the sweep, and every search's error against the true crossing."""
    sweep, secant = found["sweep"], found["secant"]
    sw_a, se_a = np.array(sweep.scales), np.array(secant.scales)
    both = np.isfinite(sw_a) & np.isfinite(se_a)
    diff = np.abs(se_a - sw_a)[both]
    statuses = sorted(set(sweep.status) | set(secant.status))
    pairs = list(zip(sweep.status, secant.status))
    confusion = {f"{x}->{y}": sum(1 for p in pairs if p == (x, y)) for x in statuses for y in statuses}
    errors = {name: np.abs(np.array(f.scales) - truth) for name, f in found.items()}
    has = np.isfinite(truth) & np.all([np.isfinite(x) for x in errors.values()], axis=0)
    rng = np.random.default_rng(0)
    boot = rng.integers(0, int(has.sum()), (2000, int(has.sum()))) if has.any() else None

    def paired(name: str) -> dict:
        d = (errors[name] - errors["sweep"])[has]
        if boot is None:
            return {"mean": float("nan"), "ci95": [float("nan")] * 2}
        means = d[boot].mean(1)
        return {"mean": float(d.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}

    return {
        "params": inp.label,
        "vectors": inp.vectors.shape[0],
        "calibration": inp.calibration.model_dump(),
        "loss_chunks": list(inp.tokens.shape),
        "abs_diff": diff.tolist(),
        "rel_diff": (diff / np.maximum(sw_a[both], 1e-9)).tolist(),
        "status_confusion": {key: n for key, n in confusion.items() if n},
        "status_agreement": float(np.mean([p == q or {p, q} <= {"ok", "non_monotone"} for p, q in pairs])),
        "evals_per_vector": {name: float(np.mean(f.evals)) for name, f in found.items()},
        "seconds": {name: f.seconds for name, f in found.items()},
        "ratio": sweep.seconds / secant.seconds,
        "truth": truth.tolist(),
        "truth_abs_error": {name: err[has].tolist() for name, err in errors.items()},
        "error_minus_sweep": {name: paired(name) for name in errors if name != "sweep"},
    }


def print_summary(res: dict, hint) -> None:
    diff, rel = np.array(res["abs_diff"]), np.array(res["rel_diff"])
    ev, secs = res["evals_per_vector"], res["seconds"]
    print(
        f"\ncalibration agreement on {res['vectors']} vectors of {res['params']} (loss chunks {res['loss_chunks']}, start {hint})"
    )
    print(f"  settings: {res['calibration']}")
    print(f"  |secant - sweep|: {_pct(diff)}")
    print(f"  |secant - sweep| / sweep: {_pct(rel)}")
    print(
        f"  statuses sweep->secant: {res['status_confusion']}; agreement {100 * res['status_agreement']:.1f}% "
        "(ok and non_monotone count as one)"
    )
    print(f"  loss evaluations on all chunks per vector: sweep {ev['sweep']:.2f}, secant {ev['secant']:.2f}")
    print(f"  wall: sweep {secs['sweep']:.1f} s, secant {secs['secant']:.1f} s -> {res['ratio']:.2f}x")
    n = len(res["truth_abs_error"]["sweep"])
    print(f"  against the true crossing (bisection to {res['truth_tol']:g}; {n} vectors):")
    for name, err in res["truth_abs_error"].items():
        line = f"    {name:<16} evals/vector {ev[name]:.2f}, {secs['sweep'] / secs[name]:.2f}x the sweep; |error| {_pct(np.array(err))}"
        if name != "sweep":
            pe = res["error_minus_sweep"][name]
            line += f"; minus sweep's: mean {pe['mean']:+.3f} [{pe['ci95'][0]:+.3f}, {pe['ci95'][1]:+.3f}]"
        print(line)


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
    ap.add_argument("--smoke", action="store_true", help="the tiny model's 8 decoder rows instead of a run's plan")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    inp = smoke_inputs(a.rtol) if a.smoke else plan_inputs(a.params, a.vectors, a.rtol)
    resid = resid_at_hook(inp.model, inp.hook, inp.tokens)
    l0 = float(steered_losses(inp.model, inp.hook, inp.tokens, resid, torch.zeros(1, inp.model.cfg.d_model))[0])
    hint = scale_hint(
        model=inp.model,
        hook_name=inp.hook,
        tokens=inp.tokens,
        resid=resid,
        vectors=inp.vectors[:4],
        grid=inp.grid,
        target=inp.target,
        unsteered_loss=l0,
    )
    variants = [_parse_variant(v, inp.calibration.coarse_chunks) for v in a.variant]
    found, sweep_losses = search_all(inp, resid, l0, hint, variants)
    if a.truth_from:
        truth = np.array(json.loads(Path(a.truth_from).read_text())["truth"][: inp.vectors.shape[0]], dtype=float)
    else:
        truth = true_crossings(inp, resid, found["sweep"], sweep_losses, l0, a.truth_tol)
    res = {**compare(inp, found, truth), "start": None if hint is None else vars(hint), "truth_tol": a.truth_tol}
    print_summary(res, hint)
    write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
