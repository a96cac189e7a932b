"""Each step's outputs replace the previous run's or are absent: 03 stopped by judge
failures and 02 after a failed fit leave no file of an earlier run beside their own; and notebook 04
and the effect explorer refuse, naming the step to re-run, files that are not the ones the step's
last finished run recorded in manifest.json (interrupted, failed, changed, or read by a later step
before an earlier one re-ran)."""

from __future__ import annotations

import json
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
from saets_utils.manifest import STEP_OUTPUTS, StaleInputs, begin_step, check_current, record_step
from saets_utils.report.explore import load_run_effects
from saets_utils.report.figures import make_all_figures
from saets_utils.report.widgets import EffectExplorer
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


# --- 04 and the explorer read only what the last finished step recorded ---------------------------


def test_step_files_are_those_the_steps_write():
    assert STEP_OUTPUTS["02_train"] == APPROX_OUTPUTS
    assert STEP_OUTPUTS["03_eval"] == tuple(f"eval/{n}" for n in EVAL_OUTPUTS)


def _write(run, files, text: str) -> None:
    for f in files:
        p = run.results_dir / f
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_the_explorer_and_04_refuse_01_files_of_an_interrupted_or_changed_run(tmp_path, tiny_model, tiny_sae):
    from saets_utils.effects.runner import run_effects

    run = build_run_cfg(tmp_path, effects={"vectors": {"source": "decoder_rows", "ids": [3, 5]}})
    run_effects(run, tiny_model, tiny_sae)  # library use: no manifest, nothing to check against
    assert len(load_run_effects(run).vector_ids) == 2
    begin_step(run, "01_effects")
    run_effects(run, tiny_model, tiny_sae)
    record_step(run, "01_effects", "cpu")
    assert set(STEP_OUTPUTS["01_effects"]) == {
        p.name for p in run.results_dir.iterdir() if p.is_file() and p.name != "manifest.json"
    }  # every file 01 writes is recorded
    eff = load_run_effects(run)
    EffectExplorer(eff, tokenizer=None, k=3, run=run)
    assert {p.name for p in make_all_figures(run)} == {"effect_profile_3.png", "effect_profile_5.png"}

    begin_step(run, "01_effects")  # a new 01 starts and is killed: its earlier files are still there
    refused = r"started at .* has not finished \(interrupted, failed or running\); re-run 01_effects$"
    with pytest.raises(StaleInputs, match="the effect explorer refuses .*" + refused):
        load_run_effects(run)
    with pytest.raises(StaleInputs, match="the effect explorer refuses .*" + refused):
        EffectExplorer(eff, tokenizer=None, k=3, run=run)
    with pytest.raises(StaleInputs, match="notebook 04 refuses .*" + refused):
        make_all_figures(run)
    EffectExplorer(eff, tokenizer=None, k=3)  # effects handed over without a run: not the explorer's to check

    record_step(run, "01_effects", "cpu")
    table = run.results_dir / "effects_table.csv"
    table.write_text(table.read_text() + "\n")
    with pytest.raises(
        StaleInputs, match=r"effects_table.csv, written by 01_effects at .*, has changed since; re-run 01_effects$"
    ):
        load_run_effects(run)
    table.unlink()
    with pytest.raises(
        StaleInputs, match=r"effects_table.csv, written by 01_effects at .*, is missing; re-run 01_effects$"
    ):
        load_run_effects(run)


def test_04_refuses_files_of_a_failed_stale_or_unrecorded_step(tmp_path, capsys):
    run = build_run_cfg(tmp_path)
    check = lambda: check_current(run, ("01_effects", "02_train", "03_eval"), "notebook 04")
    _write(run, STEP_OUTPUTS["01_effects"][:1], "effects")
    _write(run, STEP_OUTPUTS["02_train"][:2], "approximator")
    check()  # no manifest: files written by library calls, not the notebooks
    record_step(run, "01_effects", "cpu")
    with pytest.raises(StaleInputs, match=r"approximator.safetensors is there but no finished 02_train recorded it"):
        check()
    record_step(run, "02_train", "cpu")
    check()  # 03 never ran and left no file: a partial run
    ev = ["eval/samples.jsonl", "eval/summary.csv", "eval/by_scale.csv"]
    _write(run, ev, "03's")
    record_step(run, "03_eval", "cpu")
    check()

    begin_step(run, "03_eval")  # 03 stops on judge failures: its earlier tables gone, new samples
    for f in ev[1:]:
        (run.results_dir / f).unlink()
    _write(run, ev[:1], "new samples")
    with pytest.raises(StaleInputs, match=r"03_eval started at .* has not finished .*; re-run 03_eval$"):
        make_all_figures(run)  # refused before drawing anything

    _write(run, ev, "03's")
    record_step(run, "03_eval", "cpu")
    _write(run, ["eval/battle_ratings.csv"], "someone else's")
    with pytest.raises(StaleInputs, match=r"eval/battle_ratings.csv was not written by 03_eval, which finished at"):
        check()
    (run.results_dir / "eval/battle_ratings.csv").unlink()

    _write(run, STEP_OUTPUTS["02_train"][:1], "refitted")  # 02 re-run after 03
    record_step(run, "02_train", "cpu")
    with pytest.raises(
        StaleInputs,
        match=r"03_eval \(finished at .*\) read an earlier approximator.safetensors, which 02_train has replaced "
        r"since; re-run 03_eval$",
    ):
        check()
    _write(run, STEP_OUTPUTS["01_effects"][:1], "re-measured")  # and 01 too: the earliest step is named
    with pytest.raises(
        StaleInputs,
        match=r"effects.safetensors, written by 01_effects at .*, has changed since; "
        r"re-run 01_effects \(then 02_train, 03_eval, which read its files\)$",
    ):
        check()

    manifest = run.results_dir / "manifest.json"  # written before steps recorded their files
    m = json.loads(manifest.read_text())
    for entry in m["steps"].values():
        del entry["outputs"], entry["inputs"]
    manifest.write_text(json.dumps(m))
    check()
    assert "01_effects was recorded before steps recorded their files" in capsys.readouterr().out
