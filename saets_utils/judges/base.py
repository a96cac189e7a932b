"""Score generated texts for a task's behavioural criterion and for coherence (integers 1-10,
normalised ``(s - 1) / 9``), with an OpenAI-compatible LLM judge or the offline judge.

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
import json
import os
import random
import re
import threading
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence
from urllib.parse import urlparse

from saets_utils.config import ConfigError, JudgeConfig
from saets_utils.judges.cache import JudgeCache, cache_key

CriterionKind = Literal["behaviour", "coherence"]

# Bump when a template or the request settings change: it is part of every cache key.
PROMPT_TEMPLATE_VERSION = "judge-v1"

SYSTEM_PROMPT = (
    "You rate short texts written by a language model. You answer with one JSON object of the "
    'form {"score": N}, where N is a whole number from 1 to 10, and with nothing else.'
)
BEHAVIOUR_TEMPLATE = """Criterion: {criterion}

How strongly does the text below meet this criterion? 1 means not at all, 10 means fully and \
unmistakably. Rate only the criterion: ignore grammar and fluency, and ignore that the text may \
stop in the middle of a sentence.

The text continues the prompt "{prompt}":
<text>
{text}
</text>

Answer with only {{"score": N}}, N a whole number from 1 to 10."""
COHERENCE_TEMPLATE = """Criterion: {criterion}

How coherent is the text below? 1 means gibberish or the same words over and over, 10 means \
fluent, sensible text that a careful writer could have written. Rate only coherence: ignore the \
topic, and ignore that the text stops in the middle of a sentence (it was cut at a fixed length).

The text continues the prompt "{prompt}":
<text>
{text}
</text>

Answer with only {{"score": N}}, N a whole number from 1 to 10."""
COHERENCE_CRITERION = (
    "The text is fluent and grammatical, follows one line of thought, and neither repeats "
    "itself nor falls into nonsense."
)


def build_messages(req: "JudgeRequest") -> list[dict[str, str]]:
    """Chat messages asking the judge for ``{"score": N}`` on ``req``'s criterion."""
    template = BEHAVIOUR_TEMPLATE if req.criterion_kind == "behaviour" else COHERENCE_TEMPLATE
    user = template.format(criterion=req.criterion, prompt=req.prompt, text=req.text)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


class JudgeCallError(Exception):
    """A failed judge attempt; ``kind`` names it in stats and in the result's error."""

    def __init__(self, kind: str, message: str, retriable: bool, retry_after: float | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.retriable, self.retry_after = kind, message, retriable, retry_after


class ReplyError(JudgeCallError):
    """The judge answered, but not with ``{"score": <int 1..10>}`` (retried: ``malformed`` or
    ``out_of_range``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message, retriable=True)


_FENCE = re.compile(r"^```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```$", re.S | re.I)


def parse_score(content: str | None) -> int:
    """The integer score in a reply, strictly: a JSON object whose ``score`` is an int in 1..10.

    Tolerated: surrounding whitespace, one Markdown code fence around the object (local models
    add it often; it is unambiguous) and extra keys. Refused: prose, ``7.5``, ``7.0``, ``"7"``,
    ``true``, 0, 11. Raises :class:`ReplyError`.
    """
    if not content or not content.strip():
        raise ReplyError("malformed", "empty reply")
    s = content.strip()
    if m := _FENCE.match(s):
        s = m.group(1).strip()
    try:
        obj = json.loads(s)
    except json.JSONDecodeError:
        raise ReplyError("malformed", f"reply is not a JSON object: {content[:80]!r}") from None
    if not isinstance(obj, dict) or "score" not in obj:
        raise ReplyError("malformed", f"reply has no 'score' key: {content[:80]!r}")
    v = obj["score"]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ReplyError("malformed", f"score is not an integer: {v!r}")
    if not 1 <= v <= 10:
        raise ReplyError("out_of_range", f"score {v} is outside 1..10")
    return v



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
    def scored(cls, score: int, judge: str, **kw: Any) -> "JudgeResult":
        return cls(score=score, normalised=(score - 1) / 9, error=None, judge=judge, **kw)

    @classmethod
    def failed(cls, error: str, judge: str, **kw: Any) -> "JudgeResult":
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
        (p for name, p in sorted(PRICES_PER_M.items(), key=lambda kv: -len(kv[0]))
         if model.startswith(name + "-20")), None)
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
        return (f"{self.requests} requests: {self.scored} scored, {sum(self.errors.values())} errors "
                f"{dict(self.errors) or ''}, {self.cache_hits} from cache, {self.calls} calls, "
                f"retries {dict(self.retries) or 0}, tokens {self.prompt_tokens}+{self.completion_tokens}, cost {cost}")


Emit = Callable[[int, JudgeResult], None]


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
        return cache_key(self.kind, self.model, PROMPT_TEMPLATE_VERSION, req.criterion_kind,
                         req.criterion, req.prompt, req.text, self._cache_extra(req))

    def _check(self, requests: Sequence[JudgeRequest]) -> None:
        """Raise before any work if these requests cannot be scored by this judge."""

    @abstractmethod
    async def _score_uncached(self, requests: Sequence[JudgeRequest], emit: Emit) -> None:
        """Score each request, calling ``emit(i, result)`` exactly once per index as soon as
        its result is known."""

    async def ascore(self, requests: Sequence[JudgeRequest],
                     on_done: Callable[[int], None] | None = None) -> list[JudgeResult]:
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
                    rec["score"], self.judge_id, cached=True, prompt_tokens=rec.get("prompt_tokens", 0),
                    completion_tokens=rec.get("completion_tokens", 0), reply=rec.get("reply"))
                self.stats.cache_hits += 1
                done(1)
            else:
                groups.setdefault(key, []).append(i)
        keys = list(groups)

        def emit(j: int, res: JudgeResult) -> None:
            if res.ok:
                self.cache.set(keys[j], {"score": res.score, "prompt_tokens": res.prompt_tokens,
                                         "completion_tokens": res.completion_tokens, "reply": res.reply})
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
        self.stats.errors.update((r.error or "").split(":", 1)[0] for r in final if not r.ok)
        return final


class _Secret:
    """Holds the API key; its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (numeric form only), else None."""
    if not headers:
        return None
    for name, unit in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(headers[name]) * unit
        except (KeyError, TypeError, ValueError):
            continue
    return None


class OpenAIJudge(Judge):
    """LLM judge over any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama,
    llama.cpp): ``cfg.concurrency`` calls in flight, ``cfg.timeout_s`` per call, and up to
    ``cfg.max_retries`` retries with exponential backoff (honouring Retry-After) on 408/409/429/5xx,
    timeouts, connection errors and malformed or out-of-range replies. tenacity is the only retry
    layer (the client's own retries are off). 401/403/400/404/422 fail at once.

    The key comes from ``api_key`` or :func:`resolve_api_key`; it is never logged or shown.
    """

    kind = "openai"

    def __init__(self, cfg: JudgeConfig, cache: JudgeCache, api_key: str | None = None, *,
                 json_mode: bool = True, max_tokens: int = 20,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0) -> None:
        self.model = cfg.model
        super().__init__(cache)
        self.cfg = cfg
        self.json_mode, self.max_tokens = json_mode, max_tokens
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self._key = _Secret(api_key or resolve_api_key(cfg.base_url))

    def __repr__(self) -> str:
        return (f"OpenAIJudge(model={self.model!r}, base_url={self.cfg.base_url!r}, "
                f"concurrency={self.cfg.concurrency}, timeout_s={self.cfg.timeout_s}, "
                f"max_retries={self.cfg.max_retries}, api_key='***')")

    __str__ = __repr__

    def _scrub(self, message: str) -> str:
        key = self._key.get()
        return (message.replace(key, "***") if len(key) >= 8 else message)[:300]

    async def _score_uncached(self, requests: Sequence[JudgeRequest], emit: Emit) -> None:
        from openai import AsyncOpenAI

        sem = asyncio.Semaphore(self.cfg.concurrency)
        todo = iter(enumerate(requests))
        # One client per event loop: its connection pool is bound to the loop that opened it.
        async with AsyncOpenAI(api_key=self._key.get(), base_url=self.cfg.base_url,
                               timeout=self.cfg.timeout_s, max_retries=0) as client:
            async def worker() -> None:
                # More workers than slots, so a request sleeping in backoff leaves its slot free.
                for j, req in todo:
                    emit(j, await self._score_one(client, sem, req))

            n_workers = min(len(requests), 2 * self.cfg.concurrency)
            await asyncio.gather(*(worker() for _ in range(n_workers)))

    def _wait(self, state: Any) -> float:
        """Retry-After when the server sent one, else ``initial * 2**(n-1)`` plus up to ``initial``
        of jitter, capped at ``backoff_max_s``."""
        exc = state.outcome.exception() if state.outcome else None
        after = getattr(exc, "retry_after", None)
        if after is not None:
            return min(max(after, 0.0), self.backoff_max_s)
        expo = self.backoff_initial_s * 2.0 ** (state.attempt_number - 1)
        return min(expo + random.uniform(0, self.backoff_initial_s), self.backoff_max_s)

    def _before_sleep(self, state: Any) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self.stats.retries[getattr(exc, "kind", "unexpected")] += 1

    async def _score_one(self, client: Any, sem: asyncio.Semaphore, req: JudgeRequest) -> JudgeResult:
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        messages = build_messages(req)
        tally = {"attempts": 0, "prompt_tokens": 0, "completion_tokens": 0}
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.cfg.max_retries + 1), wait=self._wait, reraise=True,
                retry=retry_if_exception(lambda e: isinstance(e, JudgeCallError) and e.retriable),
                before_sleep=self._before_sleep,
            ):
                with attempt:
                    tally["attempts"] += 1
                    score, reply = await self._call(client, sem, messages, tally)
            return JudgeResult.scored(score, self.judge_id, reply=reply, **tally)
        except JudgeCallError as e:
            return JudgeResult.failed(f"{e.kind}: {self._scrub(e.message)}", self.judge_id, **tally)
        except Exception as e:  # noqa: BLE001 - any other failure is still reported, never dropped
            return JudgeResult.failed(f"unexpected: {type(e).__name__}: {self._scrub(str(e))}",
                                      self.judge_id, **tally)

    async def _call(self, client: Any, sem: asyncio.Semaphore, messages: list[dict[str, str]],
                    tally: dict[str, int]) -> tuple[int, str]:
        import openai

        kwargs: dict[str, Any] = dict(model=self.model, messages=messages, temperature=0,
                                      max_tokens=self.max_tokens)
        if self.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        async with sem:
            self.stats.calls += 1
            try:
                # Outer guard: the client's timeout bounds each read, not a trickling reply.
                resp = await asyncio.wait_for(client.chat.completions.create(**kwargs),
                                              timeout=self.cfg.timeout_s + 1.0)
            except (asyncio.TimeoutError, openai.APITimeoutError):
                raise JudgeCallError("timeout", f"no reply within {self.cfg.timeout_s} s", True) from None
            except openai.APIConnectionError as e:
                raise JudgeCallError("connection", str(e), True) from None
            except openai.APIStatusError as e:
                code = e.status_code
                kind = ("rate_limit" if code == 429 else "server" if code >= 500 or code in (408, 409)
                        else "auth" if code in (401, 403) else "bad_request")
                raise JudgeCallError(kind, f"HTTP {code}: {e.message}", kind in ("rate_limit", "server"),
                                     _retry_after(e.response.headers)) from None
            except openai.APIError as e:
                raise ReplyError("malformed", f"unreadable response: {e}") from None
        usage = getattr(resp, "usage", None)
        tally["prompt_tokens"] += getattr(usage, "prompt_tokens", 0) or 0
        tally["completion_tokens"] += getattr(usage, "completion_tokens", 0) or 0
        self.stats.prompt_tokens += getattr(usage, "prompt_tokens", 0) or 0
        self.stats.completion_tokens += getattr(usage, "completion_tokens", 0) or 0
        content = resp.choices[0].message.content if resp.choices else None
        return parse_score(content), content or ""


def score_requests(judge: Judge, requests: Sequence[JudgeRequest], progress: bool = True,
                   desc: str | None = None) -> list[JudgeResult]:
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
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
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


def is_loopback(base_url: str | None) -> bool:
    """True for http(s)://localhost, 127.x.x.x or [::1] URLs."""
    host = (urlparse(base_url).hostname or "") if base_url else ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def resolve_api_key(base_url: str | None, env_file: str | os.PathLike[str] | None = None) -> str:
    """The OpenAI key from ``OPENAI_API_KEY`` or a ``.env`` file (cwd, then the repo root);
    for a ``base_url`` on loopback without a key, a dummy key.

    Raises ConfigError naming the fix otherwise, before any work.
    """
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        from dotenv import dotenv_values

        from saets_utils.config import REPO_ROOT

        files = [Path(env_file)] if env_file else [Path.cwd() / ".env", REPO_ROOT / ".env"]
        for f in files:
            if f.is_file() and (key := dotenv_values(f).get("OPENAI_API_KEY")):
                break
    if key:
        return key
    if is_loopback(base_url):
        return "sk-local-no-key"  # local servers (vLLM, Ollama, llama.cpp) ignore the key unless started with one
    where = f"the server at eval.judge.base_url ({base_url})" if base_url else "the OpenAI API"
    raise ConfigError(
        f"eval.judge.kind is 'openai' but no API key was found for {where}: set OPENAI_API_KEY in "
        "the environment or in a .env file at the repo root (never in params; any value will do for a "
        "self-hosted server without auth), or choose eval.judge.kind: offline"
    )


def make_judge(cfg: JudgeConfig, cache_dir: str | os.PathLike[str] | None,
               mean_logprob_fn: Callable[[list[str]], list[float]] | None = None,
               examples: Mapping[str, Any] | None = None) -> Judge:
    """The judge ``cfg`` names, with its cache in ``cache_dir`` (None: in memory).

    ``openai``: checks the key up front (see :func:`resolve_api_key`). ``offline``: needs
    ``mean_logprob_fn`` for coherence and ``examples`` (task -> positive/negative texts) for
    behaviour; see :mod:`saets_utils.judges.offline`.
    """
    if cfg.kind == "openai":
        key = resolve_api_key(cfg.base_url)
        return OpenAIJudge(cfg, JudgeCache(cache_dir), api_key=key)
    from saets_utils.judges.offline import OfflineJudge

    return OfflineJudge(JudgeCache(cache_dir), examples=examples, mean_logprob_fn=mean_logprob_fn)


def __getattr__(name: str) -> Any:
    # The offline judge lives in its own module (it imports this one); this keeps
    # ``from saets_utils.judges.base import OfflineJudge`` working without an import cycle.
    if name in ("OfflineJudge", "TaskExamples", "MiniLMEmbedder", "make_mean_logprob_fn"):
        from saets_utils.judges import offline as offline_judge

        return getattr(offline_judge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
