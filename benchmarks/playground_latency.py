"""Playground latency: seconds from a Generate click to the first visible text, and to all text.

    python -m benchmarks.playground_latency params/demo.yaml
    python -m benchmarks.playground_latency --smoke     # a tiny run made in a temporary folder, seconds

Needs 01 and 02 of that run (baseline and approximator); ``--smoke`` makes them for the tiny model
(01's effects of 8 decoder rows, a ridge fit) and two toy goals. Drives ``SteeringPlayground.generate()`` as a click
does: the prepared selection twice, another task's SAE-TS vector (built on the click), and two
free-text goals.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.output import write_json
from saets_utils import SteeringPlayground, feature_stats, load_context, load_model_and_sae, start_run
from saets_utils.config import RunConfig
from saets_utils.steering.tasks import Task


def toy_tasks() -> dict[str, Task]:
    """Two goals whose examples fit the tiny model's 128-character context (the real tasks' do not)."""
    words = ("day", "cat", "song", "game", "meal", "trip", "book", "idea")
    loud = [f"Wow!!! Great {w}!!! Yes!!!" for w in words]
    calm = [f"the {w} was there, as usual." for w in words]
    kw = {"behaviour": "Is it excited?", "coherence": "Is it fluent?"}
    return {
        "shout": Task(name="shout", steering_prompt="Shout!", positive=loud, negative=calm, **kw),
        "hush": Task(name="hush", steering_prompt="Hush.", positive=calm, negative=loud, **kw),
    }


def smoke_run(folder: Path) -> tuple[RunConfig, str]:
    """The tiny run with 01 and 02 done in ``folder``: effects of its 8 decoder rows, a ridge approximator."""
    # imported here, so that ``python benchmarks/playground_latency.py RUN`` (docs/reports.md) still runs as a script
    from benchmarks.throughput.setup import SMOKE_OVERRIDES, SMOKE_PARAMS
    from saets_utils.approximator.fits import fit_ridge
    from saets_utils.effects.runner import run_effects
    from saets_utils.effects.store import load_effects

    # density max 1: the tiny SAE's features are all dense, and target discovery drops dense ones
    overrides = {**SMOKE_OVERRIDES, "results_root": str(folder), "eval": {"fgaa_density_max": 1.0}}
    run, device = start_run(SMOKE_PARAMS, overrides)
    model, sae = load_model_and_sae(run, device)
    run_effects(run, model, sae, gpus=0)
    effects = load_effects(run.results_dir)
    ok = effects.valid
    approx = fit_ridge(effects.vectors[ok], effects.effects[ok], lam=1e-2)
    approx.save(run.results_dir / "approximator.safetensors", W_dec=sae.W_dec)
    return run, device


def measure_clicks(run: RunConfig, device: str, tasks: list[str] | dict[str, Task]) -> list[dict]:
    """Five clicks on a playground over ``tasks`` (names, or goals by name) and the run's methods."""
    model, sae = load_model_and_sae(run, device)
    feature_stats(run, model, sae)  # labels for the free-text goals (cached after the first run)
    ctx = load_context(run, model, sae)
    t = time.perf_counter()
    pg = SteeringPlayground(ctx, tasks=tasks, methods=run.eval.methods)
    print(f"playground made (default vector, warm-up): {time.perf_counter() - t:.2f} s")
    clicks = [
        (pg.task.value, pg.method.value, ""),
        (pg.task.value, pg.method.value, ""),
        (list(tasks)[-1], "SAE-TS", ""),
        ("(custom targets or text)", "SAE", "steer toward: weddings"),
        ("(custom targets or text)", "SAE-TS", "steer toward: the sea"),
    ]
    out = []
    for task, method, targets in clicks:
        pg.task.value, pg.method.value, pg.targets.value = task, method, targets
        t = time.perf_counter()
        pg.generate()
        total = time.perf_counter() - t
        first = f"{pg.first_text_s:.2f}" if pg.first_text_s is not None else "-"
        print(f"{task} / {method} {targets!r}: first text {first} s, all text {total:.1f} s {pg.error}")
        out.append({"task": task, "method": method, "targets": targets, "error": pg.error})
        out[-1] |= {"first_text_s": pg.first_text_s, "all_text_s": total}
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params", nargs="?", default="params/demo.yaml", help="a run with 01 and 02 done")
    ap.add_argument("--smoke", action="store_true", help="a tiny run made in a temporary folder")
    ap.add_argument("--json", default=None, help="also write the clicks' timings to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="saets-playground-") as tmp:
            clicks = measure_clicks(*smoke_run(Path(tmp)), toy_tasks())
    else:
        run, device = start_run(args.params)
        clicks = measure_clicks(run, device, run.eval.tasks)
    write_json(args.json, clicks)
    return clicks


if __name__ == "__main__":
    main()
