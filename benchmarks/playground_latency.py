"""Playground latency: seconds from a Generate click to the first visible text, and to all text.

    python benchmarks/playground_latency.py params/demo.yaml

Needs 01 and 02 of that run (baseline and approximator). Drives ``SteeringPlayground.generate()``
as a click does: the prepared selection twice, another task's SAE-TS vector (built on the click),
and two free-text goals.
"""

import sys
import time

from saets_utils import SteeringPlayground, feature_stats, load_context, load_model_and_sae, start_run

run, device = start_run(sys.argv[1] if len(sys.argv) > 1 else "params/demo.yaml")
model, sae = load_model_and_sae(run, device)
feature_stats(run, model, sae)  # labels for the free-text goals (cached after the first run)
ctx = load_context(run, model, sae)
t = time.perf_counter()
pg = SteeringPlayground(ctx, tasks=run.eval.tasks, methods=run.eval.methods)
print(f"playground made (default vector, warm-up): {time.perf_counter() - t:.2f} s")
clicks = [
    (pg.task.value, pg.method.value, ""),
    (pg.task.value, pg.method.value, ""),
    (run.eval.tasks[-1], "SAE-TS", ""),
    ("(custom targets or text)", "SAE", "steer toward: weddings"),
    ("(custom targets or text)", "SAE-TS", "steer toward: the sea"),
]
for task, method, targets in clicks:
    pg.task.value, pg.method.value, pg.targets.value = task, method, targets
    t = time.perf_counter()
    pg.generate()
    total = time.perf_counter() - t
    first = f"{pg.first_text_s:.2f}" if pg.first_text_s is not None else "-"
    print(f"{task} / {method} {targets!r}: first text {first} s, all text {total:.1f} s {pg.error}")
