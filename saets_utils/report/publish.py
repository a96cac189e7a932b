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


def publish(run: RunConfig, *, pool_with: list[RunConfig] | None = None) -> list[Path]:
    """Copy the compact outputs of ``results/<run>/`` to ``results/published/<run>/`` (replacing an
    earlier copy); returns the copied paths. Fails if the run has no approximator metrics yet.

    ``pool_with``: runs that replicate this one's 03 (e.g. another ``eval.seed`` on the same tasks);
    their published tables are pooled with this run's into ``eval/pooled_method_differences.csv``
    (each task's value averaged over the runs, then paired differences over tasks)."""
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
    if pool_with:
        copied += _method_differences(dst, pooled=[published_dir(r) for r in pool_with])
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
    ("SAE-TS-nobias", "CAA"),
    ("SAE-TS-nobias", "prompt"),
    ("SAE-TS-nobias", "random"),
]


def _method_differences(dst: Path, *, pooled: list[Path] | None = None) -> list[Path]:
    """``eval/method_differences.csv``: paired method differences over tasks with bootstrap CIs, for
    the judge's max product and the targeting ratio and log10 target rank. With ``pooled`` (other
    published folders of the same tasks), ``eval/pooled_method_differences.csv`` from every folder's
    tables together: each task's value is averaged over the folders first."""
    import numpy as np
    import pandas as pd

    from saets_utils.evaluation.scoring import method_differences

    folders = [P(dst)] + [P(f) for f in pooled or []]
    missing = [str(f.summary) for f in folders[1:] if not f.summary.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot pool: no judge summary in {missing}; publish those runs first")
    summaries = [pd.read_csv(f.summary) for f in folders if f.summary.is_file()]
    targeting = [pd.read_csv(f.targeting) for f in folders if f.targeting.is_file()]
    frames = []
    if summaries:
        frames.append(method_differences(pd.concat(summaries), "max_product", PAIRS))
    if targeting:
        tg = pd.concat(targeting)
        tg["log10_rank"] = np.log10(tg["target_rank"])
        frames += [method_differences(tg, v, PAIRS) for v in ("ratio", "log10_rank")]
    if not frames:
        return []
    out = P(dst).pooled_method_differences if pooled else P(dst).method_differences
    df = pd.concat(frames)
    if pooled:
        df.insert(3, "runs", len(folders))
    df.to_csv(out, index=False)
    return [out]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params_file")
    ap.add_argument(
        "--pool-with",
        nargs="*",
        default=[],
        metavar="PARAMS",
        help="published runs that replicate this one's 03 (same tasks): also write their pooled differences",
    )
    a = ap.parse_args(argv)
    run = load_config(a.params_file)
    for p in publish(run, pool_with=[load_config(f) for f in a.pool_with]):
        print(p.relative_to(REPO_ROOT))


if __name__ == "__main__":
    main()
