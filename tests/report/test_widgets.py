"""The effect explorer and steering playground, driven without a browser on a tiny run
(tiny model + tiny SAE, effects measured into tmp_path, a ridge approximator fitted on them)."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

from helpers import build_run_cfg
from saets_utils.report import explore
from saets_utils.report.widgets import CUSTOM, EffectExplorer, SteeringPlayground, parse_targets, playground_generate
from saets_utils.steering.tasks import Task


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from saets_utils.approximator.fits import fit_ridge
    from saets_utils.effects.runner import run_effects
    from saets_utils.effects.store import load_effects
    from saets_utils.evaluation.task_vectors import load_context
    from saets_utils.models.loading import load_model
    from saets_utils.models.sae_loading import load_sae

    tmp = tmp_path_factory.mktemp("widgets")
    settings = {
        "vectors": {"source": "decoder_rows", "ids": {"start": 0, "stop": 12}},
        "samples_per_prompt": 3,
        "total_tokens": 12,
        "vectors_per_batch": 2,
    }
    # density max 1: the tiny SAE's features are all dense, and target discovery drops dense ones
    run = build_run_cfg(tmp, effects=settings, eval={"fgaa_density_max": 1.0})
    model, sae = load_model(run.model), load_sae(run)
    run_effects(run, model, sae, gpus=0)
    effects = load_effects(run.results_dir)
    ok = effects.valid
    fit_ridge(effects.vectors[ok], effects.effects[ok], lam=1e-2).save(
        run.results_dir / "approximator.safetensors", W_dec=sae.W_dec
    )
    return effects, load_context(run, model, sae), model


@pytest.fixture(scope="module")
def task():
    pos = [f"Wow!!! Great {w}!!! Yes!!!" for w in ("day", "cat", "song", "game", "meal", "trip", "book", "idea")]
    neg = [f"the {w} was there, as usual." for w in ("day", "cat", "song", "game", "meal", "trip", "book", "idea")]
    return Task(
        name="shout",
        behaviour="Is it excited?",
        coherence="Is it fluent?",
        steering_prompt="Shout!",
        positive=pos,
        negative=neg,
    )


def test_explore_functions(tiny_run):
    effects, _ctx, _model = tiny_run
    vid = int(effects.vector_ids[2])
    top = explore.top_effects(effects, vid, k=5)
    assert list(top.columns) == ["feature", "effect", "density", "direction", "dense"]
    assert 0 < len(top) <= 10 and top["effect"].is_monotonic_decreasing
    assert ((top["effect"] > 0) == (top["direction"] == "raised")).all()
    assert (top["dense"] == (top["density"] > 0.01)).all()
    s = explore.vector_summary(effects, vid, is_decoder_row=True, k=5)
    assert s["own_feature"] == vid and s["own_rank"] >= 1 and s["own_in_top_k"] == (s["own_rank"] <= 5)
    assert (s["own_rank"] == 1) == (s["top_feature"] == vid)
    assert explore.vector_summary(effects, vid, is_decoder_row=False)["own_rank"] is None
    feature = int(effects.effects[2].argmax())
    ids = explore.find_vectors_by_feature(effects, feature, k=3)
    col = effects.effects[[effects.row(i) for i in ids], feature]
    assert ids and (col[:-1] >= col[1:]).all() and (col > 0).all()
    rest = [r for r in range(len(effects.vector_ids)) if int(effects.vector_ids[r]) not in ids]
    assert (effects.effects[rest, feature] <= col.min()).all()
    ov = explore.effects_overview(effects).set_index("quantity")["value"]
    assert ov["vectors"] == len(effects.vector_ids)
    assert sum(v for q, v in ov.items() if q.startswith("status: ")) == len(effects.vector_ids)
    with pytest.raises(KeyError, match="999"):
        explore.top_effects(effects, 999)


def test_effect_explorer(tiny_run):
    effects, _ctx, model = tiny_run
    ex = EffectExplorer(effects, tokenizer=model.tokenizer, k=5)
    vid = int(effects.vector_ids[2])
    ex.vector.value = vid
    assert ex.summary["vector_id"] == vid and ex.summary["status"] == effects.table["status"][2]
    assert ex.summary["own_rank"] is not None and f"vector {vid}" in ex.summary_html.value
    assert len(ex.table) > 0 and "feature" in ex.table_html.value and ex.figure is not None
    assert ex.samples and all(isinstance(t, str) for t in ex.samples)
    ex.vector.value = 999
    assert "999" in ex.error
    feature = int(effects.effects[5].argmax())
    ex.feature.value = feature
    assert ex.raising["vector_id"].tolist() == explore.find_vectors_by_feature(effects, feature, ex.n_vectors)
    assert len(ex.vector_list.options) == len(ex.raising) > 0
    pick = ex.vector_list.options[-1][1]
    ex.vector_list.value = pick
    assert ex.vector.value == pick and ex.summary["vector_id"] == pick and not ex.error


def test_playground_generate(tiny_run):
    effects, ctx, _model = tiny_run
    v = effects.vectors[2]
    same = playground_generate(ctx, v, 0.0, "I think", seed=3, new_tokens=10, n_samples=3, k=4)
    assert same["steered"] == same["unsteered"] and len(same["steered"]) == 3
    # float32 means of identical texts: equal up to summation rounding
    assert torch.allclose(
        torch.tensor(same["measured"]["effect"].to_numpy()), torch.tensor(0.0, dtype=torch.float64), atol=1e-6
    )
    far = playground_generate(ctx, v, 200.0, "I think", seed=3, new_tokens=10, n_samples=3, k=4)
    assert far["unsteered"] == same["unsteered"] and far["steered"] != far["unsteered"]
    assert len(far["predicted"]) == 4 and len(far["measured"]) == 4
    assert far["predicted"]["effect"].is_monotonic_decreasing
    none = playground_generate(ctx, None, 50.0, "I think", seed=3, new_tokens=10, prompt_prefix="Shout!", n_samples=2)
    assert none["predicted"] is None and none["steered_prompt"] == "Shout! I think"


def test_steering_playground(tiny_run, task):
    _effects, ctx, _model = tiny_run
    pg = SteeringPlayground(ctx, [task], ["SAE", "SAE-TS", "prompt"], n_samples=2, new_tokens=8, k=5)
    pg.method.value, pg.scale.value = "SAE-TS", 0.0
    pg.button.click()
    assert not pg.error and pg.result["steered"] == pg.result["unsteered"]
    assert len(pg.result["predicted"]) == 5 and "predicted" in pg.predicted_html.value
    assert ("shout", "SAE-TS") in pg.vectors
    pg.scale.value = 200.0
    pg.button.click()
    assert pg.result["steered"] != pg.result["unsteered"] and "unsteered" in pg.samples_html.value
    pg.method.value = "prompt"
    pg.button.click()
    assert pg.result["steered_prompt"].startswith("Shout!") and pg.result["predicted"] is None
    pg.task.value, pg.targets.value, pg.method.value = CUSTOM, "3:1.0, 5:0.5", "SAE"
    pg.button.click()
    assert not pg.error and len(pg.result["measured"]) == 5
    pg.targets.value = "3:1.0, 500"
    pg.button.click()
    assert "500" in pg.error and "500" in pg.status.value
    assert parse_targets("7, 9:0.5", 64) == [(7, 1.0), (9, 0.5)]
