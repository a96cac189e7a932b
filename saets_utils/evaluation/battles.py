"""Notebook 03's battle step: texts of every pair of methods at their best scales, compared by the
battle judge (:mod:`saets_utils.judges.battle`); Bradley-Terry ratings with bootstrap CIs.

Writes ``results/<run>/eval/battles.jsonl`` (every battle and its verdict or error),
``battle_ratings.csv`` and ``battle_stats.json``; verdicts are cached in ``eval/judge_cache``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from saets_utils.config import RunConfig
from saets_utils.io_utils import atomic_write_json, atomic_write_text
from saets_utils.judges.battle import battle_criteria, bradley_terry, judge_battles, plan_battles
from saets_utils.judges.kinds import get_judge_kind, make_battle_judge
from saets_utils.steering.tasks import load_tasks

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass
class BattleReport:
    """Every battle with its verdict (``verdicts``), the methods' ``ratings`` and judge ``stats``."""

    verdicts: pd.DataFrame
    ratings: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)


def run_battles(
    run: RunConfig,
    model: HookedTransformer | None,
    samples: pd.DataFrame,
    summary: pd.DataFrame,
    *,
    progress: bool = True,
) -> BattleReport | None:
    """Judge ``eval.battle.per_pair`` battles per task and method pair, rate the methods, write the
    files (module docstring). ``model`` (the unsteered LM) is needed by the offline judge only.
    None when battles are off (``per_pair: 0``)."""
    b = run.eval.battle
    if b.per_pair == 0:
        return None
    from saets_utils.judges.reference import reference_criteria

    tasks = load_tasks(sorted(set(summary["task"])))
    judge_kw: dict[str, Any] = {}
    kind = get_judge_kind(run.eval.judge.kind)
    if kind.needs_lm:
        from saets_utils.judges.offline import make_mean_logprob_fn
        from saets_utils.models.loading import bos_id

        assert model is not None, f"the {kind.name} battle judge scores coherence with the unsteered LM: pass the model"
        judge_kw = {
            "mean_logprob_fn": make_mean_logprob_fn(model, bos_id(model, run.model)),
            "examples": {t.name: {"positive": t.positive, "negative": t.negative} for t in tasks},
        }
    out = run.paths
    judge = make_battle_judge(run.eval.judge, out.judge_cache, **judge_kw)
    reference = kind.prompted and run.eval.judge.template == "reference"
    criteria = {}
    for t in tasks:
        beh, coh = (c for _, c in reference_criteria(t.name, t.behaviour)) if reference else (t.behaviour, t.coherence)
        criteria[t.name] = battle_criteria(b.criterion, beh, coh)
    plan = plan_battles(samples, summary, b.per_pair, seed=run.seed)
    verdicts = judge_battles(judge, plan, criteria, run.eval.prompt, progress=progress)
    ratings = bradley_terry(verdicts, n_boot=b.bootstrap, seed=run.seed)
    stats = {
        "judge": judge.judge_id,
        "criterion": b.criterion,
        **judge.stats.as_dict(),
        "n_battles": len(verdicts),
        "n_errors": int(verdicts["winner"].isna().sum()),
    }
    recs = verdicts.to_dict("records")
    atomic_write_text(
        out.battles,
        "".join(
            json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}) + "\n"
            for r in recs
        ),
    )
    atomic_write_text(out.battle_ratings, ratings.to_csv(index=False))
    atomic_write_json(out.battle_stats, stats)
    return BattleReport(verdicts, ratings, stats)
