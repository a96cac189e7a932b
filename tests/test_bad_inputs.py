"""Bad inputs fail at config load, before any model is loaded, naming the field and the fix.

One table: each row is a params file (YAML text, so syntax errors are rows too), the field the
message must name and a piece of the fix it must give. The unreachable loss target, which needs the
unsteered loss, is checked on the tiny model before 01 measures any vector.
"""

from __future__ import annotations

import pytest

from helpers import HOOK, build_run_cfg
from saets_utils.config import REPO_ROOT, ConfigError, LossTarget, load_config

SAE = f"sae: {{hook_name: {HOOK}}}\n"
GRID = "effects: {{scale_grid: {{{}}}}}\n"

# (id, params YAML, what the message must name, what fix it must give)
CASES: list[tuple[str, str, str, str]] = [
    ("unknown_key", SAE + "bogus: 1\n", "bogus", "remove it"),
    ("yaml_unclosed_flow", "sae: {hook_name: x\nseed: 1\n", "line 2, column 5", "fix the file there"),
    ("yaml_bad_indent", SAE + "eval:\n  tasks: [anger]\n   prompt: x\n", "line 4, column 4", "YAML syntax error"),
    ("yaml_tab", SAE + "eval:\n\ttasks: [anger]\n", "line 3, column 1", "YAML syntax error"),
    ("task_unknown", SAE + "eval: {tasks: [angr]}\n", "eval.tasks", "use one of anger"),
    ("task_duplicate", SAE + "eval: {tasks: [anger, london, anger]}\n", "eval.tasks", "list each task once"),
    ("task_dup_by_path", SAE + "eval: {tasks: [anger, params/tasks/anger.yaml]}\n", "eval.tasks", "once"),
    ("task_path_like", SAE + "eval: {tasks: [../tasks/anger]}\n", "eval.tasks", "path ending in .yaml"),
    ("task_path_missing", SAE + "eval: {tasks: [params/tasks/nope.yaml]}\n", "eval.tasks", "path from the repo root"),
    ("tasks_empty", SAE + "eval: {tasks: []}\n", "eval.tasks", "list task names"),
    (
        "targets_key_missing_in_task",
        f"sae: {{hook_name: {HOOK}, targets_key: my-sae-16k}}\neval: {{tasks: [anger]}}\n",
        "my-sae-16k",
        "eval.discover_missing_targets: true",
    ),
    ("loss_target_negative", SAE + "effects: {loss_target: {kind: relative, value: -0.5}}\n", "loss_target", "0.5"),
    ("loss_target_abs_zero", SAE + "effects: {loss_target: {kind: absolute, value: 0}}\n", "loss_target", "> 0"),
    ("prompts_empty", SAE + "effects: {prompts: []}\n", "effects.prompts", "at least 1 item"),
    ("grid_nan", SAE + GRID.format("start: 0, stop: .nan, step: 10"), "effects.scale_grid.stop", "finite number"),
    ("grid_inf", SAE + "eval: {scale_grid: {start: 0, stop: .inf, step: 10}}\n", "eval.scale_grid.stop", "finite"),
    ("grid_start_eq_stop", SAE + GRID.format("start: 0, stop: 0, step: 10"), "effects.scale_grid", "stop > start"),
    ("grid_start_positive", SAE + GRID.format("start: 20, stop: 100, step: 10"), "scale_grid", "use start: 0"),
    ("grid_millions", SAE + GRID.format("start: 0, stop: 300, step: 0.0001"), "scale_grid", "raise step"),
    ("temperature_inf", SAE + "eval: {sampling: {temperature: .inf}}\n", "eval.sampling.temperature", "finite"),
    ("sae_ts_lambda_nan", SAE + "approximator: {sae_ts_lambda: .nan}\n", "approximator.sae_ts_lambda", "finite"),
    ("ridge_lambda_nan", SAE + "approximator: {ridge_lambda: .nan}\n", "approximator.ridge_lambda", "finite"),
    (
        "holdout_all_vectors",
        SAE + "effects: {vectors: {ids: {start: 0, stop: 8}}}\napproximator: {holdout: 8}\n",
        "approximator.holdout",
        "use holdout < 8",
    ),
    (
        "holdout_over_random_count",
        SAE + "effects: {vectors: {source: random, count: 50}}\n",  # default holdout 100
        "approximator.holdout",
        "use holdout < 50",
    ),
    ("gpus_in_yaml", SAE + "gpus: 4\n", "gpus", "--gpus N"),
    ("name_in_yaml", SAE + "name: other\n", "'name'", "file stem"),
    ("method_unknown", SAE + "eval: {methods: [CAA, SAE-TX]}\n", "eval.methods", "saets_utils/registry.py"),
    ("method_duplicate", SAE + "eval: {methods: [CAA, CAA]}\n", "eval.methods", "each method once"),
    (
        "judge_url_userinfo",
        SAE + "eval: {judge: {kind: openai, base_url: 'https://bob:s3cr3t@llm.example.org/v1'}}\n",
        "eval.judge.base_url",
        "api_key_env",
    ),
    (
        "judge_url_query_key",
        SAE + "eval: {judge: {kind: openai, base_url: 'https://llm.example.org/v1?api_key=s3cr3t'}}\n",
        "eval.judge.base_url",
        "api_key_env",
    ),
    ("judge_url_scheme", SAE + "eval: {judge: {base_url: 'llm.example.org:8000'}}\n", "base_url", "http://127.0.0.1"),
    (
        "judge_openai_key_elsewhere",
        SAE + "eval: {judge: {base_url: 'http://10.0.0.5:8000/v1', api_key_env: OPENAI_API_KEY}}\n",
        "OPENAI_API_KEY",
        "name another variable",
    ),
    ("judge_env_name", SAE + "eval: {judge: {api_key_env: 'my key'}}\n", "api_key_env", "e.g. VLLM_API_KEY"),
    ("judge_failed_share", SAE + "eval: {judge: {max_failed_share: 1.5}}\n", "max_failed_share", "less than or equal"),
    ("judge_breaker", SAE + "eval: {judge: {circuit_breaker: 0}}\n", "circuit_breaker", "greater than or equal to 1"),
    ("device", SAE + "device: gpu\n", "device", "'cuda[:N]'"),
]


def test_table_has_at_least_25_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "text", "field", "fix"), CASES, ids=[c[0] for c in CASES])
def test_bad_params_fail_at_load_naming_field_and_fix(tmp_path, case, text, field, fix):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert field in msg and fix in msg, msg
    assert "s3cr3t" not in msg  # a credential is never echoed
    if case.startswith("yaml"):
        assert str(path) in msg


@pytest.mark.parametrize("stem", ["..", ".hidden", "a\\b", "my run", "-x"])
def test_run_name_is_validated(tmp_path, stem):
    path = tmp_path / f"{stem}.yaml"
    path.write_text(SAE)
    with pytest.raises(ConfigError, match=r"run name .*rename the params file"):
        load_config(path)


def test_task_file_yaml_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "mytask.yaml"
    bad.write_text("name: mytask\nbehaviour: [unclosed\n")
    path = tmp_path / "run.yaml"
    path.write_text(f"sae: {{hook_name: {HOOK}}}\neval: {{tasks: ['{bad}']}}\n")
    with pytest.raises(ConfigError, match=rf"YAML syntax error in {bad}, line 3, column 1"):
        load_config(path)


def test_discover_missing_targets_makes_the_fallback_explicit(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"sae: {{hook_name: {HOOK}, targets_key: my-sae-16k}}\neval: {{tasks: [anger], discover_missing_targets: true}}\n"
    )
    assert load_config(path).eval.discover_missing_targets


def test_unreachable_absolute_loss_target_fails_before_any_vector(tmp_path, tiny_model, tiny_sae, monkeypatch):
    from saets_utils.effects import runner
    from saets_utils.effects.calibration import check_loss_target
    from saets_utils.effects.plan import work_dir

    check_loss_target(LossTarget(kind="absolute", value=4.0), 3.2, [0, 10])  # reachable: no error
    with pytest.raises(ConfigError, match=r"below the unsteered loss 3\.200.*absolute value above 3\.20"):
        check_loss_target(LossTarget(kind="absolute", value=3.0), 3.2, [0, 10])

    def no_baseline(*a, **k):
        raise AssertionError("measured the baseline before checking the loss target")

    monkeypatch.setattr(runner, "measure_baseline", no_baseline)
    run = build_run_cfg(tmp_path, effects={"loss_target": {"kind": "absolute", "value": 0.01}})
    with pytest.raises(ConfigError, match=r"effects\.loss_target \(absolute 0\.01\).*unsteered loss"):
        runner.prepare_plan(run, tiny_model, tiny_sae)
    assert not (work_dir(run) / "plan.safetensors").exists()


def test_pipeline_refuses_bad_params_before_any_notebook(tmp_path, monkeypatch):
    from saets_utils.report import pipeline

    monkeypatch.setattr(pipeline, "execute_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    path = tmp_path / "run.yaml"
    path.write_text(SAE + "eval: {tasks: [angr]}\n")
    assert pipeline.main([str(path)]) == 1


PARAMS_DIR = REPO_ROOT / "params"
SHIPPED = sorted(PARAMS_DIR.glob("*.yaml")) + sorted(PARAMS_DIR.glob("study/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(PARAMS_DIR)))
def test_shipped_params_load_with_their_tasks_and_commands(path):
    """Each shipped params file (the study pilots included) loads as the run named by its file stem,
    every task it evaluates loads with criteria and contrastive examples, and every ``python -m``
    command its comments give names a module that exists."""
    import importlib.util
    import re

    from saets_utils.steering.tasks import load_tasks

    run = load_config(path)
    assert run.name == path.stem and run.results_dir == REPO_ROOT / "results" / path.stem
    tasks = load_tasks(run.eval.tasks)
    assert len(tasks) == len(run.eval.tasks)
    for t in tasks:
        assert t.behaviour and t.coherence and t.positive and t.negative, t.name
    modules = re.findall(r"^#.*python -m ([\w.]+)", path.read_text(), flags=re.M)
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"{path.name} names python -m {module}"
