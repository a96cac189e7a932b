"""Task files: the nine reference goals load with the paper's target features; bad files fail
with a message naming the field."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from saets_utils.config import EvalConfig
from saets_utils.evaluation.reference_numbers import REFERENCE_TASKS
from saets_utils.registry import METHODS
from saets_utils.steering.tasks import (
    TASKS_DIR,
    Task,
    TaskError,
    available_tasks,
    check_target_ids,
    load_task,
    load_tasks,
)

K2B, K9B = "gemma-scope-2b-16k-l0_82", "gemma-scope-9b-16k-l0_130"
# docs/reference.md, "Target features of the nine tasks" (praise on 2B: see test_praise_targets_per_method).
EXPECTED = {
    "anger": ([(4111, 1.0)], [(441, 1.0)]),
    "christian": ([(5483, 1.0)], [(6387, 1.0)]),
    "conspiracy": ([(8710, 1.0)], [(3358, 1.0)]),
    "french": ([(8392, 0.5), (15769, 0.5)], [(11691, 1.0)]),
    "london": ([(14455, 1.0)], [(6915, 0.3), (9983, 0.4), (11748, 0.3)]),
    "love": ([(16036, 0.5), (7863, 0.5)], [(12983, 1.0)]),
    "praise": ([(2054, 1.0)], [(9946, 1.0)]),
    "want_to_die": ([(16226, 0.5), (9679, 0.5)], [(11670, 1.0)]),
    "wedding": ([(4230, 1.0)], [(2822, 1.0)]),
}


def test_reference_tasks_are_the_default_eval_tasks():
    assert set(EvalConfig().tasks) == set(REFERENCE_TASKS) == set(EXPECTED)
    assert set(EXPECTED) <= set(available_tasks())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_task_file_loads_with_reference_targets(name):
    task = load_task(name)
    assert task.name == name
    assert len(task.positive) == len(task.negative) >= 8
    assert len(set(task.positive)) == len(task.positive) and not set(task.positive) & set(task.negative)
    assert task.behaviour and task.coherence and task.steering_prompt
    t2b, t9b = EXPECTED[name]
    assert task.targets_for(K2B, "SAE-TS") == t2b
    for method in METHODS:
        assert task.targets_for(K9B, method) == t9b
    assert task.discover.k >= 1


def test_praise_targets_per_method():
    praise = load_task("praise")
    assert praise.targets_for(K2B, "SAE") == [(11919, 1.0)]
    for method in ("SAE-TS", "CAA", "pinverse", "rotation", "FGAA"):
        assert praise.targets_for(K2B, method) == [(2054, 1.0)]


def test_unlisted_sae_means_discover():
    anger = load_task("anger")
    assert anger.targets_for(None, "SAE") is None
    assert anger.targets_for("trained/blocks.3.hook_resid_post/topk-4608-k32", "SAE") is None


def test_load_tasks_keeps_order():
    assert [t.name for t in load_tasks(["wedding", "anger"])] == ["wedding", "anger"]


def test_unknown_task_lists_available():
    with pytest.raises(TaskError) as err:
        load_task("angry")
    msg = str(err.value)
    assert "angry" in msg and "anger" in msg and "wedding" in msg


def _write(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((TASKS_DIR / "anger.yaml").read_text())
    raw.update(name="bad", **changes)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"colour": "red"}, ["colour", "unknown key"]),
        ({"targets": {K2B: [[4111, 0.0]]}}, ["targets", "4111", "non-zero"]),
        ({"targets": {K2B: [[4111, float("nan")]]}}, ["targets", "finite"]),
        ({"targets": {K2B: [[-3, 1.0]]}}, ["targets", "-3", "negative"]),
        ({"targets": {K2B: {"SAE": [[1, 1.0]]}}}, ["targets", "default"]),
        ({"targets": {K2B: {"default": [[1, 1.0]], "SAETS": [[2, 1.0]]}}}, ["targets", "SAETS"]),
        ({"negative": ["only one"] * 8 + ["x"]}, ["positive has 10", "negative has 9"]),
        ({"positive": ["too few"] * 3, "negative": ["too few"] * 3}, ["positive", "at least 8"]),
        ({"discover": {"k": 0}}, ["discover.k"]),
    ],
)
def test_bad_task_file_names_the_field(tmp_path, changes, words):
    with pytest.raises(TaskError) as err:
        load_task(_write(tmp_path, **changes))
    msg = str(err.value)
    assert "bad.yaml" in msg
    for w in words:
        assert w in msg, msg


def test_name_must_match_file(tmp_path):
    path = _write(tmp_path)
    path.rename(tmp_path / "other.yaml")
    with pytest.raises(TaskError, match="file stem"):
        load_task(tmp_path / "other.yaml")


def test_check_target_ids():
    check_target_ids([(0, 1.0), (63, 0.5)], 64, "anger")
    with pytest.raises(TaskError, match=r"anger.*\[64\].*d_sae=64"):
        check_target_ids([(3, 1.0), (64, 1.0)], 64, "anger")


def test_task_model_is_strict():
    with pytest.raises(ValidationError):
        Task.model_validate({"name": "x"})
