"""Neuronpedia links (saets_utils/report/neuronpedia.py): the URL shape on the reference params, none
for SAEs Neuronpedia does not host."""

from __future__ import annotations

from saets_utils.config import load_config
from saets_utils.report.neuronpedia import neuronpedia_url
from tests.helpers import build_run_cfg


def test_gemma_scope_ids_link_to_neuronpedia():
    assert (
        neuronpedia_url(load_config("params/gemma-2-2b.yaml"), 4111)
        == "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/4111"
    )
    assert (
        neuronpedia_url(load_config("params/gemma-2-9b.yaml"), 441)
        == "https://www.neuronpedia.org/gemma-2-9b/12-gemmascope-res-16k/441"
    )
    l0 = {"sae": {"sae_id": "layer_12/width_16k/average_l0_82", "release": "gemma-scope-2b-pt-res"}}
    assert neuronpedia_url(load_config("params/gemma-2-2b.yaml", l0), 7) == (
        "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/7"
    )


def test_no_link_where_neuronpedia_does_not_host_the_sae(tmp_path):
    assert neuronpedia_url(load_config("params/demo.yaml"), 3) is None  # the embedded SAE
    assert neuronpedia_url(load_config("params/gemma-ci.yaml"), 3) is None  # random SAEs in Gemma Scope's format
    assert neuronpedia_url(build_run_cfg(tmp_path), 3) is None  # tiny
    other_l0 = {"sae": {"sae_id": "layer_12/width_16k/average_l0_41", "release": "gemma-scope-2b-pt-res"}}
    assert neuronpedia_url(load_config("params/gemma-2-2b.yaml", other_l0), 3) is None
    other_model = {"model": {"name": "gemma-2-9b"}}  # the 2B SAE on another model
    assert neuronpedia_url(load_config("params/gemma-2-2b.yaml", other_model), 3) is None


# --- the links where a person reads feature ids: dashboards, report index, explorer, playground ---

NP_2B = "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/"


def _runs(tmp_path):
    """The reference params (Gemma Scope: hosted) and the demo params (embedded SAE: not hosted),
    results under tmp_path."""
    gemma = load_config("params/gemma-2-2b.yaml", {"results_root": str(tmp_path / "g")})
    demo = load_config("params/demo.yaml", {"results_root": str(tmp_path / "d")})
    return gemma, demo


def _stats(d_sae: int = 16):
    import torch

    from saets_utils.report.features import FeatureStats

    g = torch.Generator().manual_seed(0)
    n_ctx, win = 2, 5
    return FeatureStats(
        density=torch.rand(d_sae, generator=g) * 0.01,
        max_act=torch.rand(d_sae, generator=g) + 0.5,
        ctx_tokens=torch.randint(0, 4, (d_sae, n_ctx, win), generator=g),
        ctx_acts=torch.rand(d_sae, n_ctx, win, generator=g).half(),
        ctx_max=torch.ones(d_sae, n_ctx),
        pos_ids=torch.randint(0, 4, (d_sae, 3), generator=g),
        pos_values=torch.rand(d_sae, 3, generator=g),
        neg_ids=torch.randint(0, 4, (d_sae, 3), generator=g),
        neg_values=-torch.rand(d_sae, 3, generator=g),
        vocab={0: "a", 1: "<b>", 2: " wedding", 3: "\n"},
        focus=2,
        meta={"n_positions": 100},
    )


def test_dashboards_link_gemma_scope_ids(tmp_path):
    from saets_utils.report.dashboards import render_dashboards

    gemma, demo = _runs(tmp_path)
    stats = _stats()
    page = render_dashboards(stats, {3: ["target of anger"], 11: ["large approximator bias"]}, "dash", gemma)
    assert f"href='{NP_2B}3'" in page and f"href='{NP_2B}11'" in page and "id='f3'" in page
    for run in (demo, None):
        assert "neuronpedia.org" not in render_dashboards(stats, {3: ["target of anger"]}, "dash", run)


def test_index_links_target_features_and_the_sae(tmp_path):
    import json

    from saets_utils.report.index_page import render_index

    gemma, demo = _runs(tmp_path)
    for run in (gemma, demo):
        (run.results_dir / "eval").mkdir(parents=True)
        rows = [
            {"task": "anger", "method": m, "targets": json.dumps([[4111, 1.0]]), "how": "listed"}
            for m in ("SAE", "SAE-TS")
        ]
        (run.results_dir / "eval" / "targets.json").write_text(json.dumps(rows))
    page = render_index(gemma)
    assert f"href='{NP_2B}4111'" in page and "Target features" in page and "SAE, SAE-TS" in page
    assert "href='https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k'" in page  # the SAE's browser
    plain = render_index(demo)
    assert "#4111 (1)" in plain and "neuronpedia.org" not in plain
    (demo.results_dir / "reports").mkdir()
    (demo.results_dir / "reports" / "features.html").write_text("")
    assert "href='features.html#f4111'" in render_index(demo)  # not hosted: the id's dashboard card


def test_explorer_links_feature_ids(tmp_path):
    import os

    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    from saets_utils.approximator.published import effects_from_arrays
    from saets_utils.report.widgets import EffectExplorer

    gemma, demo = _runs(tmp_path)
    g = torch.Generator().manual_seed(1)
    eff = effects_from_arrays(torch.randn(6, 8, generator=g), torch.randn(6, 16, generator=g), "test")
    eff.meta["effects"]["vectors"]["source"] = "decoder_rows"  # vector id = its own feature's id
    eff.effects[2, 2] = 10.0
    labels = {2: "<wedding>"}
    ex = EffectExplorer(eff, tokenizer=None, k=3, labels=labels, run=gemma)
    ex.show(2)
    assert f"href='{NP_2B}2'" in ex.table_html.value and f"href='{NP_2B}2'" in ex.summary_html.value
    assert "&lt;wedding&gt;" in ex.table_html.value and "<wedding>" not in ex.table_html.value  # labels escaped
    ex.find(5)
    assert f"href='{NP_2B}5'" in ex.feature_label.value
    plain = EffectExplorer(eff, tokenizer=None, k=3, labels=labels, run=demo)
    plain.show(2)
    plain.find(5)
    assert not any("neuronpedia" in w.value for w in (plain.table_html, plain.summary_html, plain.feature_label))
    assert "&lt;wedding&gt;" in plain.table_html.value


def test_playground_links_feature_ids(tmp_path, tiny_model, tiny_sae, monkeypatch):
    import torch

    from saets_utils.evaluation.task_vectors import SteeringContext
    from saets_utils.report import explore, widgets
    from saets_utils.steering.tasks import Task

    task = Task(
        name="shout",
        behaviour="b",
        coherence="c",
        steering_prompt="Shout!",
        positive=[f"yes {i}!" for i in range(8)],
        negative=[f"no {i}." for i in range(8)],
    )
    effect = torch.zeros(tiny_sae.cfg.d_sae)
    effect[[3, 9]] = torch.tensor([2.0, 1.0])
    fake = {
        "prompt": "I think",
        "steered_prompt": "I think",
        "scale": 1.0,
        "seeds": [0],
        "unsteered": ["a"],
        "steered": ["b"],
        "predicted": explore.top_features(effect, None, 2, lowered=False),
        "measured": explore.top_features(effect, None, 2, lowered=False),
    }
    monkeypatch.setattr(widgets, "playground_generate", lambda *a, **k: fake)
    gemma, demo = _runs(tmp_path)
    pages = {}
    for name, run in (("gemma", gemma), ("demo", demo)):
        ctx = SteeringContext(run, tiny_model, tiny_sae, None, None, torch.zeros(tiny_sae.cfg.d_sae), 1)
        pg = widgets.SteeringPlayground(ctx, [task], ["SAE"], warm=False)
        pg.task.value, pg.targets.value = widgets.CUSTOM, "5:1.0, 7:0.5"
        pg.generate()
        assert not pg.error
        pages[name] = pg.status.value + pg.predicted_html.value + pg.measured_html.value
    for f in (5, 7, 3, 9):  # the custom targets in the status line, the predicted and measured features
        assert f"href='{NP_2B}{f}'" in pages["gemma"]
    assert "neuronpedia" not in pages["demo"] and "#5 (1)" in pages["demo"]


def test_table_html_escapes_what_it_does_not_link(tmp_path):
    import pandas as pd

    from saets_utils.report.neuronpedia import table_html

    gemma, demo = _runs(tmp_path)
    df = pd.DataFrame({"feature": [4111], "label": ["<script>x</script>"], "effect": [1.5]})
    linked = table_html(df, gemma, index=False)
    assert f"href='{NP_2B}4111'" in linked and "<script>" not in linked and "&lt;script&gt;" in linked
    assert table_html(df, demo, index=False) == df.to_html(index=False)
