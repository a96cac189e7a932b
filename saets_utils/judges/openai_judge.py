"""The LLM judge over any OpenAI-compatible chat-completions server: messages from the templates,
strict parsing of the ``{"score": N}`` reply, retries with backoff, a circuit breaker, and the API
key (from the environment or ``.env``, never shown, sent to the OpenAI API only unless the params
name another variable for another host)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from saets_utils.config import OPENAI_API_HOST, ConfigError, JudgeConfig
from saets_utils.judges.base import Emit, Judge, JudgeRequest, JudgeResult, JudgeUnavailable
from saets_utils.judges.cache import JudgeCache
from saets_utils.judges.prompts import BEHAVIOUR_TEMPLATE, COHERENCE_TEMPLATE, SYSTEM_PROMPT


def build_messages(req: JudgeRequest, template_name: str = "project") -> list[dict[str, str]]:
    """Chat messages asking the judge for ``{"score": N}`` on ``req``'s criterion, in the
    ``project`` template (judges/prompts.py) or the ``reference`` one (judges/reference.py)."""
    if template_name == "reference":
        from saets_utils.judges.reference import reference_messages

        return reference_messages(req)
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


# Failure kinds that, repeated, mean every further call will fail too; and what to do about them.
BREAKER_FIXES = {
    "quota": "the account's quota is spent: check its plan and billing",
    "rate_limit": "rate limited on every call: lower eval.judge.concurrency or check the account's limits",
    "auth": "the key was refused: check OPENAI_API_KEY, or the variable eval.judge.api_key_env names",
    "connection": "nothing answers there: start the server, or fix eval.judge.base_url",
    "bad_request": "the server refuses the requests: check eval.judge.model and eval.judge.base_url",
}
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAIJudge(Judge):
    """LLM judge over any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama,
    llama.cpp): ``cfg.concurrency`` calls in flight, ``cfg.timeout_s`` per call, and up to
    ``cfg.max_retries`` retries with exponential backoff (honouring Retry-After) on 408/409/429/5xx,
    timeouts, connection errors and malformed or out-of-range replies. tenacity is the only retry
    layer (the client's own retries are off). 401/403/400/404/422 fail at once. After
    ``cfg.circuit_breaker`` consecutive failed calls of one kind in :data:`BREAKER_FIXES` (for plain
    429s at least ``4 * concurrency``) the judge stops and raises :class:`JudgeUnavailable` naming
    the kind and the fix. A spent quota (429 ``insufficient_quota``) is not retried.

    The key comes from ``api_key`` or :func:`resolve_api_key`; it is never logged or shown. Without
    a key no ``Authorization`` header is sent at all.
    """

    kind = "openai"

    def __init__(
        self,
        cfg: JudgeConfig,
        cache: JudgeCache,
        api_key: str | None = None,
        *,
        json_mode: bool = True,
        max_tokens: int = 20,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        self.model = cfg.model
        super().__init__(cache)
        self.cfg = cfg
        self.json_mode, self.max_tokens = json_mode, max_tokens
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        key = api_key if api_key is not None else resolve_api_key(cfg.base_url, api_key_env=cfg.api_key_env)
        self._key = _Secret(key or "")
        self._streak: tuple[str, int] = ("", 0)
        self._tripped: str | None = None

    @property
    def base_url(self) -> str:
        """The endpoint, normalised (the OpenAI API when ``cfg.base_url`` is None)."""
        return (self.cfg.base_url or DEFAULT_BASE_URL).rstrip("/")

    def _cache_extra(self, req: JudgeRequest) -> str:
        # Everything else that changes the reply: the endpoint, the request settings and the exact
        # messages, whatever template or question (battle) built them, so a template edit re-asks
        # without a version bump.
        messages = json.dumps(self._messages(req), ensure_ascii=False, sort_keys=True)
        return json.dumps(
            {
                "base_url": self.base_url,
                "temperature": 0,
                "max_tokens": self.max_tokens,
                "json_mode": self.json_mode,
                "messages": hashlib.sha256(messages.encode("utf-8")).hexdigest(),
            },
            sort_keys=True,
        )

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(model={self.model!r}, base_url={self.cfg.base_url!r}, "
            f"concurrency={self.cfg.concurrency}, timeout_s={self.cfg.timeout_s}, "
            f"max_retries={self.cfg.max_retries}, api_key='***')"
        )

    __str__ = __repr__

    def _messages(self, req: JudgeRequest) -> list[dict[str, str]]:
        """The chat messages of ``req`` (subclasses ask other questions, e.g. the battle judge)."""
        return build_messages(req, self.cfg.template)

    def _parse(self, content: str | None) -> int:
        """The integer result in a reply; raises :class:`ReplyError` (retried)."""
        return parse_score(content)

    def _scrub(self, message: str) -> str:
        key = self._key.get()
        return (message.replace(key, "***") if len(key) >= 8 else message)[:300]

    async def _score_uncached(self, requests: Sequence[JudgeRequest], emit: Emit) -> None:
        from openai import AsyncOpenAI

        sem = asyncio.Semaphore(self.cfg.concurrency)
        todo = iter(enumerate(requests))
        self._streak, self._tripped = ("", 0), None  # each call starts with the breaker closed
        # One client per event loop: its connection pool is bound to the loop that opened it.
        # The client refuses to start without a key; with none, the header is omitted per request.
        async with AsyncOpenAI(
            api_key=self._key.get() or "unused",
            base_url=self.base_url,
            timeout=self.cfg.timeout_s,
            max_retries=0,
        ) as client:

            async def worker() -> None:
                # More workers than slots, so a request sleeping in backoff leaves its slot free.
                for j, req in todo:
                    if self._tripped:
                        return
                    emit(j, await self._score_one(client, sem, req))

            n_workers = min(len(requests), 2 * self.cfg.concurrency)
            await asyncio.gather(*(worker() for _ in range(n_workers)))
        if self._tripped:
            raise JudgeUnavailable(self._tripped)

    def _note(self, kind: str | None, message: str = "") -> None:
        """Count consecutive failed calls of one kind; trip the breaker at ``cfg.circuit_breaker``."""
        if kind not in BREAKER_FIXES:
            self._streak = ("", 0)
            return
        n = self._streak[1] + 1 if self._streak[0] == kind else 1
        self._streak = (kind, n)
        # A burst of plain 429s can hit every worker at once while the server sheds load.
        limit = (
            max(self.cfg.circuit_breaker, 4 * self.cfg.concurrency)
            if kind == "rate_limit"
            else self.cfg.circuit_breaker
        )
        if n >= limit and not self._tripped:
            self._tripped = (
                f"judge stopped after {n} consecutive '{kind}' failures from {self.base_url} "
                f"(last: {self._scrub(message)}); {BREAKER_FIXES[kind]}. Scores received so far are cached: "
                "re-run 03 to ask only the rest"
            )

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

        messages = self._messages(req)
        tally = {"attempts": 0, "prompt_tokens": 0, "completion_tokens": 0}
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.cfg.max_retries + 1),
                wait=self._wait,
                reraise=True,
                retry=retry_if_exception(lambda e: isinstance(e, JudgeCallError) and e.retriable),
                before_sleep=self._before_sleep,
            ):
                with attempt:
                    tally["attempts"] += 1
                    score, reply = await self._call(client, sem, messages, tally)
            return JudgeResult.scored(score, self.judge_id, reply=reply, **tally)
        except JudgeCallError as e:
            return JudgeResult.failed(f"{e.kind}: {self._scrub(e.message)}", self.judge_id, **tally)
        except Exception as e:  # any other failure is still reported, never dropped
            return JudgeResult.failed(f"unexpected: {type(e).__name__}: {self._scrub(str(e))}", self.judge_id, **tally)

    async def _call(
        self, client: Any, sem: asyncio.Semaphore, messages: list[dict[str, str]], tally: dict[str, int]
    ) -> tuple[int, str]:
        import openai

        kwargs: dict[str, Any] = dict(model=self.model, messages=messages, temperature=0, max_tokens=self.max_tokens)
        if self.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        if not self._key.get():
            kwargs["extra_headers"] = {"Authorization": openai.Omit()}
        async with sem:
            if self._tripped:  # checked once a slot is free: calls queued before the trip are not sent
                raise JudgeCallError("circuit_open", "the judge stopped after repeated failures", False)
            self.stats.calls += 1
            try:
                resp = await self._create(client, kwargs)
            except JudgeCallError as e:
                self._note(e.kind, e.message)
                raise
            self._note(None)
        usage = getattr(resp, "usage", None)
        tally["prompt_tokens"] += getattr(usage, "prompt_tokens", 0) or 0
        tally["completion_tokens"] += getattr(usage, "completion_tokens", 0) or 0
        self.stats.prompt_tokens += getattr(usage, "prompt_tokens", 0) or 0
        self.stats.completion_tokens += getattr(usage, "completion_tokens", 0) or 0
        content = resp.choices[0].message.content if resp.choices else None
        return self._parse(content), content or ""

    async def _create(self, client: Any, kwargs: dict[str, Any]) -> Any:
        """One chat-completions call; failures become :class:`JudgeCallError` by kind."""
        import openai

        try:
            # Outer guard: the client's timeout bounds each read, not a trickling reply.
            return await asyncio.wait_for(client.chat.completions.create(**kwargs), timeout=self.cfg.timeout_s + 1.0)
        except (TimeoutError, openai.APITimeoutError):
            raise JudgeCallError("timeout", f"no reply within {self.cfg.timeout_s} s", True) from None
        except openai.APIConnectionError as e:
            raise JudgeCallError("connection", str(e), True) from None
        except openai.APIStatusError as e:
            code = e.status_code
            if code == 429 and "insufficient_quota" in f"{getattr(e, 'code', '')} {e.message}":
                raise JudgeCallError("quota", f"HTTP 429: {e.message}", False) from None  # no wait brings it back
            kind = (
                "rate_limit"
                if code == 429
                else "server"
                if code >= 500 or code in (408, 409)
                else "auth"
                if code in (401, 403)
                else "bad_request"
            )
            raise JudgeCallError(
                kind,
                f"HTTP {code}: {e.message}",
                kind in ("rate_limit", "server"),
                _retry_after(e.response.headers),
            ) from None
        except openai.APIError as e:
            raise ReplyError("malformed", f"unreadable response: {e}") from None


def resolve_api_key(
    base_url: str | None, env_file: str | os.PathLike[str] | None = None, *, api_key_env: str | None = None
) -> str | None:
    """The key to send to ``base_url``, read from the environment or a ``.env`` file (cwd, then
    the repo root); None: send no key.

    The OpenAI API (``base_url`` None or its host) gets ``OPENAI_API_KEY`` (or ``api_key_env``);
    any other host gets only the variable ``api_key_env`` names, never ``OPENAI_API_KEY``, and no
    key without it. Raises ConfigError naming the fix when a needed key is missing, before any work.
    """
    to_openai = base_url is None or urlparse(base_url).hostname == OPENAI_API_HOST
    var = api_key_env or ("OPENAI_API_KEY" if to_openai else None)
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        from dotenv import dotenv_values

        from saets_utils.config import REPO_ROOT

        files = [Path(env_file)] if env_file else [Path.cwd() / ".env", REPO_ROOT / ".env"]
        for f in files:
            if f.is_file() and (key := dotenv_values(f).get(var)):
                break
    if key:
        return key
    if to_openai:
        raise ConfigError(
            f"eval.judge.kind is 'openai' but no API key was found for the OpenAI API: set {var} in the "
            "environment or in a .env file at the repo root (never in params), or choose eval.judge.kind: offline"
        )
    raise ConfigError(
        f"eval.judge.api_key_env names {var}, but it is not set: export {var}=<key for {urlparse(base_url or '').hostname}> "
        "or put it in a .env file at the repo root (never in params), or remove api_key_env to send no key"
    )
