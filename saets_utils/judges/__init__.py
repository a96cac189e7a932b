"""Judges of generated text: an OpenAI-compatible LLM (:mod:`.openai_judge`) or the offline judge
(:mod:`.offline`), both on the shared machinery of :mod:`.base` and the score cache of :mod:`.cache`;
the table of judge kinds (:mod:`.kinds`) builds the one ``eval.judge.kind`` names.

Example:
    >>> judge = make_judge(cfg.eval.judge, cfg.results_dir / "eval" / "judge_cache", lm_fn, examples)
    >>> results = score_requests(judge, requests)
"""

from __future__ import annotations

from saets_utils.judges.base import (
    CriterionKind,
    Emit,
    Judge,
    JudgeFailures,
    JudgeRequest,
    JudgeResult,
    JudgeStats,
    JudgeUnavailable,
    check_failures,
    score_requests,
)
from saets_utils.judges.cache import JudgeCache
from saets_utils.judges.kinds import JUDGES, JudgeKind, get_judge_kind, make_battle_judge, make_judge, register_judge
from saets_utils.judges.offline import MiniLMEmbedder, OfflineJudge, TaskExamples, make_mean_logprob_fn
from saets_utils.judges.openai_judge import OpenAIJudge, resolve_api_key

__all__ = [
    "JUDGES",
    "CriterionKind",
    "Emit",
    "Judge",
    "JudgeCache",
    "JudgeFailures",
    "JudgeKind",
    "JudgeRequest",
    "JudgeResult",
    "JudgeStats",
    "JudgeUnavailable",
    "MiniLMEmbedder",
    "OfflineJudge",
    "OpenAIJudge",
    "TaskExamples",
    "check_failures",
    "get_judge_kind",
    "make_battle_judge",
    "make_judge",
    "make_mean_logprob_fn",
    "register_judge",
    "resolve_api_key",
    "score_requests",
]
