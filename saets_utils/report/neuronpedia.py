"""Neuronpedia links for Gemma Scope features: ``neuronpedia_url(run, feature_id)``.

Neuronpedia hosts Gemma Scope's canonical residual-stream SAEs of Gemma-2-2B and -9B as
``https://www.neuronpedia.org/<model>/<layer>-gemmascope-res-<width>/<feature id>``. Any other SAE
(the embedded default, a trained or tiny one, a non-canonical Gemma Scope L0) gets None: no link is
better than a link to another SAE's feature.
"""

from __future__ import annotations

import re

from saets_utils.config import RunConfig

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
