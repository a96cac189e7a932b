"""Benchmarks of the saets package, run from the repository root as modules:

    python -m benchmarks.effects_throughput --smoke        # 01's effects step: the reference loop vs ours
    python -m benchmarks.calibration_agreement --smoke     # the secant scale search against the sweep
    python -m benchmarks.rollout_identity --smoke          # 01's rollouts, new decoding against old
    python -m benchmarks.ratio_interval RUN.json ...       # speed ratios pooled over runs, with intervals
    python -m benchmarks.ridge_cv --smoke                  # ridge_lambda: cv at the paper's size
    python -m benchmarks.playground_latency --smoke        # the playground's Generate click
    python -m benchmarks.offline_judge_rescore             # the offline judge on the labelled set

Each ``--smoke`` runs on the tiny model and SAE (``saets_utils.models.tiny``) in seconds; the tests
in ``tests/test_benchmarks.py`` run them. benchmarks/README.md has the full commands and the
measured numbers.
"""
