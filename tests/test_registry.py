"""The method registry: one entry per method, one builder per method with a vector, and every
reader of method names (config, tasks, evaluation, plots, published numbers) agrees with it.
The tables of judge kinds and vector sources: one entry per value of the config's Literal and
none other, and a name missing from a table fails naming the known ones (never a fallback)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from pydantic import BaseModel

from saets_utils.config import ConfigError, EvalConfig, JudgeConfig, VectorSource, load_config
from saets_utils.effects.vector_sources import VECTOR_SOURCES, build_vectors, vector_source
from saets_utils.evaluation import task_vectors
from saets_utils.evaluation.reference_numbers import published_table
from saets_utils.judges import JUDGES, get_judge_kind, make_battle_judge, make_judge, register_judge
from saets_utils.registry import DEFAULT_METHODS, METHOD_COLORS, METHODS, REGISTRY, get_method


def test_names_and_colours_are_unique():
    assert len(set(METHODS)) == len(METHODS) == len(REGISTRY)
    assert list(METHOD_COLORS) == list(METHODS) and len(set(METHOD_COLORS.values())) == len(METHODS)


def test_every_method_with_a_vector_has_exactly_one_builder():
    assert set(task_vectors.BUILDERS) == {m.name for m in REGISTRY if m.vector}
    with pytest.raises(ValueError, match="already has a builder"):
        task_vectors.builds("SAE")(lambda ctx, task, targets: None)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        task_vectors.builds("nope")
    with pytest.raises(ValueError, match="without a vector"):
        task_vectors.builds("prompt")(lambda ctx, task, targets: None)


def test_flags():
    assert [m.name for m in REGISTRY if m.needs_approximator] == [
        "SAE-TS",
        "pinverse",
        "rotation",
        "FGAA",
        "SAE-TS-nobias",
    ]
    assert task_vectors.TARGET_METHODS == ("SAE", "SAE-TS", "pinverse", "rotation", "SAE-TS-nobias")
    assert [m.name for m in REGISTRY if m.from_targets] == [
        "SAE",
        "SAE-TS",
        "pinverse",
        "rotation",
        "FGAA",
        "SAE-TS-nobias",
    ]
    assert [m.name for m in REGISTRY if not m.vector] == ["prompt"]


def test_config_defaults_to_and_validates_against_the_registry(tmp_path):
    assert EvalConfig().methods == list(DEFAULT_METHODS) == [m for m in METHODS if m not in ("random", "SAE-TS-nobias")]
    assert EvalConfig(methods=["SAE", "random"]).methods == ["SAE", "random"]  # controls are opt-in
    path = tmp_path / "run.yaml"
    path.write_text("sae: {hook_name: blocks.1.hook_resid_post}\neval: {methods: [CAA, SAE-TS, Pinv]}\n")
    with pytest.raises(ConfigError, match=r"eval.methods: .*unknown method\(s\) \['Pinv'\]"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown method 'Pinv'; use one of"):
        get_method("Pinv")


def test_published_numbers_use_our_names():
    assert set(published_table("gemma-2-2b")["method"]) == {"CAA", "SAE", "SAE-TS", "pinverse", "rotation"}
    assert set(published_table("gemma-2-9b")["method"]) <= set(METHODS)


def test_random_control_is_a_seeded_unit_vector_per_task(tiny_model, tiny_sae, tmp_path):
    from helpers import build_run_cfg
    from saets_utils.evaluation.task_vectors import SteeringContext, build_task_vectors
    from saets_utils.steering.tasks import Task

    def task(name: str) -> Task:
        return Task(
            name=name, behaviour="b", coherence="c", steering_prompt="p", positive=["a"] * 8, negative=["b"] * 8
        )

    run = build_run_cfg(tmp_path)
    ctx = SteeringContext(run, tiny_model, tiny_sae, None, None, torch.zeros(tiny_sae.cfg.d_sae), 1)

    def vec(c: SteeringContext, name: str) -> torch.Tensor:
        return build_task_vectors(task(name), c, ["random"]).vectors["random"]

    a = vec(ctx, "t")
    assert a.shape == (tiny_model.cfg.d_model,) and abs(float(a.norm()) - 1) < 1e-6
    assert torch.equal(a, vec(ctx, "t")) and not torch.equal(a, vec(ctx, "u"))
    other = SteeringContext(run.model_copy(update={"seed": 1}), tiny_model, tiny_sae, None, None, ctx.density, 1)
    assert not torch.equal(a, vec(other, "t"))


def literal_values(model: type[BaseModel], field: str) -> set[str]:
    """The values a config field's ``Literal`` annotation allows."""
    return set(get_args(model.model_fields[field].annotation))


def test_every_judge_kind_of_the_config_has_factories_and_vice_versa():
    assert literal_values(JudgeConfig, "kind") == set(JUDGES) == {"openai", "offline"}
    for kind in JUDGES.values():
        assert callable(kind.judge) and callable(kind.battle)
    # the facts 03 branches on, as before the table: the LLM reads the template, the offline judge the LM
    assert (get_judge_kind("openai").prompted, get_judge_kind("openai").needs_lm) == (True, False)
    assert (get_judge_kind("offline").prompted, get_judge_kind("offline").needs_lm) == (False, True)


def test_every_vector_source_of_the_config_has_a_builder_and_vice_versa():
    assert literal_values(VectorSource, "source") == set(VECTOR_SOURCES)


def test_unknown_judge_kind_fails_naming_the_known_ones():
    """No fallback to the offline judge: before the table, any kind but openai built it."""
    cfg = JudgeConfig().model_copy(update={"kind": "vllm"})  # past the Literal, as a stale table would be
    for factory in (make_judge, make_battle_judge):
        with pytest.raises(ValueError, match=r"unknown eval.judge.kind 'vllm'; use one of \['offline', 'openai'\]"):
            factory(cfg, None)
    with pytest.raises(ValueError, match="already registered"):
        register_judge(JUDGES["offline"])


def test_unknown_vector_source_fails_naming_the_known_ones(tiny_sae, tmp_path):
    from helpers import D_MODEL, build_run_cfg

    run = build_run_cfg(tmp_path)
    spec = VectorSource(source="random", count=3).model_copy(update={"source": "grid"})
    run = run.model_copy(update={"effects": run.effects.model_copy(update={"vectors": spec})})
    with pytest.raises(ConfigError, match=r"unknown effects.vectors.source 'grid'; use one of \['combined', "):
        build_vectors(run, tiny_sae, D_MODEL)
    with pytest.raises(ValueError, match="already has a builder"):
        vector_source("random")(VECTOR_SOURCES["random"])
