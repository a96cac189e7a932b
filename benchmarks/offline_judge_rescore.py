"""Re-score a run's texts with the offline judge's behaviour score, and the hand-labelled set.

Usage: python benchmarks/offline_judge_rescore.py [results/<run>/eval/samples.jsonl]

Prints, for the labelled set (tests/data/offline_judge_labels.yaml), the Spearman correlation of
score and label per task; for a samples file (optional), the distribution of the current score
beside the score stored in the file (the judge that wrote it), overall and on unsteered (scale 0)
texts, which for most tasks should score low.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import yaml
from scipy.stats import spearmanr

from saets_utils.judges import JudgeCache, JudgeRequest, OfflineJudge, score_requests
from saets_utils.steering.tasks import load_task

ROOT = Path(__file__).resolve().parent.parent


def judge_for(names: list[str]) -> tuple[OfflineJudge, dict]:
    tasks = {t: load_task(t) for t in names}
    examples = {t: {"positive": k.positive, "negative": k.negative} for t, k in tasks.items()}
    return OfflineJudge(JudgeCache(None), examples=examples), tasks


def main(argv: list[str]) -> None:
    labels = yaml.safe_load((ROOT / "tests" / "data" / "offline_judge_labels.yaml").read_text())
    judge, tasks = judge_for(list(labels))
    for t, rows in labels.items():
        reqs = [
            JudgeRequest(t, "-", 0.0, "behaviour", tasks[t].behaviour, "I think", x, i) for i, (_, x) in enumerate(rows)
        ]
        scores = [r.score for r in score_requests(judge, reqs, progress=False)]
        rho = spearmanr([label for label, _ in rows], scores).statistic
        print(f"labelled {t}: Spearman {rho:.2f}; (label, score) {[(label, s) for (label, _), s in zip(rows, scores)]}")
    if not argv:
        return
    df = pd.read_json(argv[0], lines=True)
    judge, tasks = judge_for(sorted(df["task"].unique()))
    reqs = [
        JudgeRequest(r.task, r.method, float(r.scale), "behaviour", tasks[r.task].behaviour, r.prompt, r.text, i)
        for i, r in enumerate(df.itertuples())
    ]
    df["now"] = [r.score for r in score_requests(judge, reqs, progress=False)]
    for name, col in (("stored", "behaviour_score"), ("now", "now")):
        s, base = df[col], df.loc[df["scale"] == 0, col]
        print(
            f"{name}: {len(s)} texts, share 1 {(s == 1).mean():.3f}, share 10 {(s == 10).mean():.3f}; "
            f"scale 0: mean {base.mean():.2f}, share >= 8 {(base >= 8).mean():.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
