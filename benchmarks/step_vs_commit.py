"""01's effects step now against the code of an earlier commit, side by side in one run.

Each repetition runs two child processes, in an order that alternates between repetitions: one on
the repository as it is, one on ``--commit`` (``git archive`` into a temporary folder, its own
``params`` file). Each loads the params' model and SAE, computes what a worker computes once (the
secant's hint; with ``calibration.start: gradient`` the pilot block and the gradient), warms up on two
vectors, then times the effects step of the block after the pilot (vectors ``n .. 2n-1``) as
``benchmarks.throughput.our_path.our_block`` runs it: calibration, then ``measure_effects``.

Reported: the ratio of summed step times (then / now: > 1 means faster now) with a 95% bootstrap
interval over repetitions, the same for each phase, and each side's evaluations per vector.

    OMP_NUM_THREADS=2 python -m benchmarks.step_vs_commit --commit 2a98603 --reps 3 --threads 2
    python -m benchmarks.step_vs_commit --smoke --commit .   # against itself (a folder), tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.engine_speed import ratio_with_interval
from benchmarks.output import format_ratio, write_json

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("fast.calibration", "fast.measure_effects")

CHILD = r"""
import json, sys, torch
n, threads, params, smoke = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
torch.set_num_threads(threads)
import saets_utils
from benchmarks.throughput import our_path
from benchmarks.throughput.setup import params_setup
from benchmarks.throughput.work import ModelShape
from benchmarks.timing import Phases
s = params_setup(params=params, vectors=2 * n, smoke=smoke, vectors_per_batch=n)
setup = Phases(s.device)
ctx = our_path.worker_context(s, setup)
if getattr(s.calibration, "start", "hint") == "gradient":
    ctx = our_path.gradient_context(s, list(range(n)), ctx, setup)
shape = ModelShape.of(s.model, s.sae, s.hook)
ids = list(range(n, 2 * n))
our_path.our_block(s, ids[:2], ctx, Phases(s.device), shape)  # warm-up, untimed
p = Phases(s.device)
cal, _ = our_path.our_block(s, ids, ctx, p, shape)
out = {"wall": dict(p.wall), "evaluations": float(cal.evaluations.mean()), "engine": getattr(s.spec, "engine", "tl"),
       "package": saets_utils.__file__}
print("RESULT " + json.dumps(out))
"""


def run_child(tree: Path, args: argparse.Namespace) -> dict:
    """One child process on ``tree``: its timings of the block."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", CHILD, str(args.vectors), str(args.threads), args.params, "1" if args.smoke else "0"]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"the child on {tree} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT ") :])
    if not Path(res["package"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the child on {tree} imported saets_utils from {res['package']}")
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", default="HEAD", help="the earlier code: a git revision, or a folder holding it")
    ap.add_argument("--params", default="params/demo.yaml", help="each tree reads its own copy of this file")
    ap.add_argument("--vectors", type=int, default=32, help="vectors in the pilot and in the timed block")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="the tiny model and SAE, 2 repetitions of 2 vectors")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.reps, args.vectors = 2, 2
    folder = Path(args.commit).is_dir()
    if folder:
        revision = str(Path(args.commit).resolve())
    else:
        got = subprocess.run(["git", "rev-parse", args.commit], cwd=ROOT, capture_output=True, text=True, check=True)
        revision = got.stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        then = Path(args.commit).resolve() if folder else Path(tmp)
        if not folder:
            archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(then)], input=archive, check=True)
        runs: dict[str, list[dict]] = {"now": [], "then": []}
        for rep in range(args.reps):
            for side in ("now", "then") if rep % 2 == 0 else ("then", "now"):
                runs[side].append(run_child(ROOT if side == "now" else then, args))
            print(f"rep {rep}: " + ", ".join(f"{k} {json.dumps(v[-1]['wall'])}" for k, v in runs.items()), flush=True)

    def step(side: str) -> list[float]:
        return [sum(r["wall"][ph] for ph in PHASES) for r in runs[side]]

    res = {
        "benchmark": "step_vs_commit",
        "commit": revision,
        "params": args.params,
        "vectors": args.vectors,
        "reps": args.reps,
        "threads": args.threads,
        "engine": {k: v[0]["engine"] for k, v in runs.items()},
        "evaluations_per_vector": {k: v[0]["evaluations"] for k, v in runs.items()},
        "seconds": {k: {ph: [r["wall"][ph] for r in v] for ph in PHASES} for k, v in runs.items()},
        # > 1: faster now
        "effects_step_now_over_then": ratio_with_interval(step("then"), step("now")),
        **{
            f"{ph}_now_over_then": ratio_with_interval(
                [r["wall"][ph] for r in runs["then"]], [r["wall"][ph] for r in runs["now"]]
            )
            for ph in PHASES
        },
    }
    r = res["effects_step_now_over_then"]
    print(f"effects step, now over {args.commit}: {format_ratio(r)}")
    write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
