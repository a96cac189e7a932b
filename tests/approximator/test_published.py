"""Published artifacts in the reference's format (saets_utils/approximator/published.py): small files
in the exact formats, read through huggingface_hub's real download path from a local cache laid out as
the Hub lays it out (offline mode), and from a local path; each bad file fails naming itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from saets_utils.approximator.model import EffectApproximator, rotation_matrix
from saets_utils.approximator.published import (
    PublishedFileError,
    artifact_path,
    load_published_adapter,
    published_effects,
    read_adapter_file,
    read_effects_file,
    safe_load,
    training_effects,
)
from saets_utils.approximator.training import train_approximator
from saets_utils.config import Artifact, ConfigError, load_config
from saets_utils.effects.store import Effects
from tests.helpers import build_run_cfg

REPO = "schalnev/sae-ts-effects"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
D_MODEL, D_SAE, N = 8, 12, 40


def hub_cache(root: Path, files: dict[str, object], repo: str = REPO, repo_type: str = "dataset") -> Path:
    """``root`` laid out as huggingface_hub's cache holds ``repo`` at ``main``: refs/main names the
    commit, snapshots/<commit>/<file> holds each file (torch.save'd, as the reference wrote them)."""
    base = root / f"{repo_type}s--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(COMMIT)
    snap = base / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    for name, obj in files.items():
        torch.save(obj, snap / name)
    return root


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A Hub cache at tmp_path/hub, used offline (no request leaves the machine)."""
    import huggingface_hub.constants as C

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def reference_arrays(seed: int = 0, n: int = N, d_model: int = D_MODEL, d_sae: int = D_SAE):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d_model, generator=g) * 7.0  # not unit: the reader normalises
    W = torch.randn(d_model, d_sae, generator=g)
    b = torch.rand(d_sae, generator=g)
    x = features / features.norm(dim=-1, keepdim=True)
    effects = x @ W + b + 0.05 * torch.randn(n, d_sae, generator=g)
    return features, effects, W, b


def test_effects_load_through_the_hub_cache_offline_and_from_a_path(offline_hub, tmp_path):
    features, effects, _, _ = reference_arrays()
    hub_cache(offline_hub, {"effects_2b.pt": {"features": features, "effects": effects}})
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    hub = Artifact(repo_id=REPO, filename="effects_2b.pt", repo_type="dataset")
    path = artifact_path(hub)
    assert path.is_file() and COMMIT in str(path)
    e = published_effects(hub, D_MODEL, D_SAE)
    assert torch.allclose(e.vectors.norm(dim=-1), torch.ones(N))
    assert torch.allclose(e.vectors * e.scales[:, None], features, atol=1e-5)
    assert torch.equal(e.effects, effects) and e.halves is None and bool(e.valid.all())
    assert "no noise ceiling" in e.meta["note"] and REPO in e.meta["note"]
    local = tmp_path / "effects.pt"
    torch.save({"features": features, "effects": effects}, local)
    e2 = published_effects(Artifact(path=str(local)), D_MODEL, D_SAE)
    assert torch.equal(e2.vectors, e.vectors) and torch.equal(e2.effects, e.effects)


def test_a_revision_pins_the_commit_and_a_missing_file_fails_offline(offline_hub):
    features, effects, _, _ = reference_arrays()
    hub_cache(offline_hub, {"effects_2b.pt": {"features": features, "effects": effects}})
    assert artifact_path(Artifact(repo_id=REPO, filename="effects_2b.pt", revision=COMMIT)).is_file()
    with pytest.raises(FileNotFoundError, match=r"effects_9b\.pt"):
        artifact_path(Artifact(repo_id=REPO, filename="effects_9b.pt"))


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_file_needing_full_unpickling_is_refused_naming_it(tmp_path):
    p = tmp_path / "adapter_2b_layer_12.pt"
    torch.save({"W": torch.zeros(D_MODEL, D_SAE), "b": torch.zeros(D_SAE), "extra": _Evil()}, p)
    with pytest.raises(PublishedFileError, match=r"refused .*adapter_2b_layer_12\.pt.*full unpickling"):
        safe_load(p)
    with pytest.raises(PublishedFileError, match=r"adapter_2b_layer_12\.pt"):
        read_adapter_file(p, D_MODEL, D_SAE)


def test_missing_keys_and_wrong_shapes_fail_clearly(tmp_path):
    features, effects, W, b = reference_arrays()
    p = tmp_path / "effects_2b.pt"
    torch.save({"features": features}, p)
    with pytest.raises(PublishedFileError, match=r"missing key\(s\) \['effects'\]"):
        read_effects_file(p, D_MODEL, D_SAE)
    torch.save({"features": features, "effects": effects[:-1]}, p)
    with pytest.raises(PublishedFileError, match="same n"):
        read_effects_file(p, D_MODEL, D_SAE)
    a = tmp_path / "adapter_9b_layer_12.pt"  # a "9B" adapter (wider d_model, other d_sae) against the "2B" SAE
    torch.save({"W": torch.zeros(D_MODEL + 4, D_SAE + 4), "b": torch.zeros(D_SAE + 4)}, a)
    with pytest.raises(
        PublishedFileError, match=rf"d_model {D_MODEL + 4}, d_sae {D_SAE + 4}.*d_model {D_MODEL}, d_sae {D_SAE}"
    ):
        read_adapter_file(a, D_MODEL, D_SAE)
    torch.save({"W": W}, a)
    with pytest.raises(PublishedFileError, match=r"missing key\(s\) \['b'\]"):
        read_adapter_file(a, D_MODEL, D_SAE)
    torch.save([W, b], a)
    with pytest.raises(PublishedFileError, match="expected a dict"):
        read_adapter_file(a, D_MODEL, D_SAE)


def test_params_name_a_hub_file_or_a_path_and_nothing_changes_by_default(tmp_path):
    ref = load_config("params/gemma-2-2b.yaml").approximator
    assert ref.effects_source == "auto" and ref.adapter_source == "auto"
    assert (
        ref.published.effects is not None and ref.published.effects.describe() == f"hf://datasets/{REPO}/effects_2b.pt"
    )
    nine = load_config("params/gemma-2-9b.yaml").approximator.published
    assert nine.adapter is not None and nine.adapter.filename == "adapter_9b_layer_12.pt"
    demo = load_config("params/demo.yaml").approximator
    assert demo.effects_source == "run" and demo.adapter_source == "run" and demo.published.effects is None
    with pytest.raises(ConfigError, match=r"published\.effects"):
        build_run_cfg(tmp_path, approximator={"effects_source": "published"})
    with pytest.raises(ConfigError, match="not both"):
        build_run_cfg(
            tmp_path, approximator={"published": {"adapter": {"path": "a.pt", "repo_id": REPO, "filename": "a.pt"}}}
        )
    with pytest.raises(ConfigError, match="repo_id \\+ filename"):
        build_run_cfg(tmp_path, approximator={"published": {"adapter": {"repo_id": REPO}}})


def _as_if_from_01(features: torch.Tensor, effects: torch.Tensor) -> Effects:
    """What 01's files of the same vectors would read back as (without halves)."""
    import pandas as pd

    x = features / features.norm(dim=-1, keepdim=True)
    n = x.shape[0]
    return Effects(
        effects=effects,
        vectors=x,
        scales=torch.ones(n),
        vector_ids=torch.arange(n),
        table=pd.DataFrame({"id": range(n)}),
        baseline_mean=torch.zeros(effects.shape[1]),
        baseline_density=torch.zeros(effects.shape[1]),
        meta={"effects": {"vectors": {"source": "random"}}},
    )


@pytest.mark.parametrize("fit", ["ridge", "adam"])
def test_02_trains_on_published_effects_as_on_01s(offline_hub, tmp_path, fit):
    features, effects, _, _ = reference_arrays()
    hub_cache(offline_hub, {"effects_2b.pt": {"features": features, "effects": effects}})
    pub = {"effects_source": "auto", "published": {"effects": {"repo_id": REPO, "filename": "effects_2b.pt"}}}
    run = build_run_cfg(
        tmp_path, approximator={"fit": fit, "holdout": 8, "bootstrap": 20, "epochs": 2, "cv_folds": 3, **pub}
    )
    W_dec = torch.randn(D_SAE, D_MODEL)
    eff = training_effects(run, W_dec)  # 01 has not run: auto takes the published file
    assert eff.meta["effects"]["vectors"]["source"] == "published"
    a = train_approximator(run, eff, W_dec)
    ref_run = build_run_cfg(
        tmp_path, stem="from01", approximator={"fit": fit, "holdout": 8, "bootstrap": 20, "epochs": 2, "cv_folds": 3}
    )
    b = train_approximator(ref_run, _as_if_from_01(features, effects), W_dec)
    assert torch.allclose(a.approx.W, b.approx.W, atol=1e-6) and torch.allclose(a.approx.b, b.approx.b, atol=1e-6)
    for k in ("mse", "mse_mean", "r2", "r2_ci_low", "cosine_mean", "n_train", "n_val"):
        assert a.metrics[k] == pytest.approx(b.metrics[k], rel=1e-5, abs=1e-7), k
    assert a.metrics.get("noise_ceiling") is None  # no halves, no ceiling
    assert (run.results_dir / "approximator.safetensors").is_file()
    if fit == "ridge":  # 02's plot cell and 04's figures without 01's files (no baseline density)
        from saets_utils.report.figures import make_all_figures
        from saets_utils.report.plots import plot_approximator_diagnostics

        plot_approximator_diagnostics(a.pred, a.measured, a.approx.b, density=eff.baseline_density)
        assert [p.name for p in make_all_figures(run)] == ["approximator_diagnostics.png"]


def test_auto_prefers_01s_effects_when_they_exist(tmp_path):
    run = build_run_cfg(
        tmp_path, approximator={"effects_source": "auto", "published": {"effects": {"path": "missing.pt"}}}
    )
    run.results_dir.mkdir(parents=True)
    (run.results_dir / "effects.safetensors").write_bytes(b"")
    with pytest.raises(Exception) as e:  # it went to 01's files (here a broken set), not to missing.pt
        training_effects(run, torch.zeros(D_SAE, D_MODEL))
    assert "missing.pt" not in str(e.value)


def test_published_adapter_rotation_and_correction_compared(offline_hub, tmp_path):
    _, _, W, b = reference_arrays()
    W_dec = torch.randn(D_SAE, D_MODEL, generator=torch.Generator().manual_seed(3))
    ours = rotation_matrix(EffectApproximator(W, b), W_dec)
    c = W @ b
    hub_cache(
        offline_hub,
        {
            "adapter_2b_layer_12.pt": {"W": W, "b": b},
            "R_dec_2b_layer_12.pt": ours.T.clone(),  # the public code's orientation (R.T @ d)
            "correction_bias_2b_layer_12.pt": c,
        },
    )
    files = {
        k: {"repo_id": REPO, "filename": f}
        for k, f in (
            ("adapter", "adapter_2b_layer_12.pt"),
            ("rotation", "R_dec_2b_layer_12.pt"),
            ("correction_bias", "correction_bias_2b_layer_12.pt"),
        )
    }
    run = build_run_cfg(tmp_path, approximator={"adapter_source": "published", "published": files})
    pa = load_published_adapter(run, W_dec)
    assert torch.equal(pa.approx.W, W) and torch.equal(pa.approx.b, b)
    assert torch.allclose(pa.rotation, ours, atol=1e-6)  # turned into our orientation (R @ d)
    t = pa.table().set_index("what")
    assert t.loc["rotation R^T vs ours", "rel_diff"] < 1e-6 < t.loc["rotation R vs ours", "rel_diff"]
    assert t.loc["correction bias vs norm(W @ b)", "cosine"] == pytest.approx(1.0, abs=1e-6)
    bad_sae = torch.randn(D_SAE + 4, D_MODEL + 4)  # the adapter of another model for this SAE
    with pytest.raises(
        PublishedFileError, match=rf"d_model {D_MODEL}, d_sae {D_SAE}.*d_model {D_MODEL + 4}, d_sae {D_SAE + 4}"
    ):
        load_published_adapter(run, bad_sae)


def test_03_context_uses_the_published_adapter_without_01(offline_hub, tmp_path, tiny_model, tiny_sae):
    """load_context (03, targeting, the playground) with the published adapter and no 01 or 02 files."""
    from saets_utils.evaluation.task_vectors import build_target_vector, load_context
    from tests.helpers import D_MODEL as DM
    from tests.helpers import D_SAE as DS

    g = torch.Generator().manual_seed(5)
    W, b = torch.randn(DM, DS, generator=g), torch.rand(DS, generator=g)
    R = rotation_matrix(EffectApproximator(W, b), tiny_sae.W_dec.detach().float())
    hub_cache(
        offline_hub,
        {
            "adapter_2b_layer_12.pt": {"W": W, "b": b},
            "R_dec_2b_layer_12.pt": R.T.clone(),
            "correction_bias_2b_layer_12.pt": W @ b,
            "adapter_9b_layer_12.pt": {"W": torch.zeros(DM * 2, DS * 2), "b": torch.zeros(DS * 2)},
        },
    )
    files = {
        "adapter": {"repo_id": REPO, "filename": "adapter_2b_layer_12.pt"},
        "rotation": {"repo_id": REPO, "filename": "R_dec_2b_layer_12.pt"},
        "correction_bias": {"repo_id": REPO, "filename": "correction_bias_2b_layer_12.pt"},
    }
    run = build_run_cfg(tmp_path, approximator={"adapter_source": "auto", "published": files})
    assert not run.results_dir.exists()  # neither 01 nor 02 has run
    ctx = load_context(run, tiny_model, tiny_sae)
    assert ctx.approx is not None and torch.equal(ctx.approx.W, W) and torch.equal(ctx.approx.b, b)
    assert ctx.rotation is not None and torch.allclose(ctx.rotation, R, atol=1e-6)
    assert ctx.approx_source == f"published: hf://datasets/{REPO}/adapter_2b_layer_12.pt"
    assert {r["what"] for r in ctx.approx_check} >= {"rotation R^T vs ours", "correction bias vs norm(W @ b)"}
    for m in ("SAE-TS", "pinverse", "rotation"):
        v = build_target_vector(ctx, m, [(3, 1.0)])
        assert v.shape == (DM,) and torch.isfinite(v).all()
    from saets_utils.evaluation.task_vectors import build_task_vectors
    from saets_utils.steering.tasks import load_task

    with pytest.raises(FileNotFoundError, match="baseline feature density"):  # no 01: FGAA and discovery refuse
        build_task_vectors(load_task("anger"), ctx, ["FGAA"])
    nine = build_run_cfg(
        tmp_path,
        stem="ninerun",
        approximator={
            "adapter_source": "published",
            "published": {"adapter": {"repo_id": REPO, "filename": "adapter_9b_layer_12.pt"}},
        },
    )
    with pytest.raises(
        PublishedFileError, match=rf"adapter_9b_layer_12\.pt: W is \[{DM * 2}, {DS * 2}\].*d_model {DM}, d_sae {DS}"
    ):
        load_context(nine, tiny_model, tiny_sae)


def _write_01_results(run, features: torch.Tensor, effects: torch.Tensor) -> None:
    """A minimal set of 01's files (what load_effects reads), one row without a usable effect."""
    import json

    from safetensors.torch import save_file

    d = run.results_dir
    d.mkdir(parents=True, exist_ok=True)
    n, d_sae = effects.shape
    x = features / features.norm(dim=-1, keepdim=True)
    scales = torch.full((n,), 30.0)
    scales[5] = float("nan")  # a failed calibration: left out of the export
    save_file(
        {
            "effects": effects,
            "vectors": x,
            "scales": scales,
            "vector_ids": torch.arange(n) * 2,
            "effect_halves": torch.stack([effects, effects], 1),
        },
        str(d / "effects.safetensors"),
    )
    save_file({"mean": torch.zeros(d_sae), "density": torch.zeros(d_sae)}, str(d / "baseline.safetensors"))
    (d / "effects_table.csv").write_text("id,scale,status,seconds\n")
    (d / "effects_meta.json").write_text(json.dumps({"effects": {"vectors": {"source": "random"}}}))


def test_export_round_trip_gives_the_same_tensors(offline_hub, tmp_path):
    from safetensors.torch import load_file

    from saets_utils.approximator.model import load_rotation
    from saets_utils.report.export import export_names, main

    features, effects, _, _ = reference_arrays()
    run = build_run_cfg(tmp_path, approximator={"fit": "ridge", "holdout": 8, "bootstrap": 20, "cv_folds": 3})
    _write_01_results(run, features, effects)
    W_dec = torch.randn(D_SAE, D_MODEL, generator=torch.Generator().manual_seed(2))
    trained = train_approximator(run, load_effects_of(run), W_dec)
    out = tmp_path / "export"
    main([str(tmp_path / "params" / "tinyrun.yaml"), "--out", str(out)])
    names = export_names(run)
    assert names["adapter"] == "adapter_tinyrun_layer_1.pt"
    keep = torch.ones(N, dtype=torch.bool)
    keep[5] = False
    # back through the published readers: from a path, and from the export laid out as a Hub repo
    e = published_effects(Artifact(path=str(out / names["effects"])), D_MODEL, D_SAE)
    x = features / features.norm(dim=-1, keepdim=True)
    assert torch.equal(e.effects, effects[keep]) and torch.allclose(e.vectors, x[keep], atol=1e-6)
    st = load_file(str(out / names["effects_st"]))
    assert torch.equal(st["vector_ids"], torch.arange(N)[keep] * 2) and torch.equal(st["effects"], effects[keep])
    hub_cache(
        offline_hub,
        {
            n: torch.load(out / n, weights_only=True)
            for n in (names["adapter"], names["rotation"], names["correction_bias"])
        },
        repo="me/saets-tinyrun",
    )
    files = {
        k: {"repo_id": "me/saets-tinyrun", "filename": names[k]} for k in ("adapter", "rotation", "correction_bias")
    }
    back = build_run_cfg(tmp_path, stem="back", approximator={"adapter_source": "published", "published": files})
    pa = load_published_adapter(back, W_dec)
    assert torch.equal(pa.approx.W, trained.approx.W) and torch.equal(pa.approx.b, trained.approx.b)
    saved_R = load_rotation(run.results_dir / "approximator.safetensors")
    assert saved_R is not None and torch.equal(pa.rotation, saved_R)
    assert all(r["rel_diff"] < 1e-5 for r in pa.comparison if r["what"] != "rotation R^T vs ours")
    ad = load_file(str(out / names["adapter_st"]))
    assert torch.equal(ad["W"], trained.approx.W) and torch.equal(ad["rotation"], saved_R)
    card = (out / "README.md").read_text()
    assert "| r2 |" in card and run.sae.key in card and names["adapter"] in card and f"{N - 1} of {N}" in card


def load_effects_of(run):
    from saets_utils.effects.store import load_effects

    return load_effects(run.results_dir)


def _short_task_file(tmp_path: Path, key: str):
    """A task whose examples fit the tiny model's context, listing its targets for the SAE ``key``
    (as the Gemma task files list theirs): no discovery needed, so no baseline density."""
    import yaml

    from saets_utils.steering.tasks import Task

    task = Task(
        name="short",
        behaviour="b",
        coherence="c",
        steering_prompt="p",
        positive=[f"zz zap {i} zzz" for i in range(8)],
        negative=[f"aa cap {i} aaa" for i in range(8)],
        targets={key: [(3, 1.0), (7, 0.5)]},
    )
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(task.model_dump(mode="json")))
    return task, path


def test_03_runs_end_to_end_from_the_published_adapter_without_01(
    offline_hub, tmp_path, tiny_model, tiny_sae, monkeypatch, capsys
):
    """evaluate_run (notebook 03) with the published adapter and no 01 or 02 files: targeting is
    skipped and FGAA left out, each with a printed notice naming why; the judge tables are written.
    Then the same after 02 trained on the published effects (02's approximator, still no 01)."""
    from types import SimpleNamespace

    from saets_utils.evaluation import evaluate
    from saets_utils.judges.base import JudgeResult
    from saets_utils.registry import DEFAULT_METHODS
    from tests.helpers import D_MODEL as DM
    from tests.helpers import D_SAE as DS

    g = torch.Generator().manual_seed(7)
    W, b = torch.randn(DM, DS, generator=g), torch.rand(DS, generator=g)
    hub_cache(offline_hub, {"adapter_2b_layer_12.pt": {"W": W, "b": b}})
    task, task_file = _short_task_file(tmp_path, "tiny-key")
    run = build_run_cfg(
        tmp_path,
        sae={"targets_key": "tiny-key"},
        approximator={
            "adapter_source": "auto",
            "published": {"adapter": {"repo_id": REPO, "filename": "adapter_2b_layer_12.pt"}},
        },
        # eval.methods and eval.targeting as by default (FGAA and targeting asked for)
        eval={
            "tasks": [str(task_file)],
            "scale_grid": {"start": 0, "stop": 20, "step": 20},
            "samples_per_scale": 2,
            "new_tokens": 3,
            "bootstrap": 10,
        },
    )
    assert run.eval.targeting and "FGAA" in run.eval.methods
    monkeypatch.setattr(evaluate, "load_tasks", lambda names: [task])
    judge = SimpleNamespace(judge_id="fake", stats=SimpleNamespace(as_dict=lambda: {"calls": 0}))
    monkeypatch.setattr(evaluate, "make_judge", lambda *a, **k: judge)
    monkeypatch.setattr(
        evaluate,
        "score_requests",
        lambda j, reqs, progress=True: [JudgeResult.scored(1 + len(q.text) % 10, "fake") for q in reqs],
    )
    assert not run.results_dir.exists()  # neither 01 nor 02 has run

    report = evaluate.evaluate_run(run, tiny_model, tiny_sae, progress=False)
    printed = capsys.readouterr().out
    assert "no 01 plan: targeting skipped; run 01 to measure it" in printed
    assert "no 01 baseline: FGAA left out of the evaluated methods" in printed
    assert report.notices and all(n in printed for n in report.notices)
    assert report.targeting is None and report.targeting_note.startswith("no 01 plan: targeting skipped")
    ev = run.results_dir / "eval"
    summary = pd.read_csv(ev / "summary.csv")
    assert sorted(set(summary["method"])) == sorted(m for m in DEFAULT_METHODS if m != "FGAA")
    assert summary["task"].unique().tolist() == ["short"]
    assert not list(ev.glob("targeting*")) and (ev / "samples.jsonl").is_file()
    assert not (run.results_dir / "baseline.safetensors").exists() and not (run.results_dir / "effects_work").exists()
    stats = json.loads((ev / "judge_stats.json").read_text())
    assert stats["approximator"] == f"published: hf://datasets/{REPO}/adapter_2b_layer_12.pt"
    assert "FGAA" not in stats["methods"] and stats["notices"] == report.notices
    targets = json.loads((ev / "targets.json").read_text())
    assert {t["method"] for t in targets} == {"SAE", "SAE-TS", "pinverse", "rotation"}
    assert all(json.loads(t["targets"]) == [[3, 1.0], [7, 0.5]] for t in targets)

    # 02 trained on the published effects (effects_source auto, no 01): 02's approximator, still no 01
    EffectApproximator(W, b).save(run.results_dir / "approximator.safetensors", W_dec=tiny_sae.W_dec)
    after02 = run.model_copy(
        update={
            "approximator": run.approximator.model_copy(
                update={
                    "effects_source": "auto",
                    "published": run.approximator.published.model_copy(
                        update={"effects": Artifact(repo_id=REPO, filename="effects_2b.pt")}
                    ),
                }
            )
        }
    )
    report = evaluate.evaluate_run(after02, tiny_model, tiny_sae, progress=False)
    printed = capsys.readouterr().out
    assert "no 01 plan: targeting skipped" in printed and "02's fit of the published effects" in printed
    assert report.stats["approximator"].startswith("02: ") and "FGAA" not in set(report.summary["method"])


def test_03_without_01_needs_listed_targets(offline_hub, tmp_path, tiny_model, tiny_sae, monkeypatch):
    """A task that lists no targets for the SAE would discover them from 01's density: 03 refuses
    before generating anything, naming 01."""
    from saets_utils.evaluation import evaluate
    from tests.helpers import D_MODEL as DM
    from tests.helpers import D_SAE as DS

    hub_cache(offline_hub, {"adapter_2b_layer_12.pt": {"W": torch.zeros(DM, DS), "b": torch.zeros(DS)}})
    task, task_file = _short_task_file(tmp_path, "another-key")
    run = build_run_cfg(
        tmp_path,
        approximator={
            "adapter_source": "published",
            "published": {"adapter": {"repo_id": REPO, "filename": "adapter_2b_layer_12.pt"}},
        },
        eval={"tasks": [str(task_file)], "methods": ["SAE", "SAE-TS"]},
    )
    monkeypatch.setattr(evaluate, "load_tasks", lambda names: [task])
    with pytest.raises(FileNotFoundError, match="discovering the targets of task 'short' needs 01's baseline"):
        evaluate.evaluate_run(run, tiny_model, tiny_sae, progress=False)
    assert not (run.results_dir / "eval" / "samples.jsonl").exists()
    fgaa_only = run.model_copy(update={"eval": run.eval.model_copy(update={"methods": ["FGAA"]})})
    with pytest.raises(FileNotFoundError, match=r"\['FGAA'\] all need 01's baseline"):
        evaluate.what_to_evaluate(fgaa_only)


@pytest.mark.parametrize("params", ["params/gemma-2-2b.yaml", "params/gemma-2-9b.yaml"])
def test_gemma_params_run_03_without_01_as_they_are(params, tmp_path):
    """The reference params with no 01 or 02 files (no overrides but where results go): 03 takes the
    published adapter, skips targeting and leaves out FGAA, saying so; every task lists its targets
    for the SAE, so none is discovered (which would need 01's density)."""
    from saets_utils.evaluation.evaluate import what_to_evaluate
    from saets_utils.evaluation.task_vectors import TARGET_METHODS
    from saets_utils.steering.tasks import load_tasks

    run = load_config(params, {"results_root": str(tmp_path)})
    assert not run.results_dir.exists()
    methods, targeting, notices = what_to_evaluate(run)
    assert methods == [m for m in run.eval.methods if m != "FGAA"] and not targeting
    assert [n.split(";")[0] for n in notices] == [
        "no 01 baseline: FGAA left out of the evaluated methods",
        "no 01 plan: targeting skipped",
    ]
    assert all(run.approximator.published.adapter.filename in n for n in notices)  # type: ignore[union-attr]
    key = run.sae.targets_key
    for task in load_tasks(run.eval.tasks):
        for m in TARGET_METHODS:
            assert task.targets_for(key, m), f"{task.name} lists no {m} targets under {key}"
