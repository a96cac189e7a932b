"""HTML feature dashboards (SAEDashboard-style, self-contained, no external CSS or fonts) for the
features a run's report mentions: the tasks' target features, the largest measured effects of the
profiled vectors, and the largest entries of the approximator's bias.

One page, ``results/<run>/reports/features.html``, one card per feature (anchor ``#f<id>``): label,
density, max activation, why the report mentions it, top positive and negative logit tokens, and
the top-activating contexts with each token shaded by the feature's activation; for an SAE that
Neuronpedia hosts (Gemma Scope), a link to the feature's Neuronpedia page.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from saets_utils.config import RunConfig
from saets_utils.io_utils import atomic_write_text
from saets_utils.report.features import FeatureStats, load_feature_stats
from saets_utils.report.neuronpedia import neuronpedia_url

N_PROFILED = 4  # vectors whose top effects are mentioned (the effect profiles 04 draws)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
background:#f6f7f9;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:14px 16px;margin:14px 0}
.card h2{font-size:16px;margin:0 0 6px}
.meta{color:#5b6475;font-size:12px}
.why{display:inline-block;background:#eef2ff;color:#3730a3;border-radius:10px;padding:1px 8px;
margin:2px 4px 2px 0;font-size:12px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:12px;margin:8px 0}
.tok{display:inline-block;border-radius:4px;padding:0 5px;margin:1px;font:12px ui-monospace,Menlo,Consolas,monospace}
.pos{background:#dcfce7}.neg{background:#fee2e2}
.ctx{font:12px/1.9 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;overflow-wrap:anywhere;
border-top:1px solid #eef0f3;padding:2px 0}
.ctx span{border-radius:3px}
a.np{font-size:12px;font-weight:400;color:#2563eb;text-decoration:none;margin-left:6px}
"""


def _tok(text: str) -> str:
    return html.escape(text.replace("\n", "⏎"))


def feature_card(
    stats: FeatureStats, feature: int, reasons: list[str], *, n_contexts: int = 8, url: str | None = None
) -> str:
    """One feature's dashboard card (HTML); ``url``: the feature's Neuronpedia page, linked beside its id."""
    f = int(feature)
    peak = float(stats.max_act[f]) or 1.0
    logits = []
    for cls, ids, vals in (
        ("pos", stats.pos_ids[f], stats.pos_values[f]),
        ("neg", stats.neg_ids[f], stats.neg_values[f]),
    ):
        chips = "".join(
            f"<span class='tok {cls}' title='{float(v):+.3f}'>{_tok(stats.token(int(i)))}</span>"
            for i, v in zip(ids, vals)
        )
        logits.append(f"<div><b>{'positive' if cls == 'pos' else 'negative'} logits</b><br>{chips}</div>")
    rows = []
    for ctx in stats.contexts(f)[:n_contexts]:
        spans = "".join(
            f"<span style='background:rgba(234,88,12,{min(max(a, 0.0) / peak, 1.0):.2f})' title='{a:.3g}'>{_tok(t)}</span>"
            for t, a in ctx
        )
        rows.append(f"<div class='ctx'>{spans}</div>")
    why = "".join(f"<span class='why'>{html.escape(r)}</span>" for r in reasons)
    np_link = (
        f" <a class='np' href='{html.escape(url)}' target='_blank' rel='noopener'>Neuronpedia ↗</a>" if url else ""
    )
    return (
        f"<section class='card' id='f{f}'><h2>#{f} · {html.escape(stats.label(f))}{np_link}</h2>"
        f"<div class='meta'>density {float(stats.density[f]):.3g} · max activation {float(stats.max_act[f]):.3g}</div>"
        f"<div>{why}</div><div class='cols'>{''.join(logits)}</div>"
        f"<b>top-activating contexts</b>{''.join(rows) or '<div class=meta>never active on the text</div>'}</section>"
    )


def render_dashboards(
    stats: FeatureStats, features: dict[int, list[str]], title: str, run: RunConfig | None = None
) -> str:
    """A standalone page with one card per feature of ``features`` (id -> reasons it is shown); with
    ``run``, each card links to the feature's Neuronpedia page where the run's SAE is hosted there."""
    cards = "".join(
        feature_card(stats, f, r, url=None if run is None else neuronpedia_url(run, f)) for f, r in features.items()
    )
    n = stats.meta.get("n_positions", "?")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><main><h1>{html.escape(title)}</h1>"
        f"<p class='meta'>{len(features)} features · contexts and density from {n} text positions of the run's corpus"
        " · logits: decoder row through the unembedding</p>"
        f"{cards}</main></body></html>"
    )


def mentioned_features(run: RunConfig, n_bias: int = 10, n_effects: int = 5) -> dict[int, list[str]]:
    """Features the report mentions, each with why: task targets, top effects of the profiled
    vectors (and a decoder row's own feature), the largest |bias| entries of the approximator."""
    d = run.paths
    out: dict[int, list[str]] = {}

    def add(f: int, why: str) -> None:
        reasons = out.setdefault(int(f), [])
        if why not in reasons:
            reasons.append(why)

    targets = d.targets
    if targets.is_file():
        for row in json.loads(targets.read_text()):
            for f, _ in json.loads(row["targets"]) if isinstance(row["targets"], str) else row["targets"]:
                add(f, f"target of {row['task']}")
    if d.effects.is_file():
        from saets_utils.effects.store import load_effects

        eff = load_effects(d.root)
        for i in eff.valid.nonzero()[:, 0].tolist()[:N_PROFILED]:
            vid = int(eff.vector_ids[i])
            for f in eff.effects[i].topk(n_effects).indices.tolist():
                add(f, f"top effect of vector {vid}")
    if d.approximator.is_file():
        from safetensors.torch import load_file

        b = load_file(d.approximator)["b"]
        for f in b.abs().topk(min(n_bias, b.numel())).indices.tolist():
            add(f, "large approximator bias")
    return out


def write_dashboards(run: RunConfig) -> Path | None:
    """``results/<run>/reports/features.html`` for the features the report mentions; None before 01
    computed the feature stats."""
    src = run.paths.feature_stats
    if not src.is_file():
        return None
    stats = load_feature_stats(src)
    feats = {f: r for f, r in mentioned_features(run).items() if 0 <= f < stats.d_sae}
    path = run.paths.features_page
    atomic_write_text(path, render_dashboards(stats, feats, f"saets {run.name}: feature dashboards", run))
    return path
