"""A real HTTP server on 127.0.0.1 speaking enough of the OpenAI chat-completions protocol for
the official client, with faults injected from the judged text itself.

Directives anywhere in the last user message (i.e. in the text under judgement):
- ``[[score=7]]``: reply ``{"score": 7}``; a battle (system message asking for ``"winner"``) gets
  ``{"winner": "A" | "B" | "tie"}`` from that score mod 3 (``range`` fault: ``"C"``); without it the score is derived from the message
  (sha256 mod 10 + 1), so it is deterministic per text.
- ``[[FAULT]]`` or ``[[FAULTxN]]``: the first N requests (default 1) carrying this message get
  FAULT, later ones a normal reply; N >= 99 means always. FAULT is one of ``429`` (with
  Retry-After), ``quota`` (429 ``insufficient_quota``, as OpenAI sends when the quota is spent), ``500``, ``401``, ``slow`` (sleeps ``slow_s``, longer than the client timeout),
  ``malformed`` (prose instead of JSON), ``range`` (``{"score": 11}``), ``float``
  (``{"score": 7.5}``), ``string`` (``{"score": "7"}``), ``fenced`` (a ```json fence, accepted).

Every request is recorded (``requests``), as is the largest number in flight (``max_in_flight``).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_DIRECTIVE = re.compile(r"\[\[([a-z0-9]+?)(?:x(\d+))?\]\]")
_SCORE = re.compile(r"\[\[score=(\d+)\]\]")


def default_score(content: str) -> int:
    """Deterministic score in 1..10 for a message without ``[[score=N]]``."""
    m = _SCORE.search(content)
    if m:
        return int(m.group(1))
    return int(hashlib.sha256(content.encode("utf-8")).hexdigest(), 16) % 10 + 1


class FakeOpenAIServer:
    """Start with :meth:`start` (binds 127.0.0.1 on a free port), stop with :meth:`stop`.

    ``delay_s``: every reply waits this long (to make requests overlap); ``slow_s``: the sleep of
    the ``slow`` fault; ``retry_after``: the Retry-After value of 429 replies (seconds).
    """

    def __init__(self, delay_s: float = 0.0, slow_s: float = 3.0, retry_after: float = 0.01) -> None:
        self.delay_s, self.slow_s, self.retry_after = delay_s, slow_s, retry_after
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # http.server's naming
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes sleeping `slow` handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def n_requests(self) -> int:
        with self._lock:
            return len(self.requests)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {}
        messages = body.get("messages") or [{}]
        content = str(messages[-1].get("content", ""))
        with self._lock:
            self.requests.append(
                {
                    "path": h.path,
                    "headers": {k.lower(): v for k, v in h.headers.items()},
                    "body": body,
                    "t": time.monotonic(),
                }
            )
            count = self._seen.get(content, 0)
            self._seen[content] = count + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if h.path.rstrip("/") != "/v1/chat/completions":
                return self._send(h, 404, {"error": {"message": f"no route {h.path}", "type": "not_found"}})
            fault = None
            for m in _DIRECTIVE.finditer(content):
                n = int(m.group(2) or 1)
                if m.group(1) != "score" and (n >= 99 or count < n):
                    fault = m.group(1)
                    break
            if self.delay_s:
                self._stopping.wait(self.delay_s)
            self._reply(h, body, content, fault)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _reply(self, h: BaseHTTPRequestHandler, body: dict[str, Any], content: str, fault: str | None) -> None:
        if fault == "429":
            return self._send(
                h,
                429,
                {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}},
                {"Retry-After": str(self.retry_after)},
            )
        if fault == "quota":
            return self._send(
                h,
                429,
                {
                    "error": {
                        "message": "You exceeded your current quota, please check your plan and billing details.",
                        "type": "insufficient_quota",
                        "code": "insufficient_quota",
                    }
                },
            )
        if fault == "500":
            return self._send(h, 500, {"error": {"message": "The server had an error", "type": "server_error"}})
        if fault == "401":
            auth = h.headers.get("Authorization", "")
            return self._send(
                h,
                401,
                {"error": {"message": f"Incorrect API key provided: {auth[7:]}", "type": "invalid_request_error"}},
            )
        if fault == "slow":
            self._stopping.wait(self.slow_s)
        score = default_score(content)
        if '"winner"' in str(body.get("messages", [{}])[0].get("content", "")):  # a battle: A, B or tie by hash
            winner = "C" if fault == "range" else ("A", "B", "tie")[score % 3]
            return self._ok(h, body, json.dumps({"winner": winner}))
        reply = {
            "malformed": "I would rate this text a seven.",
            "range": '{"score": 11}',
            "float": '{"score": 7.5}',
            "string": '{"score": "7"}',
            "fenced": f'```json\n{{"score": {score}}}\n```',
        }.get(fault or "", json.dumps({"score": score}))
        self._ok(h, body, reply)

    def _ok(self, h: BaseHTTPRequestHandler, body: dict[str, Any], reply: str) -> None:
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        completion_tokens = 5
        self._send(
            h,
            200,
            {
                "id": f"chatcmpl-fake-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode("utf-8")
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
