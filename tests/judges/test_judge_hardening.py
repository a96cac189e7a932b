"""The judge under failure and across endpoints, against the loopback fake server (and a dead port):
failure share gate, circuit breaker, cache keys that include the endpoint and every reply-changing
setting, the key sent only where it belongs, no eviction of paid scores, the offline judge's
coherence key."""

from __future__ import annotations

import socket

import pytest

from saets_utils.config import ConfigError, JudgeConfig
from saets_utils.judges import (
    JudgeCache,
    JudgeFailures,
    JudgeRequest,
    JudgeUnavailable,
    OpenAIJudge,
    check_failures,
    make_judge,
    score_requests,
)
from saets_utils.judges.offline import OfflineJudge
from saets_utils.judges.openai_judge import resolve_api_key
from tests.fake_openai_server import FakeOpenAIServer

OPENAI_KEY = "sk-openai-SECRET-0123456789abcdef"


@pytest.fixture
def server():
    srv = FakeOpenAIServer().start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)  # present, as on a researcher's machine
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env from the working directory


def dead_url() -> str:
    """A loopback URL where nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def req(text: str, i: int = 0) -> JudgeRequest:
    return JudgeRequest(
        task="wedding",
        method="CAA",
        scale=0.0,
        criterion_kind="behaviour",
        criterion="The text is about weddings.",
        prompt="I think",
        text=text,
        sample=i,
    )


def judge(base_url: str, cache: JudgeCache | None = None, api_key: str | None = None, **kw) -> OpenAIJudge:
    opts = {k: kw.pop(k) for k in ("max_tokens", "json_mode") if k in kw}
    cfg = JudgeConfig(
        **{"kind": "openai", "base_url": base_url, "concurrency": 2, "timeout_s": 60.0, "max_retries": 1, **kw}
    )
    return OpenAIJudge(
        cfg, cache or JudgeCache(None), api_key=api_key, backoff_initial_s=0.01, backoff_max_s=0.02, **opts
    )


# --- failures: gate, re-asking only the failed, circuit breaker, dead endpoint -------------------


def test_failure_share_gate_names_kinds_and_rerun_asks_only_failed(server, tmp_path):
    reqs = [req(f"text {i} [[score=5]]", i) for i in range(8)] + [req(f"bad {i} [[500x2]]", 8 + i) for i in range(2)]
    first = score_requests(judge(server.base_url, JudgeCache(tmp_path / "c")), reqs, progress=False)
    with pytest.raises(JudgeFailures, match=r"2 of 10 judgements failed .*'server': 2.*re-run 03"):
        check_failures(first, max_failed_share=0.1)
    check_failures(first, max_failed_share=0.2)  # at the configured share: passes
    n = server.n_requests
    second = score_requests(judge(server.base_url, JudgeCache(tmp_path / "c")), reqs, progress=False)
    sent = [r["body"]["messages"][-1]["content"] for r in server.requests[n:]]
    assert len(sent) == 2 and all("bad" in s for s in sent)  # only the failed ones, once each
    check_failures(second, max_failed_share=0.0)


@pytest.mark.parametrize(
    ("fault", "kind", "after"), [("401", "auth", 5), ("quota", "quota", 5), ("429", "rate_limit", 8)]
)
def test_circuit_breaker_stops_on_a_run_of_one_failure_kind(server, fault, kind, after):
    reqs = [req(f"t {i} [[{fault}x99]]", i) for i in range(60)]
    j = judge(server.base_url, api_key="sk-local", circuit_breaker=5, max_retries=6)
    # plain 429s: at least 4 x concurrency (2) in a row, a burst that hits every worker is no outage
    with pytest.raises(JudgeUnavailable, match=rf"{after} consecutive '{kind}' failures.*re-run 03"):
        score_requests(j, reqs, progress=False)
    assert server.n_requests <= after + 2 * j.cfg.concurrency  # not 60 x 7 attempts


def test_dead_endpoint_fails_loudly(tmp_path):
    url = dead_url()
    reqs = [req(f"t {i}", i) for i in range(30)]
    with pytest.raises(JudgeUnavailable, match=r"consecutive 'connection' failures.*start the server"):
        score_requests(judge(url, circuit_breaker=4), reqs, progress=False)
    few = score_requests(judge(url, circuit_breaker=100), reqs[:3], progress=False)  # too few to trip
    with pytest.raises(JudgeFailures, match=r"3 of 3 judgements failed.*'connection': 3"):
        check_failures(few, max_failed_share=0.01)


def test_evaluate_run_against_dead_judge_fails_03_and_writes_no_tables(tmp_path, tiny_model, tiny_sae, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from helpers import build_run_cfg
    from saets_utils.evaluation import evaluate
    from saets_utils.steering.tasks import Task

    run = build_run_cfg(
        tmp_path,
        eval={
            "tasks": ["anger"],
            "methods": ["CAA"],
            "scale_grid": {"start": 0, "stop": 20, "step": 20},
            "samples_per_scale": 2,
            "new_tokens": 3,
            "targeting": False,
            "judge": {"kind": "openai", "base_url": dead_url(), "max_retries": 0},
        },
    )
    ev = run.results_dir / "eval"
    ev.mkdir(parents=True)
    save_file({"mean": torch.zeros(64), "density": torch.zeros(64)}, str(run.results_dir / "baseline.safetensors"))
    (ev / "summary.csv").write_text("stale,table\n")  # from an earlier run
    short = Task(
        name="anger",
        behaviour="b",
        coherence="c",
        steering_prompt="p",
        positive=[f"zz zap {i}" for i in range(8)],
        negative=[f"aa cap {i}" for i in range(8)],
    )
    monkeypatch.setattr(evaluate, "load_tasks", lambda names: [short])
    with pytest.raises(JudgeFailures, match=r"03 stopped: 8 of 8 judgements failed.*'connection': 8"):
        evaluate.evaluate_run(run, tiny_model, tiny_sae, progress=False)
    assert not (ev / "summary.csv").exists() and not (ev / "by_scale.csv").exists()
    assert (ev / "samples.jsonl").is_file() and (ev / "judge_stats.json").is_file()


# --- cache keys ---------------------------------------------------------------------------------


def test_cache_key_includes_endpoint_and_reply_settings(tmp_path):
    a, b = FakeOpenAIServer().start(), FakeOpenAIServer().start()
    try:
        reqs = [req("same text [[score=3]]")]
        score_requests(judge(a.base_url, JudgeCache(tmp_path / "c")), reqs, progress=False)
        res = score_requests(judge(b.base_url, JudgeCache(tmp_path / "c")), reqs, progress=False)
        assert not res[0].cached and b.n_requests == 1  # same model name, another server: asked again
        for kw in ({"max_tokens": 50}, {"json_mode": False}):
            n = b.n_requests
            res = score_requests(judge(b.base_url, JudgeCache(tmp_path / "c"), **kw), reqs, progress=False)
            assert not res[0].cached and b.n_requests == n + 1, kw
        res = score_requests(judge(b.base_url + "/", JudgeCache(tmp_path / "c")), reqs, progress=False)
        assert res[0].cached  # a trailing slash is the same endpoint
    finally:
        a.stop()
        b.stop()


def test_cache_key_follows_the_prompt_template(server, monkeypatch):
    from saets_utils.judges import openai_judge

    j = judge(server.base_url)
    before = j.cache_key(req("x"))
    monkeypatch.setattr(openai_judge, "BEHAVIOUR_TEMPLATE", openai_judge.BEHAVIOUR_TEMPLATE + "\nBe strict.")
    assert j.cache_key(req("x")) != before  # no version bump needed


def test_offline_coherence_key_includes_bos_and_dtype(tiny_model):
    from saets_utils.judges.offline import make_mean_logprob_fn

    def key(bos: int, dtype: str) -> str:
        fn = make_mean_logprob_fn(tiny_model, bos_token_id=bos)
        fn.dtype = dtype  # type: ignore[attr-defined]
        j = OfflineJudge(JudgeCache(None), mean_logprob_fn=fn, embed_fn=lambda t: None)  # type: ignore[arg-type]
        r = JudgeRequest("wedding", "CAA", 0.0, "coherence", "fluent", "I think", "I think so.")
        return j.cache_key(r)

    assert make_mean_logprob_fn(tiny_model, bos_token_id=0).dtype == "float32"  # type: ignore[attr-defined]
    assert len({key(0, "float32"), key(1, "float32"), key(0, "bfloat16")}) == 3


def test_cache_never_evicts_paid_scores(tmp_path):
    import diskcache

    path = tmp_path / "cache"
    with diskcache.Cache(str(path), size_limit=20_000):  # an older cache folder with a small limit
        pass
    cache = JudgeCache(path)
    for i in range(400):  # ~100 kB of records, five times the old limit
        cache.set(f"k{i}", {"score": 1 + i % 10, "reply": "x" * 200})
    cache.close()
    again = JudgeCache(path)
    assert len(again) == 400 and all(again.get(f"k{i}") is not None for i in range(400))


# --- where the key goes -------------------------------------------------------------------------


def test_openai_key_is_never_sent_to_another_host(server, monkeypatch):
    no_key = make_judge(JudgeConfig(kind="openai", base_url=server.base_url, max_retries=0), None)
    score_requests(no_key, [req("a [[score=2]]")], progress=False)
    assert "authorization" not in server.requests[-1]["headers"]  # neither OPENAI_API_KEY nor a dummy
    assert OPENAI_KEY not in str(server.requests)

    cfg = JudgeConfig(kind="openai", base_url=server.base_url, api_key_env="VLLM_API_KEY", max_retries=0)
    with pytest.raises(ConfigError, match=r"VLLM_API_KEY.*not set.*export VLLM_API_KEY"):
        make_judge(cfg, None)
    monkeypatch.setenv("VLLM_API_KEY", "vllm-key-0123456789")
    score_requests(make_judge(cfg, None), [req("b [[score=2]]")], progress=False)
    assert server.requests[-1]["headers"]["authorization"] == "Bearer vllm-key-0123456789"


def test_openai_api_gets_openai_key(monkeypatch):
    assert resolve_api_key(None) == OPENAI_KEY
    assert resolve_api_key("https://api.openai.com/v1") == OPENAI_KEY
    assert resolve_api_key("https://llm.example.org/v1") is None
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ConfigError, match=r"OPENAI_API_KEY.*offline"):
        resolve_api_key(None)


def test_credentials_in_url_never_reach_config_or_manifest(tmp_path):
    from helpers import HOOK
    from saets_utils.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(f"sae: {{hook_name: {HOOK}}}\n")
    for url in ("http://user:pw-s3cr3t@127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1?key=pw-s3cr3t"):
        with pytest.raises(ConfigError) as err:  # params file or papermill overrides alike
            load_config(path, {"eval": {"judge": {"kind": "openai", "base_url": url}}})
        assert "pw-s3cr3t" not in str(err.value) and "credential" in str(err.value)
