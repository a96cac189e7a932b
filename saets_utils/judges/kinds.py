"""The judge kinds, defined once: for each ``eval.judge.kind``, the factory of its scoring judge,
the factory of its battle judge, and the facts 03 branches on.

Everything that builds a judge or asks what kind of judge it is reads this table:
:func:`make_judge` and :func:`make_battle_judge`, the evaluation (whether to give the judge the
unsteered LM and the tasks' examples) and the scoring (whether ``eval.judge.template`` and
``eval.judge.model`` decide the scores). A kind missing here fails with the known kinds listed;
no kind falls back to another.

Adding a judge (docs/extending.md): its name in ``JudgeConfig.kind`` (``saets_utils/config.py``)
and one :func:`register_judge` call with its two factories (``tests/test_registry.py`` checks
that the two lists agree).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from saets_utils.config import JudgeConfig
from saets_utils.judges.base import Judge
from saets_utils.judges.battle import OfflineBattleJudge, OpenAIBattleJudge
from saets_utils.judges.cache import JudgeCache
from saets_utils.judges.offline import MeanLogprobFn, OfflineJudge
from saets_utils.judges.openai_judge import OpenAIJudge


class JudgeFactory(Protocol):
    """Builds a judge from ``eval.judge``, its score cache and, for a judge that needs them, the mean
    log-prob function of the unsteered LM and the tasks' examples (task -> positive/negative texts)."""

    def __call__(
        self,
        cfg: JudgeConfig,
        cache: JudgeCache,
        *,
        mean_logprob_fn: MeanLogprobFn | None,
        examples: Mapping[str, Any] | None,
    ) -> Judge: ...


@dataclass(frozen=True)
class JudgeKind:
    """One kind of judge.

    ``judge``: the factory of the judge that scores each text (behaviour, coherence); ``battle``:
    the factory of the judge that compares two texts (:mod:`saets_utils.judges.battle`).
    ``needs_lm``: scores with the unsteered LM's log-probs and the tasks' examples, so 03 passes
    ``mean_logprob_fn`` and ``examples`` (and loads the model for battles). ``prompted``: an LLM
    prompted with ``eval.judge.template``, so the template and ``eval.judge.model`` decide its scores
    (recorded with them, and required to compare with the paper); otherwise the template is unused.
    """

    name: str
    judge: JudgeFactory
    battle: JudgeFactory
    needs_lm: bool = False
    prompted: bool = False


JUDGES: dict[str, JudgeKind] = {}


def register_judge(kind: JudgeKind) -> JudgeKind:
    """Add ``kind`` to the table (one entry per name)."""
    if kind.name in JUDGES:
        raise ValueError(f"judge kind {kind.name!r} is already registered")
    JUDGES[kind.name] = kind
    return kind


def get_judge_kind(name: str) -> JudgeKind:
    """The table's entry for ``name``; ValueError naming the known kinds for any other name."""
    try:
        return JUDGES[name]
    except KeyError:
        raise ValueError(f"unknown eval.judge.kind {name!r}; use one of {sorted(JUDGES)}") from None


def make_judge(
    cfg: JudgeConfig,
    cache_dir: str | os.PathLike[str] | None,
    mean_logprob_fn: MeanLogprobFn | None = None,
    examples: Mapping[str, Any] | None = None,
) -> Judge:
    """The judge ``cfg.kind`` names, with its cache in ``cache_dir`` (None: in memory).

    ``openai``: checks the key up front (see :func:`saets_utils.judges.openai_judge.resolve_api_key`).
    ``offline``: needs ``mean_logprob_fn`` for coherence and ``examples`` (task -> positive/negative
    texts) for behaviour; see :mod:`saets_utils.judges.offline`.
    """
    kind = get_judge_kind(cfg.kind)
    return kind.judge(cfg, JudgeCache(cache_dir), mean_logprob_fn=mean_logprob_fn, examples=examples)


def make_battle_judge(
    cfg: JudgeConfig,
    cache_dir: str | os.PathLike[str] | None,
    mean_logprob_fn: MeanLogprobFn | None = None,
    examples: Mapping[str, Any] | None = None,
) -> Judge:
    """The battle judge ``cfg.kind`` names (arguments as :func:`make_judge`)."""
    kind = get_judge_kind(cfg.kind)
    return kind.battle(cfg, JudgeCache(cache_dir), mean_logprob_fn=mean_logprob_fn, examples=examples)


def _openai(
    cfg: JudgeConfig, cache: JudgeCache, *, mean_logprob_fn: MeanLogprobFn | None, examples: Mapping[str, Any] | None
) -> Judge:
    return OpenAIJudge(cfg, cache)  # resolves (or refuses) the key before any work


def _openai_battle(
    cfg: JudgeConfig, cache: JudgeCache, *, mean_logprob_fn: MeanLogprobFn | None, examples: Mapping[str, Any] | None
) -> Judge:
    return OpenAIBattleJudge(cfg, cache)


def _offline(
    cfg: JudgeConfig, cache: JudgeCache, *, mean_logprob_fn: MeanLogprobFn | None, examples: Mapping[str, Any] | None
) -> OfflineJudge:
    return OfflineJudge(cache, examples=examples, mean_logprob_fn=mean_logprob_fn)


def _offline_battle(
    cfg: JudgeConfig, cache: JudgeCache, *, mean_logprob_fn: MeanLogprobFn | None, examples: Mapping[str, Any] | None
) -> Judge:
    return OfflineBattleJudge(_offline(cfg, cache, mean_logprob_fn=mean_logprob_fn, examples=examples))


register_judge(JudgeKind("openai", judge=_openai, battle=_openai_battle, prompted=True))
register_judge(JudgeKind("offline", judge=_offline, battle=_offline_battle, needs_lm=True))
