"""The static decode engine against TransformerLens, side by side in one run.

A run's first ``--vectors`` vectors are the pilot block (``calibration.start: gradient`` fits its
level to them, once per worker, untimed but reported); the next ``--vectors`` are the timed block.
Each repetition times, in an order that alternates between repetitions:

- **calibration, hint / gradient**: the block's secant calibration started at the hint (one scale
  for every vector, today's default) and at each vector's gradient start;
- **raw**: TransformerLens's plain batched forward ``model(tokens [rows, total_tokens])`` (no hooks,
  no cache): what the machine gives this model at the rollouts' shape;
- **rollouts, tl / static**: ``generate_aligned`` of 01's rows (prompt, vector, sample), steered and
  capturing, with ``engine="tl"`` and ``engine="static"`` (same seeds, same uniforms, the hint's
  scales);
- **measure, tl / static**: ``measure_effects`` with each engine (rollouts, SAE encode, sums).

The effects step is calibration plus measure: **today's** (hint, tl) and the **new** one (gradient,
static), and static against tl with the same calibration. Reported: tokens/s, each ratio as the ratio
of the summed times with a 95% bootstrap interval over repetitions, the per-repetition ratios, the
rows whose tokens differ between the engines, the evaluations per vector of each calibration and how
far the gradient start's scales lie from the hint's.

    OMP_NUM_THREADS=2 python -m benchmarks.engine_speed --params params/demo.yaml --reps 5
    python -m benchmarks.engine_speed --smoke          # the tiny model and SAE, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import numpy as np
import torch

from benchmarks.output import format_ratio, write_json
from benchmarks.rollout_identity import block_rows
from benchmarks.throughput.our_path import WorkerContext, calibrate_block, gradient_context, worker_context
from benchmarks.throughput.setup import Setup, params_setup
from benchmarks.timing import Phases
from saets_utils.effects.measure import measure_effects
from saets_utils.effects.memory import rollout_rows
from saets_utils.steering.generation import generate_aligned

ENGINES = ("tl", "static")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/demo.yaml", help="run whose model, SAE and effect settings to use")
    ap.add_argument("--sae-dir", default=None, help="a trained SAE folder (as effects_throughput)")
    ap.add_argument(
        "--vectors",
        type=int,
        default=32,
        help="vectors in the pilot and the timed block (the demo's vectors_per_batch)",
    )
    ap.add_argument("--reps", type=int, default=5, help="repetitions of every timing")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default=None, help="cpu / cuda[:N] (default: the params')")
    ap.add_argument("--smoke", action="store_true", help="the tiny model and SAE, 2 repetitions (seconds)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.reps, args.vectors = min(args.reps, 2), min(args.vectors, 2)
    if args.reps < 2:
        ap.error("--reps must be at least 2 (the interval resamples repetitions)")
    return args


def ratio_with_interval(num: list[float], den: list[float], reps: int = 2000, seed: int = 0) -> dict:
    """``sum(num) / sum(den)`` over paired repetitions, with a 95% bootstrap interval that resamples
    the repetitions, and the per-repetition ratios."""
    a, b = np.asarray(num, float), np.asarray(den, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(reps, len(a)))
    boot = a[idx].sum(1) / b[idx].sum(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"ratio": float(a.sum() / b.sum()), "ci": [float(lo), float(hi)], "per_rep": (a / b).tolist()}


@torch.no_grad()
def one_rep(
    s: Setup, ids: list[int], ctx: dict[str, WorkerContext], rep: int
) -> tuple[dict[str, float], dict[str, torch.Tensor], dict]:
    """Seconds of each timed part in one repetition (the order alternates with ``rep``), the tokens
    each engine drew, and each calibration."""
    p = Phases(s.device)
    cals = {}
    for start in ctx if rep % 2 == 0 else list(ctx)[::-1]:
        with p.phase(f"calibration.{start}"):
            cals[start] = calibrate_block(s, ids, ctx[start])
    cal = cals["hint"]
    ok = torch.isfinite(cal.scales)
    if not ok.all():
        raise SystemExit(f"vectors {[ids[i] for i in (~ok).nonzero()[:, 0].tolist()]} found no scale: pick others")
    scales = cal.scales.to(s.vectors.device)
    prompts, seeds, delta = block_rows(s, ids, scales)
    total = s.spec.total_tokens
    g = torch.Generator().manual_seed(rep)
    raw_tokens = torch.randint(3, s.model.cfg.d_vocab, (len(prompts), total), generator=g).to(s.device)
    tokens: dict[str, torch.Tensor] = {}
    engines = ENGINES if rep % 2 == 0 else ENGINES[::-1]
    with p.phase("raw"):
        s.model(raw_tokens)
    for engine in engines:
        with p.phase(f"rollouts.{engine}"):
            gen = generate_aligned(
                s.model,
                prompts,
                total,
                seeds,
                sampling=s.spec.sampling,
                hook_name=s.hook,
                delta=delta.to(s.device),
                capture=True,
                engine=engine,
            )
        tokens[engine] = gen.tokens.cpu()
    for engine in engines:
        spec = dataclasses.replace(s.spec, engine=engine)
        with p.phase(f"measure.{engine}"):
            measure_effects(
                s.model,
                s.sae,
                s.hook,
                spec,
                vectors=s.vectors[ids],
                vector_ids=[int(s.vector_ids[i]) for i in ids],
                scales=scales,
                baseline_mean=torch.zeros(s.sae.cfg.d_sae),
                seed=s.seed,
                max_rows=rollout_rows(s.model, total),
            )
    return dict(p.wall), tokens, cals


def calibration_summary(cals: dict) -> dict:
    """Evaluations per vector of each start, and ``|log(scale_gradient / scale_hint)|``."""
    out: dict = {f"evaluations_per_vector.{k}": float(c.evaluations.mean()) for k, c in cals.items()}
    a, b = cals["hint"].scales.double(), cals["gradient"].scales.double()
    both = torch.isfinite(a) & torch.isfinite(b)
    d = (b[both] / a[both]).log().abs()
    out["scale_change_abs_log"] = {
        "median": float(d.median()),
        "p90": float(d.quantile(0.9)),
        "max": float(d.max()),
        "mean_signed": float((b[both] / a[both]).log().mean()),
    }
    out["same_status"] = sum(x == y for x, y in zip(cals["hint"].status, cals["gradient"].status))
    return out


def summarise(times: list[dict[str, float]], rows: int, total: int, differing: list[int]) -> dict:
    """Tokens/s and ratios of the repetitions' times."""

    def col(name: str) -> list[float]:
        return [t[name] for t in times]

    step = {e: [t["calibration.hint"] + t[f"measure.{e}"] for t in times] for e in ENGINES}
    new = [t["calibration.gradient"] + t["measure.static"] for t in times]
    tokens = rows * total
    return {
        "rows": rows,
        "total_tokens": total,
        "tokens_per_s": {
            "raw": tokens * len(times) / sum(col("raw")),
            **{f"rollouts.{e}": tokens * len(times) / sum(col(f"rollouts.{e}")) for e in ENGINES},
        },
        "seconds_mean": {k: float(np.mean(col(k))) for k in times[0]},
        # > 1: the second is faster
        "rollouts_static_over_tl": ratio_with_interval(col("rollouts.tl"), col("rollouts.static")),
        "effects_step_static_over_tl": ratio_with_interval(step["tl"], step["static"]),
        "calibration_gradient_over_hint": ratio_with_interval(col("calibration.hint"), col("calibration.gradient")),
        "effects_step_new_over_today": ratio_with_interval(step["tl"], new),
        # rollout tokens/s as a fraction of the raw forward's (raw time / rollout time)
        **{f"rollouts_{e}_fraction_of_raw": ratio_with_interval(col("raw"), col(f"rollouts.{e}")) for e in ENGINES},
        "rows_differing": differing,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = params_setup(
        params=args.params,
        vectors=2 * args.vectors,
        smoke=args.smoke,
        sae_dir=args.sae_dir,
        device=args.device,
        vectors_per_batch=args.vectors,
    )
    n = len(s.vectors) // 2
    pilot, ids = list(range(n)), list(range(n, 2 * n))
    setup = Phases(s.device)
    hint = worker_context(s, setup)
    ctx = {"hint": hint, "gradient": gradient_context(s, pilot, hint, setup)}
    one_rep(s, ids[: min(2, n)], ctx, rep=0)  # warm-up, untimed
    times, differing, cals = [], [], []
    for rep in range(args.reps):
        t, tok, cal = one_rep(s, ids, ctx, rep)
        times.append(t)
        cals.append(cal)
        differing.append(int((tok["tl"] != tok["static"]).any(-1).sum()))
        print(f"rep {rep}: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()), flush=True)
    rows = len(s.spec.prompts) * n * s.spec.samples_per_prompt
    res = {
        "benchmark": "engine_speed",
        "settings": {**s.label, "vectors": n, "reps": args.reps, "threads": torch.get_num_threads()},
        "device": s.device,
        "machine": platform.processor() or platform.machine(),
        "once_per_worker_s": dict(setup.wall),
        "calibration": calibration_summary(cals[0]),
        **summarise(times, rows, s.spec.total_tokens, differing),
    }
    for key in (
        "effects_step_new_over_today",
        "effects_step_static_over_tl",
        "calibration_gradient_over_hint",
        "rollouts_static_over_tl",
        "rollouts_tl_fraction_of_raw",
        "rollouts_static_fraction_of_raw",
    ):
        r = res[key]
        print(f"{key}: {format_ratio(r)}")
    print(f"rows differing between the engines: {differing} of {rows} per repetition")
    print("calibration:", json.dumps(res["calibration"]))
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
