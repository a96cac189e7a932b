"""The method registry: one entry per method, one builder per method with a vector, and every
reader of method names (config, tasks, evaluation, plots, published numbers) agrees with it."""

from __future__ import annotations

import pytest

from saets_utils.config import ConfigError, EvalConfig, load_config
from saets_utils.evaluation import task_vectors
from saets_utils.evaluation.reference_numbers import published_table
from saets_utils.registry import METHOD_COLORS, METHODS, REGISTRY, get_method


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
    assert EvalConfig().methods == list(METHODS)
    path = tmp_path / "run.yaml"
    path.write_text("sae: {hook_name: blocks.1.hook_resid_post}\neval: {methods: [CAA, SAE-TS, Pinv]}\n")
    with pytest.raises(ConfigError, match=r"eval.methods: .*unknown method\(s\) \['Pinv'\]"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown method 'Pinv'; use one of"):
        get_method("Pinv")


def test_published_numbers_use_our_names():
    assert set(published_table("gemma-2-2b")["method"]) == {"CAA", "SAE", "SAE-TS", "pinverse", "rotation"}
    assert set(published_table("gemma-2-9b")["method"]) <= set(METHODS)
