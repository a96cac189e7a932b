"""The static decode engine against TransformerLens, side by side in one run.

For the first ``--vectors`` vectors of a params file's run, calibrated once as 01 calibrates them,
each repetition times, in an order that alternates between repetitions:

- **raw**: TransformerLens's plain batched forward ``model(tokens [rows, total_tokens])`` (no hooks,
  no cache): what the machine gives this model at the rollouts' shape;
- **rollouts, tl / static**: ``generate_aligned`` of 01's rows (prompt, vector, sample), steered and
  capturing, with ``engine="tl"`` and ``engine="static"`` (same seeds, same uniforms);
- **effects step, tl / static**: the whole step of a block: calibration plus ``measure_effects``
  with each engine (the calibration does not depend on the engine: timed once per repetition and
  added to both).

Reported: tokens/s of each, the ratios static/tl (rollouts and the effects step) and rollouts/raw for
each engine, each as the ratio of the summed times with a 95% bootstrap interval over repetitions,
and the per-repetition ratios; the rows whose tokens differ between the engines.

    OMP_NUM_THREADS=2 python -m benchmarks.engine_speed --params params/demo.yaml --reps 5
    python -m benchmarks.engine_speed --smoke          # the tiny model and SAE, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path

import numpy as np
import torch

from benchmarks.rollout_identity import block_rows
from benchmarks.throughput.our_path import calibrate_block, worker_context
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
    ap.add_argument("--vectors", type=int, default=32, help="vectors in the block (the demo's vectors_per_batch)")
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
def one_rep(s: Setup, ids: list[int], ctx, rep: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Seconds of each timed part in one repetition (the order alternates with ``rep``), and the
    tokens each engine drew."""
    p = Phases(s.device)
    with p.phase("calibration"):
        cal = calibrate_block(s, ids, ctx)
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
    return dict(p.wall), tokens


def summarise(times: list[dict[str, float]], rows: int, total: int, differing: list[int]) -> dict:
    """Tokens/s and ratios of the repetitions' times."""

    def col(name: str) -> list[float]:
        return [t[name] for t in times]

    step = {e: [t["calibration"] + t[f"measure.{e}"] for t in times] for e in ENGINES}
    tokens = rows * total
    return {
        "rows": rows,
        "total_tokens": total,
        "tokens_per_s": {
            "raw": tokens * len(times) / sum(col("raw")),
            **{f"rollouts.{e}": tokens * len(times) / sum(col(f"rollouts.{e}")) for e in ENGINES},
        },
        "seconds_mean": {k: float(np.mean(col(k))) for k in times[0]},
        # > 1: static is faster
        "rollouts_static_over_tl": ratio_with_interval(col("rollouts.tl"), col("rollouts.static")),
        "effects_step_static_over_tl": ratio_with_interval(step["tl"], step["static"]),
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
        vectors=args.vectors,
        smoke=args.smoke,
        sae_dir=args.sae_dir,
        device=args.device,
        vectors_per_batch=args.vectors,
    )
    n = len(s.vectors)
    ids = list(range(n))
    ctx = worker_context(s, Phases(s.device))
    one_rep(s, ids[: min(2, n)], ctx, rep=0)  # warm-up, untimed
    times, differing = [], []
    for rep in range(args.reps):
        t, tok = one_rep(s, ids, ctx, rep)
        times.append(t)
        differing.append(int((tok["tl"] != tok["static"]).any(-1).sum()))
        print(f"rep {rep}: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()), flush=True)
    rows = len(s.spec.prompts) * n * s.spec.samples_per_prompt
    res = {
        "benchmark": "engine_speed",
        "settings": {**s.label, "vectors": n, "reps": args.reps, "threads": torch.get_num_threads()},
        "device": s.device,
        "machine": platform.processor() or platform.machine(),
        **summarise(times, rows, s.spec.total_tokens, differing),
    }
    for key in ("rollouts_static_over_tl", "effects_step_static_over_tl", "rollouts_tl_fraction_of_raw"):
        r = res[key]
        print(f"{key}: {r['ratio']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
    r = res["rollouts_static_fraction_of_raw"]
    print(f"rollouts_static_fraction_of_raw: {r['ratio']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
    print(f"rows differing between the engines: {differing} of {rows} per repetition")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
