"""Copy a finished run's compact outputs into the tracked ``results/published/<run>/`` folder.

What a README may cite: metrics (JSON), tables (CSV), figures (PNG) and the HTML reports; never raw
effects or generations. ``python -m saets_utils.report.publish params/<run>.yaml`` after the pipeline and the
design study have run; the copy lists every file with its size in ``MANIFEST.txt``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from saets_utils.config import REPO_ROOT, RunConfig, load_config
from saets_utils.paths import RunPaths as P

# Compact outputs, relative to results/<run>/ (globs). Raw effects, samples and caches stay out.
COMPACT = (
    P.manifest.rel,
    P.effects_meta.rel,
    P.effects_table.rel,
    P.approximator_metrics.rel,
    P.approximator_history.rel,
    f"{P.study_dir.rel}/*.json",
    f"{P.study_dir.rel}/*.csv",
    f"{P.study_dir.rel}/*.png",
    P.summary.rel,
    P.by_scale.rel,
    P.targeting.rel,
    P.targeting_summary.rel,
    P.targeting_differences.rel,
    P.targets.rel,
    P.judge_stats.rel,
    f"{P.figures_dir.rel}/*.png",
    f"{P.reports_dir.rel}/*.html",
)
MAX_BYTES = 2_000_000  # per file: anything larger is not compact


def published_dir(run: RunConfig) -> Path:
    return REPO_ROOT / "results" / "published" / run.name


def publish(run: RunConfig) -> list[Path]:
    """Copy the compact outputs of ``results/<run>/`` to ``results/published/<run>/`` (replacing an
    earlier copy); returns the copied paths. Fails if the run has no approximator metrics yet."""
    src = run.results_dir
    if not run.paths.approximator_metrics.is_file():
        raise FileNotFoundError(f"{src} has no {P.approximator_metrics.rel}; run the pipeline on {run.name} first")
    dst = published_dir(run)
    if dst.exists():
        shutil.rmtree(dst)
    copied = []
    for pattern in COMPACT:
        for p in sorted(src.glob(pattern)):
            if p.is_file() and p.stat().st_size <= MAX_BYTES:
                out = dst / p.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, out)
                copied.append(out)
    copied += _method_differences(dst)
    lines = [f"{p.relative_to(dst)}\t{p.stat().st_size}" for p in copied]
    P(dst).published_list.write_text(
        f"compact outputs of results/{run.name}/ (file, bytes)\n" + "\n".join(lines) + "\n"
    )
    return copied


PAIRS = [
    ("SAE-TS", "SAE"),
    ("SAE-TS", "CAA"),
    ("SAE", "CAA"),
    ("SAE-TS", "pinverse"),
    ("SAE-TS", "rotation"),
    ("SAE-TS", "FGAA"),
    ("CAA", "prompt"),
    ("SAE-TS", "random"),
    ("SAE", "random"),
    ("CAA", "random"),
    ("SAE-TS-nobias", "SAE"),
    ("SAE-TS-nobias", "random"),
]


def _method_differences(dst: Path) -> list[Path]:
    """``eval/method_differences.csv``: paired method differences over tasks with bootstrap CIs, for
    the judge's max product and the targeting ratio and log10 target rank."""
    import numpy as np
    import pandas as pd

    from saets_utils.evaluation.scoring import method_differences

    d = P(dst)
    frames = []
    if d.summary.is_file():
        frames.append(method_differences(pd.read_csv(d.summary), "max_product", PAIRS))
    if d.targeting.is_file():
        tg = pd.read_csv(d.targeting)
        tg["log10_rank"] = np.log10(tg["target_rank"])
        frames += [method_differences(tg, v, PAIRS) for v in ("ratio", "log10_rank")]
    if not frames:
        return []
    out = d.method_differences
    pd.concat(frames).to_csv(out, index=False)
    return [out]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params_file")
    a = ap.parse_args(argv)
    run = load_config(a.params_file)
    for p in publish(run):
        print(p.relative_to(REPO_ROOT))


if __name__ == "__main__":
    main()
