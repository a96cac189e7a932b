"""Re-score a run's texts with the offline judge's behaviour score, and the hand-labelled set.

    python -m benchmarks.offline_judge_rescore [results/<run>/eval/samples.jsonl]
    python -m benchmarks.offline_judge_rescore --smoke    # the labelled set, then its texts as a samples file

Prints, for the labelled set (tests/data/offline_judge_labels.yaml), the Spearman correlation of
score and label per task; for a samples file (optional), the distribution of the current score
beside the score stored in the file (the judge that wrote it), overall and on unsteered (scale 0)
texts, which for most tasks should score low.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from scipy.stats import spearmanr

from benchmarks.output import write_json
from saets_utils.judges import JudgeCache, JudgeRequest, OfflineJudge, score_requests
from saets_utils.steering.tasks import load_task

LABELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "offline_judge_labels.yaml"


def judge_for(names: list[str]) -> tuple[OfflineJudge, dict]:
    tasks = {t: load_task(t) for t in names}
    examples = {t: {"positive": k.positive, "negative": k.negative} for t, k in tasks.items()}
    return OfflineJudge(JudgeCache(None), examples=examples), tasks


def rescore_labelled(labels: dict) -> dict[str, float]:
    """Spearman correlation of the offline judge's score with the hand label, per task."""
    judge, tasks = judge_for(list(labels))
    out = {}
    for t, rows in labels.items():
        reqs = [
            JudgeRequest(t, "-", 0.0, "behaviour", tasks[t].behaviour, "I think", x, i) for i, (_, x) in enumerate(rows)
        ]
        scores = [r.score for r in score_requests(judge, reqs, progress=False)]
        out[t] = float(spearmanr([label for label, _ in rows], scores).statistic)
        print(f"labelled {t}: Spearman {out[t]:.2f}; (label, score) {[(lb, s) for (lb, _), s in zip(rows, scores)]}")
    return out


def rescore_samples(path: str | Path) -> dict[str, dict[str, float]]:
    """The stored and the current behaviour scores of a samples file: share of 1s and 10s, and on
    unsteered texts the mean and the share of 8 or more."""
    df = pd.read_json(path, lines=True)
    judge, tasks = judge_for(sorted(df["task"].unique()))
    reqs = [
        JudgeRequest(r.task, r.method, float(r.scale), "behaviour", tasks[r.task].behaviour, r.prompt, r.text, i)
        for i, r in enumerate(df.itertuples())
    ]
    df["now"] = [r.score for r in score_requests(judge, reqs, progress=False)]
    out = {}
    for name, col in (("stored", "behaviour_score"), ("now", "now")):
        s, base = df[col], df.loc[df["scale"] == 0, col]
        out[name] = {
            "texts": len(s),
            "share_1": float((s == 1).mean()),
            "share_10": float((s == 10).mean()),
            "scale0_mean": float(base.mean()),
            "scale0_share_ge_8": float((base >= 8).mean()),
        }
        o = out[name]
        print(
            f"{name}: {o['texts']} texts, share 1 {o['share_1']:.3f}, share 10 {o['share_10']:.3f}; "
            f"scale 0: mean {o['scale0_mean']:.2f}, share >= 8 {o['scale0_share_ge_8']:.3f}"
        )
    return out


def labelled_as_samples(labels: dict, path: Path) -> None:
    """The labelled texts as a samples file: the label as the stored score, labels up to 2 at scale 0."""
    rows = [
        {"task": t, "method": "-", "scale": 0.0 if label <= 2 else 1.0, "prompt": "I think", "text": text}
        | {"behaviour_score": label}
        for t, items in labels.items()
        for label, text in items
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", nargs="?", default=None, help="a run's eval/samples.jsonl")
    ap.add_argument("--smoke", action="store_true", help="also score the labelled texts as a samples file")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    labels = yaml.safe_load(LABELS.read_text())
    out: dict = {"labelled_spearman": rescore_labelled(labels)}
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            labelled_as_samples(labels, Path(tmp) / "samples.jsonl")
            out["samples"] = rescore_samples(Path(tmp) / "samples.jsonl")
    elif args.samples:
        out["samples"] = rescore_samples(args.samples)
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
