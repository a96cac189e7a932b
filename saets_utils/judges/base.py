"""Score generated texts for a task's behavioural criterion and for coherence (integers 1-10,
normalised ``(s - 1) / 9``): the request and result types, the :class:`Judge` every judge builds on
(cache look-up, de-duplication, one result per request, stats) and the sync entry point.

Every request gets exactly one :class:`JudgeResult`, in order: a score, or an explicit error
(never a 0, never dropped). Scores are cached on disk (:class:`JudgeCache`); errors are not,
so the next run retries them. ``score_requests`` is the one sync entry point for notebooks.

Example:
    >>> judge = make_judge(cfg.eval.judge, cfg.results_dir / "eval" / "judge_cache", lm_fn, examples)
    >>> results = score_requests(judge, requests)
    >>> print(judge.stats)
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from saets_utils.judges.cache import JudgeCache, cache_key
from saets_utils.judges.prompts import PROMPT_TEMPLATE_VERSION

CriterionKind = Literal["behaviour", "coherence"]


@dataclass(frozen=True)
class JudgeRequest:
    """One text to score on one criterion. ``sample`` (index) or ``key`` (any JSON-able dict)
    lets the caller join results back to its samples; neither enters the cache key."""

    task: str
    method: str
    scale: float
    criterion_kind: CriterionKind
    criterion: str
    prompt: str
    text: str
    sample: int | None = None
    key: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.criterion_kind not in ("behaviour", "coherence"):
            raise ValueError(f"criterion_kind must be 'behaviour' or 'coherence', not {self.criterion_kind!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["key"] = dict(self.key) if self.key is not None else None
        return d


@dataclass(frozen=True)
class JudgeResult:
    """Outcome of one request: ``score`` in 1..10 and ``normalised`` in [0, 1], or ``error``
    ("<kind>: <message>") with both None. Token counts are those of the call that produced the
    score (also when it is now served from the cache, ``cached=True``)."""

    score: int | None
    normalised: float | None
    error: str | None
    judge: str
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    reply: str | None = None

    @property
    def ok(self) -> bool:
        return self.score is not None

    @classmethod
    def scored(cls, score: int, judge: str, **kw: Any) -> JudgeResult:
        return cls(score=score, normalised=(score - 1) / 9, error=None, judge=judge, **kw)

    @classmethod
    def failed(cls, error: str, judge: str, **kw: Any) -> JudgeResult:
        return cls(score=None, normalised=None, error=error, judge=judge, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# USD per million (input, output) tokens at OpenAI list prices; other models: cost None.
PRICES_PER_M: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
}


def estimate_cost(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """Estimated USD for the tokens at ``PRICES_PER_M`` (dated snapshots such as
    ``gpt-4o-mini-2024-07-18`` use their base name); None for an unknown model."""
    price = PRICES_PER_M.get(model) or next(
        (p for name, p in sorted(PRICES_PER_M.items(), key=lambda kv: -len(kv[0])) if model.startswith(name + "-20")),
        None,
    )
    if price is None:
        return None
    return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6


@dataclass
class JudgeStats:
    """Running tallies of one judge across calls: requests seen, cache hits, calls made (HTTP
    attempts or offline computations), retries and final errors by kind, tokens and cost."""

    model: str = ""
    requests: int = 0
    cache_hits: int = 0
    calls: int = 0
    scored: int = 0
    retries: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def cost_usd(self) -> float | None:
        return estimate_cost(self.model, self.prompt_tokens, self.completion_tokens)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(retries=dict(self.retries), errors=dict(self.errors), cost_usd=self.cost_usd)
        return d

    def __str__(self) -> str:
        cost = "n/a" if self.cost_usd is None else f"${self.cost_usd:.4f}"
        return (
            f"{self.requests} requests: {self.scored} scored, {sum(self.errors.values())} errors "
            f"{dict(self.errors) or ''}, {self.cache_hits} from cache, {self.calls} calls, "
            f"retries {dict(self.retries) or 0}, tokens {self.prompt_tokens}+{self.completion_tokens}, cost {cost}"
        )


Emit = Callable[[int, JudgeResult], None]


class JudgeUnavailable(RuntimeError):
    """The judge stopped early (circuit breaker): many consecutive calls failed the same way.
    Scores received before it stopped are cached; a re-run asks only the others."""


class JudgeFailures(RuntimeError):
    """More judgements failed than ``eval.judge.max_failed_share`` allows; the message names the
    error kinds and their counts."""


def error_kinds(results: Sequence[JudgeResult]) -> Counter:
    """Failed results counted by error kind (the text before the first colon)."""
    return Counter((r.error or "unknown").split(":", 1)[0] for r in results if not r.ok)


def check_failures(results: Sequence[JudgeResult], max_failed_share: float) -> None:
    """Raise :class:`JudgeFailures` when the share of failed results exceeds ``max_failed_share``."""
    kinds = error_kinds(results)
    n_failed, n = sum(kinds.values()), len(results)
    if n and n_failed / n > max_failed_share:
        first = next(r.error for r in results if not r.ok)
        raise JudgeFailures(
            f"{n_failed} of {n} judgements failed ({n_failed / n:.1%} > eval.judge.max_failed_share "
            f"{max_failed_share:.1%}); by kind: {dict(kinds.most_common())}; first error: {first}. "
            "Fix the cause and re-run 03: scored texts come from the cache, only the failed ones are asked again."
        )


class Judge(ABC):
    """Shared machinery: cache look-up, de-duplication of identical requests, one result per
    request in order, stats. Subclasses implement :meth:`_score_uncached`."""

    kind: str = ""
    model: str = ""

    def __init__(self, cache: JudgeCache) -> None:
        self.cache = cache
        self.stats = JudgeStats(model=self.model)

    @property
    def judge_id(self) -> str:
        return f"{self.kind}:{self.model}"

    def _cache_extra(self, req: JudgeRequest) -> str:
        return ""

    def cache_key(self, req: JudgeRequest) -> str:
        """sha256 of what decides this request's score under this judge."""
        return cache_key(
            judge_kind=self.kind,
            model=self.model,
            template_version=PROMPT_TEMPLATE_VERSION,
            criterion_kind=req.criterion_kind,
            criterion=req.criterion,
            prompt=req.prompt,
            text=req.text,
            extra=self._cache_extra(req),
        )

    def _check(self, requests: Sequence[JudgeRequest]) -> None:  # noqa: B027 - optional hook, no-op by default
        """Raise before any work if these requests cannot be scored by this judge."""

    @abstractmethod
    async def _score_uncached(self, requests: Sequence[JudgeRequest], emit: Emit) -> None:
        """Score each request, calling ``emit(i, result)`` exactly once per index as soon as
        its result is known."""

    async def ascore(
        self, requests: Sequence[JudgeRequest], on_done: Callable[[int], None] | None = None
    ) -> list[JudgeResult]:
        """Scores for ``requests`` (one per request, in order); ``on_done(k)`` reports progress."""
        requests = list(requests)
        self._check(requests)
        done = on_done or (lambda k: None)
        results: list[JudgeResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = self.cache_key(req)
            rec = self.cache.get(key)
            if rec is not None:
                results[i] = JudgeResult.scored(
                    rec["score"],
                    self.judge_id,
                    cached=True,
                    prompt_tokens=rec.get("prompt_tokens", 0),
                    completion_tokens=rec.get("completion_tokens", 0),
                    reply=rec.get("reply"),
                )
                self.stats.cache_hits += 1
                done(1)
            else:
                groups.setdefault(key, []).append(i)
        keys = list(groups)

        def emit(j: int, res: JudgeResult) -> None:
            if res.ok:
                self.cache.set(
                    keys[j],
                    {
                        "score": res.score,
                        "prompt_tokens": res.prompt_tokens,
                        "completion_tokens": res.completion_tokens,
                        "reply": res.reply,
                    },
                )
            for i in groups[keys[j]]:
                results[i] = res
            done(len(groups[keys[j]]))

        if keys:
            await self._score_uncached([requests[groups[k][0]] for k in keys], emit)
        missing = [i for i, r in enumerate(results) if r is None]
        for i in missing:  # a subclass bug must still not drop a request
            results[i] = JudgeResult.failed("internal: no result emitted", self.judge_id)
        final = [r for r in results if r is not None]
        self.stats.requests += len(final)
        self.stats.scored += sum(r.ok for r in final)
        self.stats.errors.update(error_kinds(final))
        return final


def score_requests(
    judge: Judge, requests: Sequence[JudgeRequest], progress: bool = True, desc: str | None = None
) -> list[JudgeResult]:
    """Score ``requests`` synchronously, from a script or inside Jupyter/papermill.

    The coroutine always runs on a fresh event loop in a worker thread: ``asyncio.run`` fails
    where a loop is already running (ipykernel), and one code path serves both cases.
    Ctrl-C cancels the in-flight calls; scores already received stay in the cache.
    """
    from saets_utils.progress import progress as progress_bar

    requests = list(requests)
    bar = progress_bar(total=len(requests), desc=desc or f"judge {judge.judge_id}", disable=not progress)
    loop = asyncio.new_event_loop()
    task = loop.create_task(judge.ascore(requests, on_done=bar.update))
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            box["result"] = loop.run_until_complete(task)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=worker, name="saets-judge", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)  # short joins keep KeyboardInterrupt deliverable
    except KeyboardInterrupt:
        loop.call_soon_threadsafe(task.cancel)
        thread.join()
        raise
    finally:
        bar.close()
    if "error" in box:
        raise box["error"]
    return box["result"]
