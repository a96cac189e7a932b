"""``results/<run>/reports/index.html``: the page a lab shares about one run.

Settings and provenance first (model, SAE, judge, commit, package versions, device, step times),
then links to each notebook's HTML report and the feature dashboards, the headline tables (judge,
targeting, the tasks' target features, approximator) styled, and every figure in a grid with a
caption. Feature ids link to their Neuronpedia page where the run's SAE is hosted there (Gemma
Scope), else to their card on the dashboards page. Self-contained: inline CSS, system fonts, nothing
fetched, so it opens offline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from saets_utils.config import RunConfig
from saets_utils.io_utils import atomic_write_text
from saets_utils.paths import STEPS as NOTEBOOKS
from saets_utils.paths import RunPaths
from saets_utils.report.neuronpedia import neuronpedia_sae_url

# Figure file stem -> caption (others get their stem).
CAPTIONS = {
    "product_vs_scale": "Behaviour × coherence against steering scale, per task and method.",
    "behaviour_coherence": "Behavioural and coherence scores separately, per scale.",
    "best_product": "Max over scales of behaviour × coherence, with bootstrap CIs.",
    "targeting": "Judge-free targeting: rank of the best target feature and target/off-target ratio at 01's loss.",
    "approximator_diagnostics": "Held-out predicted vs measured effects; largest approximator bias entries (labelled).",
    "published_comparison": "Our numbers beside the paper's, where it published them.",
    "learning_curve": "Held-out R² against training vectors, with the split-half noise ceiling.",
}

CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#dde1e7;--bg:#f6f7f9;--accent:#2563eb}
*{box-sizing:border-box}
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:var(--bg);color:var(--fg)}
main{max-width:1180px;margin:0 auto;padding:28px 24px 60px}
h1{font-size:24px;margin:0}
h2{font-size:18px;margin:28px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:18px 0 6px}
code{font:12.5px ui-monospace,Menlo,Consolas,monospace;background:#eef0f3;padding:1px 4px;border-radius:4px}
.sub{color:var(--muted);margin:4px 0 16px}
.panel{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 16px}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}
dl.kv dt{color:var(--muted)}dl.kv dd{margin:0;overflow-wrap:anywhere}
.links{display:flex;flex-wrap:wrap;gap:8px;margin:12px 0}
.links a{display:inline-block;padding:6px 12px;border:1px solid var(--line);border-radius:6px;background:#fff;
color:var(--accent);text-decoration:none}
.links a:hover{border-color:var(--accent)}
.tbl{overflow-x:auto;background:#fff;border:1px solid var(--line);border-radius:8px;margin:8px 0}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums;font-size:13px}
th,td{padding:6px 10px;border-bottom:1px solid #eef0f3;text-align:right;white-space:nowrap}
th{background:#f1f3f6;font-weight:600}
th:first-child,td:first-child{text-align:left}
tbody tr:nth-child(even){background:#fafbfc}
tbody tr:hover{background:#eef4ff}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:16px}
figure{margin:0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px}
figure img{width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:12.5px;margin-top:6px}
details summary{cursor:pointer;color:var(--muted)}
"""


def _table(df: pd.DataFrame, index: bool = True) -> str:
    return f"<div class='tbl'>{df.to_html(index=index, border=0, na_rep='–', float_format=lambda x: f'{x:.3g}')}</div>"


def _provenance(run: RunConfig) -> str:
    d = run.paths
    m = json.loads(d.manifest.read_text()) if d.manifest.is_file() else {}
    judge = m.get("judge") or {"kind": run.eval.judge.kind}
    steps = m.get("steps", {})
    device = next((s.get("device") for s in steps.values() if s.get("device")), "–")
    times = []
    for s in NOTEBOOKS:
        stamp = d.stamp(s)
        if stamp.is_file():
            times.append(f"{s} {json.loads(stamp.read_text()).get('seconds', 0):.0f} s")
    pk = m.get("packages", {})
    rows = [
        ("model", run.model.name),
        ("SAE", f"{run.sae.key} at {run.sae.hook_name}"),
        (
            "vectors",
            f"{run.effects.vectors.source}; loss target {run.effects.loss_target.kind} {run.effects.loss_target.value}",
        ),
        ("approximator", run.approximator.fit),
        ("eval", f"tasks {', '.join(run.eval.tasks)}; methods {', '.join(run.eval.methods)}"),
        ("judge", " ".join(str(v) for v in judge.values() if v)),
        ("seed", str(run.seed)),
        ("commit", str(m.get("git_commit", "–"))),
        ("device", str(device)),
        ("packages", ", ".join(f"{k} {v}" for k, v in pk.items()) or "–"),
        ("step times", ", ".join(times) or "–"),
    ]
    body = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in rows)
    sae_page = neuronpedia_sae_url(run)
    if sae_page is not None:  # the SAE's feature browser
        body += f"<dt>Neuronpedia</dt><dd><a href='{sae_page}' target='_blank' rel='noopener'>{sae_page}</a></dd>"
    params = ""
    if m.get("params"):
        params = (
            "<details><summary>all params</summary><pre><code>"
            + html.escape(json.dumps(m["params"], indent=1))
            + "</code></pre></details>"
        )
    return f"<div class='panel'><dl class='kv'>{body}</dl>{params}</div>"


def _tables(run: RunConfig) -> list[str]:
    d = run.paths
    parts: list[str] = []
    if d.summary.is_file():
        from saets_utils.evaluation.scoring import paper_style_table

        table = paper_style_table(pd.read_csv(d.summary)).round(3)
        parts += ["<h3>Max behaviour × coherence over scales (tasks × methods)</h3>", _table(table)]
    if d.targeting.is_file():
        from saets_utils.evaluation.scoring import paper_style_table
        from saets_utils.evaluation.targeting import load_targeting

        loaded = load_targeting(d.root)
        if loaded is not None and len(loaded[0]):
            tg, tg_summary = loaded
            parts += [
                "<h3>Targeting (judge-free)</h3>",
                "<p class='sub'>Each vector calibrated to 01's loss target, its SAE effect measured as in 01: rank "
                "of the best target feature among all features (1 = most raised) and target effect / off-target "
                "norm; per method, medians and geometric means over tasks with bootstrap CIs over tasks "
                f"(<code>{RunPaths.targeting.rel}</code>), and each method paired against SAE "
                f"(<code>{RunPaths.targeting_differences.rel}</code>).</p>",
                _table(tg_summary.round(3), index=False),
                "<h3>Target rank per task</h3>",
                _table(paper_style_table(tg, "target_rank").round(1)),
            ]
    parts += _targets(run)
    metrics = d.approximator_metrics
    if metrics.is_file():
        from saets_utils.approximator.training import verdict

        m = json.loads(metrics.read_text())
        keys = [k for k in ("r2", "r2_ci_low", "r2_ci_high", "noise_ceiling", "mse", "mse_mean", "n_val") if k in m]
        parts += [
            "<h3>Effect approximator</h3>",
            f"<p><b>{html.escape(verdict(m))}</b></p>",
            _table(pd.DataFrame([{k: m[k] for k in keys}]), index=False),
        ]
    return parts


def _targets(run: RunConfig) -> list[str]:
    """The tasks' target features 03 used (``eval/targets.json``), one row per task and target list,
    each id with its label, linked to Neuronpedia (hosted SAEs) or to its dashboard card."""
    from saets_utils.report.features import load_labels
    from saets_utils.report.neuronpedia import feature_html, neuronpedia_url

    d = run.paths
    path = d.targets
    if not path.is_file():
        return []
    labels = load_labels(d.root)
    cards = d.features_page.is_file()
    groups: dict[tuple[str, str], list[str]] = {}
    for row in json.loads(path.read_text()):
        t = json.loads(row["targets"]) if isinstance(row["targets"], str) else row["targets"]
        groups.setdefault((row["task"], json.dumps(t)), []).append(row["method"])

    def feature(f: int, w: float) -> str:
        text = f"#{f} {labels.get(f, '')}".rstrip() + f" ({w:.2g})"
        if neuronpedia_url(run, f) is None and cards:
            return f"<a href='{d.features_page.name}#f{f}'>{html.escape(text)}</a>"
        return feature_html(run, f, text)

    rows = "".join(
        f"<tr><td>{html.escape(task)}</td><td>{html.escape(', '.join(methods))}</td>"
        f"<td style='text-align:left;white-space:normal'>{', '.join(feature(int(f), float(w)) for f, w in json.loads(t))}</td></tr>"
        for (task, t), methods in groups.items()
    )
    if not rows:
        return []
    return [
        "<h3>Target features</h3>",
        "<div class='tbl'><table><thead><tr><th>task</th><th>methods</th><th style='text-align:left'>targets "
        f"(weight)</th></tr></thead><tbody>{rows}</tbody></table></div>",
    ]


def _figures(run: RunConfig) -> str:
    d = run.paths
    pngs = sorted(d.figures_dir.glob("*.png")) + sorted(d.study_dir.glob("*.png"))
    cells = []
    for png in pngs:
        stem = png.stem
        cap = CAPTIONS.get(stem) or (
            f"Effect profile of vector {stem.rsplit('_', 1)[1]} (target red, dense hatched, feature labels)."
            if stem.startswith("effect_profile_")
            else stem.replace("_", " ")
        )
        rel = f"../{png.parent.name}/{png.name}"
        cells.append(
            f"<figure><a href='{rel}'><img src='{rel}' alt='{html.escape(stem)}' loading='lazy'></a>"
            f"<figcaption><b>{html.escape(stem)}</b> · {html.escape(cap)}</figcaption></figure>"
        )
    return f"<div class='grid'>{''.join(cells)}</div>" if cells else "<p class='sub'>No figures yet (run 04).</p>"


def render_index(run: RunConfig) -> str:
    """The index page of ``run`` as a standalone HTML string."""
    d = run.paths  # the links are relative to reports/
    links = [f"<a href='{d.report(s).name}'>{s}</a>" for s in NOTEBOOKS if d.report(s).is_file()]
    if d.features_page.is_file():
        links.append(f"<a href='{d.features_page.name}'>feature dashboards</a>")
    parts = [
        f"<h1>saets · run <code>{html.escape(run.name)}</code></h1>",
        "<p class='sub'>SAE-Targeted Steering (Chalnev, Siu &amp; Conmy, 2024): measured effects, effect "
        "approximator, steering evaluation.</p>",
        "<h2>Settings and provenance</h2>",
        _provenance(run),
        "<h2>Notebook reports</h2>",
        f"<nav class='links'>{''.join(links) or '<span class=sub>none yet</span>'}</nav>",
        "<h2>Headline results</h2>",
        *(_tables(run) or ["<p class='sub'>No results yet.</p>"]),
        "<h2>Figures</h2>",
        _figures(run),
    ]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>saets {html.escape(run.name)}</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(parts)}</main></body></html>"
    )


def write_index(run: RunConfig) -> Path:
    """Write ``reports/index.html`` (and the feature dashboards it links to) and return its path."""
    from saets_utils.report.dashboards import write_dashboards

    write_dashboards(run)
    path = run.paths.index_page
    atomic_write_text(path, render_index(run))
    return path
