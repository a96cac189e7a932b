"""The real notebooks, executed by papermill on params/test.yaml (SmolLM2, an SAE trained here,
offline judge), with assertions on the files they write. Slow: minutes on 2 cores."""

import json
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from run_checks import check_approximator_metrics, check_eval_tables, check_vectors_follow_formulas
from saets_utils.config import load_config
from saets_utils.registry import METHODS
from saets_utils.report.pipeline import STEPS, _stamp_key, execute_notebook, is_current, run_pipeline

# The first test waits for the whole pipeline (the module's fixture): 01 alone took 12 min on a
# loaded 2-core machine, past pytest's default 1200 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
PARAMS = "params/test.yaml"


@pytest.fixture(scope="module")
def run():
    cfg = load_config(PARAMS)
    # a fresh run: work left by older code (another effects fingerprint) is refused by 01, rightly
    shutil.rmtree(cfg.results_dir, ignore_errors=True)
    run_pipeline(PARAMS, force=True, timeout_s=1200)
    return cfg


def test_effects_contract(run):
    t = load_file(run.results_dir / "effects.safetensors")
    n = run.effects.vectors.ids["stop"] - run.effects.vectors.ids["start"]
    assert t["effects"].dtype == torch.float32 and t["effects"].shape[0] == n
    assert t["vectors"].shape == (n, 576) and t["scales"].shape == (n,)
    assert t["vector_ids"].dtype == torch.int64 and torch.equal(t["vector_ids"], torch.arange(n))
    assert torch.allclose(t["vectors"].norm(dim=-1), torch.ones(n), atol=1e-4)
    table = pd.read_csv(run.results_dir / "effects_table.csv")
    assert list(table.columns) == ["id", "scale", "status", "seconds"] and len(table) == n
    meta = json.loads((run.results_dir / "effects_meta.json").read_text())
    assert meta["n_vectors"] == n and meta["sae"]["key"] == run.sae.key
    # steering at the calibrated scale changes the text, so the SAE means move (effects are not 0)
    ok = torch.isfinite(t["scales"])
    assert ok.any() and (t["effects"][ok].abs().sum(-1) > 0).all()
    assert ((t["scales"][ok] >= 0) & (t["scales"][ok] <= run.effects.scale_grid.stop)).all()


def test_pipeline_skips_current_steps(run, capsys):
    # before any test below rewrites a step's files by hand
    run_pipeline(PARAMS, steps=["02_train", "04_plots"])
    out = capsys.readouterr().out
    assert "02_train: up to date, skipped" in out and "04_plots: up to date, skipped" in out


# --- behaviour of 02 and 03, read from the files the pipeline wrote (before any test rewrites them) ---


def test_approximator_metrics_are_those_of_the_saved_approximator(run):
    a = load_file(run.results_dir / "approximator.safetensors")
    assert a["W"].shape == (576, 1024) and a["b"].shape == (1024,)
    assert a["rotation"].shape == (576, 576) and a["correction"].shape == (576,)
    check_approximator_metrics(run)


def test_saved_vectors_follow_their_method_formulas(run):
    """Each vector of eval/vectors.safetensors is its method's formula of the approximator 02 saved,
    the targets 03 recorded and the SAE (CAA: of the task's examples through the model)."""
    from saets_utils.models.loading import bos_id
    from saets_utils.session import load_model_and_sae

    model, sae = load_model_and_sae(run, "cpu")
    checked = check_vectors_follow_formulas(run, sae.W_dec, model, bos_id(model, run.model))
    methods = [m for m in run.eval.methods if m != "prompt"]
    assert checked == sorted(f"{t}/{m}" for t in run.eval.tasks for m in methods)
    assert set(run.eval.methods) == set(METHODS), "params/test.yaml evaluates every method, controls included"


def test_eval_tables_follow_from_the_scores(run):
    check_eval_tables(run)


def test_workers_give_the_same_effects(run):
    before = load_file(run.results_dir / "effects.safetensors")
    step = next(s for s in STEPS if s.name == "01_effects")
    execute_notebook(run, step, params_file=PARAMS, parameters={"cpu_workers": 2, "restart": True}, timeout_s=1200)
    after = load_file(run.results_dir / "effects.safetensors")
    logs = list((run.results_dir / "effects_work" / "logs").glob("*-w1.log"))
    assert logs, "cpu_workers=2 should have started two worker subprocesses"
    # Worker threads change float summation order; the secant search's stop rule can then take one
    # more step for a vector, which moves its scale by well under rtol (seen: 3e-5 relative).
    assert torch.allclose(before["scales"], after["scales"], rtol=1e-3, atol=1e-4)
    assert torch.allclose(before["effects"], after["effects"], atol=1e-3, equal_nan=True)
    # 01 re-run by hand: 01 and the steps reading its files are no longer current for the pipeline
    key = ""
    for s in STEPS:
        key = _stamp_key(run, s, key)
        assert not is_current(run, s, key), s.name


def test_eval_outputs_and_cached_rerun(run):
    ev = run.results_dir / "eval"
    samples = pd.read_json(ev / "samples.jsonl", lines=True)
    n_scales = len(run.eval.scale_grid.values())
    per_task = run.eval.samples_per_scale * (n_scales * (len(run.eval.methods) - 1) + 1)
    assert len(samples) == per_task * len(run.eval.tasks)
    assert samples["judge"].str.startswith("offline").all()
    scored = samples["behaviour"].notna() & samples["coherence"].notna()
    errors = samples["behaviour_error"].notna() | samples["coherence_error"].notna()
    assert (scored | errors).all()
    summary = pd.read_csv(ev / "summary.csv")
    assert set(summary["method"]) == set(run.eval.methods) and set(summary["task"]) == set(run.eval.tasks)
    assert (
        (summary["ci_low"] <= summary["max_product"] + 1e-9) & (summary["max_product"] <= summary["ci_high"] + 1e-9)
    ).all()
    vecs = load_file(ev / "vectors.safetensors")
    assert set(vecs) == {f"{t}/{m}" for t in run.eval.tasks for m in run.eval.methods if m != "prompt"}
    step = next(s for s in STEPS if s.name == "03_eval")
    execute_notebook(run, step, params_file=PARAMS, parameters={}, timeout_s=1200)
    stats = json.loads((ev / "judge_stats.json").read_text())
    assert stats["calls"] == 0 and stats["cache_hits"] == stats["requests"]


def test_figures_and_reports(run):
    figs = {p.name for p in (run.results_dir / "figures").glob("*.png")}
    assert {
        "product_vs_scale.png",
        "behaviour_coherence.png",
        "best_product.png",
        "approximator_diagnostics.png",
    } <= figs
    reports = run.results_dir / "reports"
    for s in STEPS:
        assert (reports / f"{s.name}.html").stat().st_size > 10_000
    index = (reports / "index.html").read_text()
    assert "01_effects.html" in index and "product_vs_scale.png" in index
    # feature dashboards from 01, linked from the index, labels next to ids
    assert (run.results_dir / "features" / "labels.csv").is_file() and "features.html" in index
    assert "top-activating contexts" in (reports / "features.html").read_text()


def test_manifest(run):
    m = json.loads((run.results_dir / "manifest.json").read_text())
    assert {"01_effects", "02_train", "03_eval"} <= set(m["steps"])
    assert m["params"]["sae"]["hook_name"] == run.sae.hook_name and m["packages"]["torch"]


def test_playground_notebook_builds_03s_vector_and_steers(run, tmp_path):
    """05 as shipped, plus one cell that clicks Generate and saves what the playground made: its
    controls list the run's tasks and methods, its default vector is the one 03 saved, and the
    steered texts differ from the unsteered ones."""
    import nbformat
    import papermill as pm

    from saets_utils.config import REPO_ROOT

    nb = nbformat.read(REPO_ROOT / "notebooks" / "05_playground.ipynb", as_version=4)
    out = tmp_path / "playground.json"
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import json\n"
            "from safetensors.torch import save_file\n"
            "r = playground.generate()\n"
            "key = (playground.task.value, playground.method.value)\n"
            f"save_file({{'v': playground.vectors[key].contiguous()}}, {str(tmp_path / 'vector.safetensors')!r})\n"
            f"open({str(out)!r}, 'w').write(json.dumps({{'key': key, 'error': playground.error, "
            "'tasks': list(playground.task.options), 'methods': list(playground.method.options), "
            "'unsteered': r.get('unsteered'), 'steered': r.get('steered')}))"
        )
    )
    nbformat.write(nb, tmp_path / "05_in.ipynb")
    pm.execute_notebook(
        str(tmp_path / "05_in.ipynb"),
        str(tmp_path / "05.ipynb"),
        parameters={"params_file": PARAMS},
        cwd=str(REPO_ROOT),
        kernel_name="python3",
        progress_bar=False,
        execution_timeout=600,
    )
    got = json.loads(out.read_text())
    assert got["error"] == ""
    assert got["tasks"][: len(run.eval.tasks)] == run.eval.tasks and got["methods"] == run.eval.methods
    task, method = got["key"]
    saved = load_file(run.results_dir / "eval" / "vectors.safetensors")[f"{task}/{method}"]
    torch.testing.assert_close(load_file(tmp_path / "vector.safetensors")["v"], saved, atol=1e-6, rtol=0)
    assert len(got["unsteered"]) == len(got["steered"]) == 3 and got["unsteered"] != got["steered"]


def test_eval_notebook_with_openai_judge_on_loopback(run, tmp_path):
    """03 with the `openai` judge against a real chat-completions server on 127.0.0.1."""
    import shutil

    from fake_openai_server import FakeOpenAIServer

    dst = tmp_path / run.name
    dst.mkdir()
    for name in (
        "effects.safetensors",
        "effects_table.csv",
        "effects_meta.json",
        "baseline.safetensors",
        "effects_samples.safetensors",
        "approximator.safetensors",
        "effects_work/plan.safetensors",  # 03's judge-free targeting reuses 01's plan
    ):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run.results_dir / name, dst / name)
    step = next(s for s in STEPS if s.name == "03_eval")
    with FakeOpenAIServer() as server:
        overrides = {
            "results_root": str(tmp_path),
            # one task, no judge-free targeting, few battles: this test is about the judge's calls
            "eval": {
                "judge": {"kind": "openai", "base_url": server.base_url, "model": "gpt-4o-mini"},
                "tasks": run.eval.tasks[:1],
                "targeting": False,
                "battle": {"per_pair": 2},
            },
        }
        execute_notebook(run, step, params_file=PARAMS, parameters={"overrides": overrides}, timeout_s=1200)
        system = [str((r["body"].get("messages") or [{}])[0].get("content", "")) for r in server.requests]
        n_battles = sum('"winner"' in m for m in system)  # the pairwise battles 03 ends with
        n_calls = server.n_requests - n_battles
    battles = pd.read_json(dst / "eval" / "battles.jsonl", lines=True)
    assert 0 < n_battles <= len(battles)  # identical battles are asked once
    samples = pd.read_json(dst / "eval" / "samples.jsonl", lines=True)
    assert (samples["judge"] == "openai:gpt-4o-mini").all()
    # one call per distinct (criterion, text): none cached yet, identical requests sent once (the
    # coherence criterion is shared by tasks, and unsteered texts are shared by methods)
    from saets_utils.steering.tasks import load_task

    crit = {t: load_task(t) for t in run.eval.tasks}
    distinct = {
        (k, getattr(crit[t], k), x)
        for t, x in zip(samples["task"], samples["text"])
        for k in ("behaviour", "coherence")
    }
    assert n_calls == len(distinct)
    assert samples["behaviour"].between(0, 1).all() and samples["coherence"].between(0, 1).all()
