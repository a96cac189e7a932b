"""The method registry: one entry per method, one builder per method with a vector, and every
reader of method names (config, tasks, evaluation, plots, published numbers) agrees with it."""

from __future__ import annotations

import pytest
import torch

from saets_utils.config import ConfigError, EvalConfig, load_config
from saets_utils.evaluation import task_vectors
from saets_utils.evaluation.reference_numbers import published_table
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
    assert [m.name for m in REGISTRY if m.needs_approximator] == ["SAE-TS", "pinverse", "rotation", "FGAA"]
    assert task_vectors.TARGET_METHODS == ("SAE", "SAE-TS", "pinverse", "rotation")
    assert [m.name for m in REGISTRY if m.from_targets] == ["SAE", "SAE-TS", "pinverse", "rotation", "FGAA"]
    assert [m.name for m in REGISTRY if not m.vector] == ["prompt"]


def test_config_defaults_to_and_validates_against_the_registry(tmp_path):
    assert EvalConfig().methods == list(DEFAULT_METHODS) == [m for m in METHODS if m != "random"]
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
