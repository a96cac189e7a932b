"""The reference path end to end, shrunk: params/gemma-ci.yaml runs notebooks 01 -> 04 (and the
battle judge) with a tiny Gemma-2-shaped model, random JumpReLU SAEs written as Gemma Scope
params.npz, local text and the loopback judge. params/gemma-2-2b.yaml may differ from it only in
those fields, so the reference params cannot drift untested."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from run_checks import check_approximator_metrics, check_eval_tables, check_vectors_follow_formulas
from saets_utils.config import REPO_ROOT, load_config

REFERENCE, CI = "params/gemma-2-2b.yaml", "params/gemma-ci.yaml"

# What gemma-ci.yaml may change: the model, the SAEs, the loss text, sizes, the judge endpoint.
ALLOWED = {
    "model",
    "sae",
    "text",
    "effects.vectors.sae",
    "effects.vectors.ids",
    "effects.loss_chunks",
    "effects.samples_per_prompt",
    "effects.baseline_multiplier",
    "approximator.holdout",
    "approximator.bootstrap",
    "eval.tasks",
    "eval.samples_per_scale",
    "eval.bootstrap",
    "eval.battle.per_pair",
    "eval.battle.bootstrap",
    "eval.judge.base_url",
}


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ALLOWED:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def test_ci_params_differ_from_the_reference_only_in_allowed_fields():
    ref = json.loads(load_config(REFERENCE).model_dump_json())
    ci = json.loads(load_config(CI).model_dump_json())
    ref.pop("name"), ci.pop("name")
    a, b = _flatten(ref), _flatten(ci)
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert changed <= ALLOWED, f"gemma-ci.yaml differs from gemma-2-2b.yaml in {sorted(changed - ALLOWED)}"
    # what must stay the reference's
    assert ci["model"]["dtype"] == ref["model"]["dtype"] == "bfloat16"
    assert a["effects.loss_chunking"] == "concatenate" and a["eval.stop_at_eos"] is True
    assert a["eval.judge.template"] == "reference" and a["approximator.fit"] == "adam"
    raw = yaml.safe_load((REPO_ROOT / CI).read_text())
    assert "127.0.0.1" in raw["eval"]["judge"]["base_url"]


@pytest.fixture(scope="module")
def ci_run():
    from fake_openai_server import FakeOpenAIServer
    from saets_utils.models.tiny import write_reference_ci_assets
    from saets_utils.report.pipeline import STEPS, execute_notebook
    from saets_utils.steering.tasks import load_tasks

    cfg = load_config(CI)
    texts = [
        s for t in load_tasks(["anger", "london", "love", "wedding", "french"]) for s in (*t.positive, *t.negative)
    ]
    write_reference_ci_assets(REPO_ROOT / "results" / "gemma-ci-assets", texts)
    shutil.rmtree(cfg.results_dir, ignore_errors=True)
    with FakeOpenAIServer() as server:
        for step in STEPS:
            params = {"overrides": {"eval": {"judge": {"base_url": server.base_url}}}} if step.name == "03_eval" else {}
            execute_notebook(cfg, step, params_file=CI, parameters=params, timeout_s=900)
        requests = list(server.requests)
    return cfg, requests


@pytest.mark.slow
def test_reference_shaped_run(ci_run):
    run, requests = ci_run
    d = run.results_dir
    # 01: the reference's concatenated loss rows, calibrated against the absolute target
    plan = load_file(d / "effects_work" / "plan.safetensors")
    assert plan["loss_tokens"].shape == (4, 32) and (plan["loss_tokens"][:, 0] == 1).all()
    table = pd.read_csv(d / "effects_table.csv")
    assert len(table) == 8 and (table["status"] == "ok").sum() >= 4
    eff = load_file(d / "effects.safetensors")
    assert eff["effects"].shape == (8, 16384) and torch.isfinite(eff["scales"]).all()
    # 02: the reference's Adam training; its metrics are those of the saved approximator
    m = check_approximator_metrics(run)
    assert m["fit"] == "adam"
    # 03: the loopback judge, asked with the reference template; battles rated
    samples = pd.read_json(d / "eval" / "samples.jsonl", lines=True)
    assert samples["judge"].str.startswith("openai:gpt-4o-mini").all()
    assert samples["behaviour"].notna().all() and samples["coherence"].notna().all()
    systems = [r["body"]["messages"][0]["content"] for r in requests]
    assert any("The text uses angry words or expresses anger." in s for s in systems)
    assert any('"winner"' in s for s in systems)
    ratings = pd.read_csv(d / "eval" / "battle_ratings.csv")
    assert set(ratings["method"]) == set(run.eval.methods)
    stats = json.loads((d / "eval" / "battle_stats.json").read_text())
    assert stats["judge"] == "openai_battle:gpt-4o-mini" and stats["n_battles"] == 21 * 2
    # 03's vectors follow their formulas (targets listed for Gemma Scope, bfloat16 model) and its
    # tables follow from the scores
    from saets_utils.models.loading import bos_id
    from saets_utils.session import load_model_and_sae

    model, sae = load_model_and_sae(run, "cpu")
    checked = check_vectors_follow_formulas(run, sae.W_dec, model, bos_id(model, run.model))
    assert len(checked) == len(run.eval.tasks) * (len(run.eval.methods) - 1)  # every method but prompt
    check_eval_tables(run)
    # 04: the reference's figures
    figs = {p.name for p in (d / "figures").glob("*.png")}
    assert {"pareto.png", "metric_lines_SAE-TS.png", "battle_ratings.png", "product_vs_scale.png"} <= figs
