"""Neuronpedia links for Gemma Scope features: ``neuronpedia_url(run, feature_id)``.

Neuronpedia hosts Gemma Scope's canonical residual-stream SAEs of Gemma-2-2B and -9B as
``https://www.neuronpedia.org/<model>/<layer>-gemmascope-res-<width>/<feature id>``. Any other SAE
(the embedded default, a trained or tiny one, a non-canonical Gemma Scope L0) gets None: no link is
better than a link to another SAE's feature.

Where a person reads feature ids (the dashboards page, the report index, the effect explorer and the
playground) they are rendered with :func:`feature_html` and :func:`table_html`: the id links to its
Neuronpedia page when the run's SAE is hosted there, and is plain escaped text otherwise.
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING, Any

from saets_utils.config import RunConfig

if TYPE_CHECKING:
    import pandas as pd

BASE = "https://www.neuronpedia.org"
# Gemma Scope ids whose average L0 is the canonical SAE's (docs/reference.md): (model size, layer, width) -> L0.
CANONICAL_L0 = {("2b", 12, "16k"): 82, ("9b", 12, "16k"): 130}
_RELEASE = re.compile(r"^(?:google/)?gemma-scope-(2b|9b)-pt-res(?:-canonical)?$")
_SAE_ID = re.compile(r"^layer_(\d+)/width_(\d+[km])/(canonical|average_l0_(\d+))$")


def neuronpedia_source(run: RunConfig) -> str | None:
    """``<model>/<layer>-gemmascope-res-<width>`` of the run's SAE on Neuronpedia, or None."""
    sae, model = run.sae, run.model
    release = sae.release if sae.source == "sae_lens" else sae.repo_id if sae.source == "gemma_scope_npz" else None
    m = _RELEASE.match(release or "")
    s = _SAE_ID.match(sae.sae_id or "")
    name = model.name.split("/")[-1].lower()
    if m is None or s is None or model.source not in ("transformer_lens", "local") or name != f"gemma-2-{m[1]}":
        return None
    size, layer, width = m[1], int(s[1]), s[2]
    if sae.hook_name != f"blocks.{layer}.hook_resid_post":
        return None
    if s[4] is not None and CANONICAL_L0.get((size, layer, width)) != int(s[4]):
        return None  # a non-canonical L0: Neuronpedia's set is the canonical one
    return f"gemma-2-{size}/{layer}-gemmascope-res-{width}"


def neuronpedia_url(run: RunConfig, feature_id: int) -> str | None:
    """The Neuronpedia page of SAE feature ``feature_id`` of the run's SAE, or None where Neuronpedia
    does not host that SAE (e.g. ``https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k/4111``)."""
    src = neuronpedia_source(run)
    return None if src is None or int(feature_id) < 0 else f"{BASE}/{src}/{int(feature_id)}"


def neuronpedia_sae_url(run: RunConfig | None) -> str | None:
    """The Neuronpedia page of the run's SAE (its feature browser), or None where it is not hosted."""
    src = None if run is None else neuronpedia_source(run)
    return None if src is None else f"{BASE}/{src}"


def feature_html(run: RunConfig | None, feature_id: int, text: str | None = None) -> str:
    """``text`` (default ``#<id>``) as HTML, escaped, and a link to the feature's Neuronpedia page
    where the run's SAE is hosted there (``run`` None: no link)."""
    shown = html.escape(f"#{int(feature_id)}" if text is None else text)
    url = None if run is None else neuronpedia_url(run, feature_id)
    if url is None:
        return shown
    return (
        f"<a href='{url}' target='_blank' rel='noopener' title='feature {int(feature_id)} on Neuronpedia'>{shown}</a>"
    )


def table_html(df: pd.DataFrame, run: RunConfig | None, column: str = "feature", **to_html: Any) -> str:
    """``df.to_html(**to_html)`` with the ids of ``column`` linked to Neuronpedia (see :func:`feature_html`);
    unchanged where the run's SAE is not hosted there. Every other cell is escaped as ``to_html`` would."""
    if run is None or column not in df or neuronpedia_source(run) is None:
        return df.to_html(**to_html)
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    fmt = dict(to_html.pop("formatters", None) or {})
    for c in df.columns:
        if c == column:
            fmt[c] = lambda f: feature_html(run, int(f), str(int(f)))
        elif c not in fmt and not (is_numeric_dtype(df[c]) or is_bool_dtype(df[c])):  # text: escaped
            fmt[c] = lambda v: html.escape(str(v))
    out = df.rename(columns=lambda c: html.escape(str(c)))
    fmt = {html.escape(str(c)): f for c, f in fmt.items()}
    return out.to_html(formatters=fmt, escape=False, **to_html)
