"""The recipes of docs/extending.md, followed: each test adds a toy steering method, judge or vector
source the way the recipe says, uses it through the package's public entry point, and its fixture
takes it out of the table again, so no other test sees it.

The one step a test cannot take is editing source: a new judge kind or vector source also goes into
its config Literal (``JudgeConfig.kind``, ``VectorSource.source``), which ``model_copy(update=...)``
stands in for here; a new method is an entry of ``REGISTRY``, which adding it to the registry's
name lookup stands in for."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import Tensor

from saets_utils import registry
from saets_utils.config import ConfigError, JudgeConfig, RunConfig, VectorSource
from saets_utils.effects.vector_sources import (
    VECTOR_SOURCES,
    SourceInputs,
    build_vectors,
    get_vector_source,
    vector_source,
)
from saets_utils.evaluation import methods as M
from saets_utils.evaluation import task_vectors
from saets_utils.evaluation.scoring import judge_mismatch
from saets_utils.judges import (
    JUDGES,
    Emit,
    Judge,
    JudgeKind,
    JudgeRequest,
    JudgeResult,
    make_battle_judge,
    make_judge,
    register_judge,
    score_requests,
)
from saets_utils.judges.battle import VERDICTS, battle_request
from saets_utils.registry import Method, get_method
from saets_utils.steering.tasks import Task

# --- a steering method -------------------------------------------------------------------------


@pytest.fixture
def anti_sae() -> Iterator[str]:
    """``anti-SAE``: the SAE vector of the targets, negated (steers away from them)."""
    name = "anti-SAE"
    registry._BY_NAME[name] = Method(name, "#17becf", targets="task")  # stands in for a REGISTRY entry

    @task_vectors.builds(name)
    def _anti_sae(ctx: task_vectors.SteeringContext, task: Task | None, targets: M.Target) -> Tensor:
        return -M.build_sae_vector(ctx.sae.W_dec.detach().float().cpu(), targets)

    yield name
    del task_vectors.BUILDERS[name], registry._BY_NAME[name]
    with pytest.raises(ValueError, match="unknown method 'anti-SAE'"):
        get_method(name)


def test_recipe_steering_method(anti_sae, tiny_model, tiny_sae, tmp_path):
    from helpers import build_run_cfg

    run = build_run_cfg(tmp_path)
    ctx = task_vectors.SteeringContext(run, tiny_model, tiny_sae, None, None, torch.zeros(tiny_sae.cfg.d_sae), 1)
    targets = [(3, 1.0), (5, 0.5)]
    v = task_vectors.build_target_vector(ctx, anti_sae, targets)
    torch.testing.assert_close(v, -task_vectors.build_target_vector(ctx, "SAE", targets))
    assert get_method(anti_sae).from_targets and not get_method(anti_sae).needs_approximator


# --- a judge -----------------------------------------------------------------------------------


class WordCountJudge(Judge):
    """Scores a text by its length: 1 + its number of words, at most 10."""

    kind = "words"
    model = "count"

    async def _score_uncached(self, requests: Sequence[JudgeRequest], emit: Emit) -> None:
        for i, req in enumerate(requests):
            emit(i, JudgeResult.scored(min(10, 1 + len(req.text.split())), self.judge_id))


class WordCountBattleJudge(Judge):
    """The longer of a battle's two texts wins; equal lengths tie."""

    kind = "words_battle"
    model = "count"

    async def _score_uncached(self, requests: Sequence[JudgeRequest], emit: Emit) -> None:
        for i, req in enumerate(requests):
            a, b = (len(t.split()) for t in json.loads(req.text))
            emit(i, JudgeResult.scored(VERDICTS["A" if a > b else "B" if b > a else "tie"], self.judge_id))


@pytest.fixture
def words_judge() -> Iterator[str]:
    register_judge(
        JudgeKind(
            "words",
            judge=lambda cfg, cache, *, mean_logprob_fn, examples: WordCountJudge(cache),
            battle=lambda cfg, cache, *, mean_logprob_fn, examples: WordCountBattleJudge(cache),
        )
    )
    yield "words"
    del JUDGES["words"]
    with pytest.raises(ValueError, match=r"unknown eval.judge.kind 'words'; use one of \['offline', 'openai'\]"):
        make_judge(JudgeConfig().model_copy(update={"kind": "words"}), None)


def test_recipe_judge(words_judge):
    cfg = JudgeConfig().model_copy(update={"kind": words_judge})  # stands in for the Literal value
    judge = make_judge(cfg, None)
    req = JudgeRequest("wedding", "CAA", 1.0, "behaviour", "The text is about weddings.", "I think", "a b c")
    [result] = score_requests(judge, [req], progress=False)
    assert result.ok and result.score == 4 and result.judge == "words:count"
    battle = make_battle_judge(cfg, None)
    pairs = [("one two", "one"), ("one", "one two"), ("x", "y")]
    reqs = [
        battle_request(
            "wedding", "CAA", "SAE", text_a=a, text_b=b, criteria={"behaviour": "weddings"}, prompt="I think"
        )
        for a, b in pairs
    ]
    assert [r.score for r in score_requests(battle, reqs, progress=False)] == [1, 2, 3]
    # not prompted: the template neither decides its scores nor is recorded with them
    assert "words:count with the '-' template" in (judge_mismatch(cfg.model_copy(update={"model": "count"})) or "")


# --- a vector source ---------------------------------------------------------------------------


@pytest.fixture
def basis_source() -> Iterator[str]:
    """``basis``: the first ``count`` standard basis vectors of the residual stream."""

    @vector_source("basis")
    def _basis(x: SourceInputs) -> tuple[list[int], Tensor]:
        ids = list(range(int(x.spec.count or 0)))
        return ids, torch.eye(x.d_model)[ids] * 2.0  # build_vectors normalises

    yield "basis"
    del VECTOR_SOURCES["basis"]
    with pytest.raises(ConfigError, match=r"unknown effects.vectors.source 'basis'; use one of \['combined'"):
        get_vector_source("basis")


def _with_source(run: RunConfig, spec: VectorSource) -> RunConfig:
    return run.model_copy(update={"effects": run.effects.model_copy(update={"vectors": spec})})


def test_recipe_vector_source(basis_source, tiny_sae, tmp_path):
    from helpers import D_MODEL, build_run_cfg

    run = build_run_cfg(tmp_path)
    spec = VectorSource(source="random", count=3).model_copy(update={"source": basis_source})  # the Literal value
    ids, vecs = build_vectors(_with_source(run, spec), tiny_sae, D_MODEL)
    assert ids.tolist() == [0, 1, 2]
    assert torch.equal(vecs, torch.eye(D_MODEL)[:3])
