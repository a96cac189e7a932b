"""Each step's outputs replace the previous run's or are absent: 03 stopped by judge
failures and 02 after a failed fit leave no file of an earlier run beside their own."""

from __future__ import annotations

import socket

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from helpers import build_run_cfg
from saets_utils.approximator import training
from saets_utils.approximator.training import APPROX_OUTPUTS, train_approximator
from saets_utils.config import load_config
from saets_utils.effects.store import Effects
from saets_utils.evaluation import evaluate
from saets_utils.evaluation.evaluate import EVAL_OUTPUTS
from saets_utils.judges import JudgeFailures
from saets_utils.steering.tasks import Task

STALE = b"from an earlier run"


def dead_url() -> str:
    """A loopback URL where nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_03_stopped_by_judge_failures_leaves_no_earlier_file(tmp_path, tiny_model, tiny_sae, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env from the working directory
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
    for name in EVAL_OUTPUTS:  # a complete earlier 03, battles and targeting included
        (ev / name).write_bytes(STALE)
    (ev / "judge_cache").mkdir()
    (ev / "judge_cache" / "entry").write_bytes(b"paid score")  # a cache: kept
    short = Task(
        name="anger",
        behaviour="b",
        coherence="c",
        steering_prompt="p",
        positive=[f"zz zap {i}" for i in range(8)],
        negative=[f"aa cap {i}" for i in range(8)],
    )
    monkeypatch.setattr(evaluate, "load_tasks", lambda names: [short])
    with pytest.raises(JudgeFailures, match=r"03 stopped: 8 of 8 judgements failed"):
        evaluate.evaluate_run(run, tiny_model, tiny_sae, progress=False)
    left = {p.name for p in ev.iterdir()}
    assert left == {"samples.jsonl", "judge_stats.json", "vectors.safetensors", "judge_cache"}, left
    assert all((ev / n).read_bytes() != STALE for n in left - {"judge_cache"})  # all of this run
    assert len(pd.read_json(ev / "samples.jsonl", lines=True)) == 4
    assert (ev / "judge_cache" / "entry").read_bytes() == b"paid score"


def _effects(n: int = 40, d_model: int = 12, d_sae: int = 30) -> Effects:
    g = torch.Generator().manual_seed(0)
    X = torch.nn.functional.normalize(torch.randn(n, d_model, generator=g), dim=1)
    ids = torch.arange(n)
    return Effects(
        effects=X @ torch.randn(d_model, d_sae, generator=g),
        vectors=X,
        scales=torch.ones(n),
        vector_ids=ids,
        table=pd.DataFrame({"id": ids.tolist()}),
        baseline_mean=torch.zeros(d_sae),
        baseline_density=torch.full((d_sae,), 0.1),
        meta={"effects": {"vectors": {"source": "random"}}},
    )


def test_02_after_a_failed_fit_leaves_no_earlier_approximator(tmp_path, monkeypatch):
    run = load_config(
        "params/test.yaml",
        {
            "results_root": str(tmp_path),
            "effects": {"vectors": {"ids": {"start": 0, "stop": 40}}},
            "approximator": {"holdout": 8, "bootstrap": 20},
        },
    )
    W_dec = torch.randn(30, 12)
    train_approximator(run, _effects(), W_dec)  # the earlier, successful 02
    assert all((run.results_dir / n).is_file() for n in APPROX_OUTPUTS)

    def singular(*a, **k):
        raise torch.linalg.LinAlgError("linalg.solve: the matrix is singular")

    monkeypatch.setattr(training, "fit_approximator", singular)
    with pytest.raises(torch.linalg.LinAlgError):
        train_approximator(run, _effects(), W_dec)
    assert not [n for n in APPROX_OUTPUTS if (run.results_dir / n).exists()]
    with pytest.raises(ValueError, match="only 2 vectors have usable effects"):  # failing before the fit too
        train_approximator(run, _effects(2), W_dec)
