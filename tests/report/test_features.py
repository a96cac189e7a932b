"""Feature dashboards (numbers, labels, free-text targets, HTML), the styled report index, and the
playground's streaming and button, on the tiny model and SAE."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import re

import pytest
import torch

from helpers import HOOK, build_run_cfg
from saets_utils.report.features import (
    FeatureStats,
    compute_feature_stats,
    load_feature_stats,
    load_labels,
    save_feature_stats,
    targets_from_text,
)


@pytest.fixture(scope="module")
def stats_and_tokens(tiny_model, tiny_sae):
    tokens = torch.randint(2, tiny_model.cfg.d_vocab, (6, 12), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    return compute_feature_stats(tiny_model, tiny_sae, HOOK, tokens, n_contexts=3, left=2, right=1, n_logits=4), tokens


def test_feature_stats_match_a_direct_computation(stats_and_tokens, tiny_model, tiny_sae):
    stats, tokens = stats_and_tokens
    _, cache = tiny_model.run_with_cache(tokens, names_filter=HOOK)
    codes = tiny_sae.encode(cache[HOOK]).clamp_min(0)[:, 1:]  # the start position does not count
    assert torch.allclose(stats.density, (codes > 0).float().mean((0, 1)), atol=1e-6)
    assert torch.allclose(stats.max_act, codes.amax((0, 1)), rtol=1e-2)  # kept as float16
    f = int(stats.max_act.argmax())
    # the strongest context's focus token is where the feature peaks, with that activation
    seq, pos = divmod(int(codes[..., f].argmax()), codes.shape[1])
    assert int(stats.ctx_tokens[f, 0, stats.focus]) == int(tokens[seq, pos + 1])
    assert float(stats.ctx_acts[f, 0, stats.focus]) == pytest.approx(float(stats.ctx_max[f, 0]), rel=1e-2)
    logits = tiny_sae.W_dec @ tiny_model.W_U
    assert torch.equal(stats.pos_ids[:, 0], logits.argmax(-1)) and torch.equal(stats.neg_ids[:, 0], logits.argmin(-1))
    assert stats.label(f) and stats.table().shape[0] == tiny_sae.cfg.d_sae


def test_feature_stats_round_trip(stats_and_tokens, tmp_path):
    stats, _ = stats_and_tokens
    back = load_feature_stats(save_feature_stats(stats, tmp_path / "s.safetensors"))
    assert torch.equal(back.ctx_tokens, stats.ctx_tokens) and back.vocab == stats.vocab
    assert back.labels() == stats.labels()


def _synthetic_stats() -> FeatureStats:
    """Three features: 0 fires on 'wedding' and 'bride', 1 on 'the', 2 never."""
    vocab = {10: " wedding", 11: " bride", 12: " the", 13: " sea"}
    ctx = torch.tensor([[[10], [11]], [[12], [12]], [[-1], [-1]]])
    return FeatureStats(
        density=torch.tensor([0.01, 0.5, 0.0]),
        max_act=torch.tensor([3.0, 2.0, 0.0]),
        ctx_tokens=ctx,
        ctx_acts=torch.ones(3, 2, 1).half(),
        ctx_max=torch.tensor([[3.0, 2.0], [2.0, 1.0], [0.0, 0.0]]),
        pos_ids=torch.tensor([[13], [12], [12]]),
        pos_values=torch.ones(3, 1),
        neg_ids=torch.tensor([[12], [13], [13]]),
        neg_values=-torch.ones(3, 1),
        vocab=vocab,
        focus=0,
    )


def test_labels_and_free_text_targets():
    s = _synthetic_stats()
    assert s.label(0) == "wedding, bride" and s.label(2) == "dead"
    assert targets_from_text("steer toward: weddings", s) == [(0, 1.0)]
    assert targets_from_text("toward the brides", s) == [(0, 1.0)]  # "the" names no feature
    s.density[0] = 0.5
    with pytest.raises(ValueError, match="no feature"):
        targets_from_text("steer toward: weddings", s)  # dense features are never targets


def test_dashboards_and_index_page(tmp_path, stats_and_tokens):
    from saets_utils.report.dashboards import render_dashboards
    from saets_utils.report.index_page import write_index

    stats, _ = stats_and_tokens
    page = render_dashboards(stats, {0: ["target of shout"], 3: ["large approximator bias"]}, "dash")
    assert "id='f0'" in page and "target of shout" in page and "top-activating contexts" in page
    run = build_run_cfg(tmp_path)
    save_feature_stats(stats, run.results_dir / "features" / "feature_stats.safetensors")
    (run.results_dir / "figures").mkdir(parents=True)
    (run.results_dir / "figures" / "best_product.png").write_bytes(b"png")
    index = write_index(run).read_text()
    assert (run.results_dir / "reports" / "features.html").is_file() and "features.html" in index
    assert "Settings and provenance" in index and "<figcaption>" in index and "best_product.png" in index
    # opens offline: no stylesheet, font or script fetched from anywhere
    assert not re.search(r"(href|src)=['\"]?(https?:)?//", index) and "@import" not in index
    assert load_labels(run.results_dir) == {}  # labels.csv is written by feature_stats, not by the index


def test_playground_streams_and_disables_the_button(tiny_model, tiny_sae, tmp_path):
    from saets_utils.evaluation.task_vectors import SteeringContext
    from saets_utils.report.widgets import SteeringPlayground, playground_generate
    from saets_utils.steering.tasks import Task

    run = build_run_cfg(tmp_path)
    ctx = SteeringContext(run, tiny_model, tiny_sae, None, None, torch.zeros(tiny_sae.cfg.d_sae), 1)
    seen: list[tuple[list[str], list[str]]] = []
    v = tiny_sae.W_dec[3]
    r = playground_generate(
        ctx, v, 100.0, "I think", seed=0, new_tokens=5, n_samples=2, on_text=lambda u, s: seen.append((u, s))
    )
    assert len(seen) == 5  # one update per generated token
    assert seen[-1] == (r["unsteered"], r["steered"])
    assert all(len(u) == len(s) == 2 for u, s in seen)
    task = Task(
        name="t", behaviour="b", coherence="c", steering_prompt="Shout!", positive=["a"] * 8, negative=["b"] * 8
    )
    pg = SteeringPlayground(ctx, [task], ["prompt"], n_samples=2, new_tokens=3)
    states: list[bool] = []
    pg.samples_html.observe(lambda _: states.append(pg.button.disabled), names="value")
    pg.button.click()
    assert states and all(states) and not pg.button.disabled and not pg.error
    assert "saets-samples" in pg.samples_html.value and pg.first_text_s is not None
