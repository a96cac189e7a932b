"""Judges of generated text: an OpenAI-compatible LLM (:mod:`.openai_judge`) or the offline judge
(:mod:`.offline`), both on the shared machinery of :mod:`.base` and the score cache of :mod:`.cache`.

Example:
    >>> judge = make_judge(cfg.eval.judge, cfg.results_dir / "eval" / "judge_cache", lm_fn, examples)
    >>> results = score_requests(judge, requests)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from saets_utils.config import JudgeConfig
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
from saets_utils.judges.offline import MiniLMEmbedder, OfflineJudge, TaskExamples, make_mean_logprob_fn
from saets_utils.judges.openai_judge import OpenAIJudge, resolve_api_key

__all__ = [
    "CriterionKind",
    "Emit",
    "Judge",
    "JudgeCache",
    "JudgeFailures",
    "JudgeRequest",
    "JudgeResult",
    "JudgeStats",
    "JudgeUnavailable",
    "MiniLMEmbedder",
    "OfflineJudge",
    "OpenAIJudge",
    "TaskExamples",
    "check_failures",
    "make_judge",
    "make_mean_logprob_fn",
    "resolve_api_key",
    "score_requests",
]


def make_judge(
    cfg: JudgeConfig,
    cache_dir: str | os.PathLike[str] | None,
    mean_logprob_fn: Callable[[list[str]], list[float]] | None = None,
    examples: Mapping[str, Any] | None = None,
) -> Judge:
    """The judge ``cfg`` names, with its cache in ``cache_dir`` (None: in memory).

    ``openai``: checks the key up front (see :func:`resolve_api_key`). ``offline``: needs
    ``mean_logprob_fn`` for coherence and ``examples`` (task -> positive/negative texts) for
    behaviour; see :mod:`saets_utils.judges.offline`.
    """
    if cfg.kind == "openai":
        return OpenAIJudge(cfg, JudgeCache(cache_dir))  # resolves (or refuses) the key before any work
    return OfflineJudge(JudgeCache(cache_dir), examples=examples, mean_logprob_fn=mean_logprob_fn)
