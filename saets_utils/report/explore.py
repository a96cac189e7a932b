"""Plain functions behind the effect explorer (notebook 01, :class:`saets_utils.report.widgets.EffectExplorer`).

They read one run's :class:`~saets_utils.effects.store.Effects` and answer: which features does a
steering vector raise and lower (and are they dense), was its steering scale calibrated, does a
decoder-row vector raise its own feature, what does steered text look like, and which vectors
raise a given feature most.

Example:
    >>> eff = load_run_effects(run)
    >>> top_effects(eff, 2, k=5)
    >>> find_vectors_by_feature(eff, feature=30, k=5)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from saets_utils.config import RunConfig
from saets_utils.effects.store import Effects, load_effects
from saets_utils.manifest import check_current

# Features active on more than 1% of baseline positions are "dense" (BOS, position, punctuation
# features); their effects are usually generic side effects rather than the vector's meaning.
DENSE_THRESHOLD = 0.01


def load_run_effects(run: RunConfig) -> Effects:
    """The effects 01 wrote for ``run``; raises :class:`~saets_utils.manifest.StaleInputs` (naming
    01_effects) when they are not the files the last finished 01 recorded, e.g. an earlier run's
    beside an interrupted one."""
    check_current(run, ("01_effects",), "the effect explorer")
    return load_effects(run.results_dir)


def is_decoder_rows(effects: Effects) -> bool:
    """True when the measured vectors are this run's SAE decoder rows (vector id = feature id)."""
    return effects.meta.get("effects", {}).get("vectors", {}).get("source") == "decoder_rows"


def top_features(
    effect: Float[Tensor, " d_sae"],
    density: Float[Tensor, " d_sae"] | None = None,
    k: int = 15,
    lowered: bool = True,
    dense_threshold: float = DENSE_THRESHOLD,
) -> pd.DataFrame:
    """The ``k`` most raised features of one effect vector ``[d_sae]`` (measured or predicted) and,
    with ``lowered``, the ``k`` most lowered; rows sorted by effect, largest first.

    Columns: feature, effect, density (NaN without ``density``), direction (raised/lowered), dense.
    Without ``lowered`` the ``k`` largest entries are kept whatever their sign.
    """
    e = torch.as_tensor(effect).detach().double().cpu().flatten()
    e = torch.where(torch.isfinite(e), e, torch.full_like(e, float("nan")))
    finite = torch.isfinite(e)
    k = max(0, min(int(k), int(finite.sum())))
    hi = torch.where(finite, e, torch.full_like(e, -float("inf"))).topk(k)
    ids = hi.indices.tolist() if not lowered else [i for i, v in zip(hi.indices.tolist(), hi.values.tolist()) if v > 0]
    if lowered:
        lo = torch.where(finite, e, torch.full_like(e, float("inf"))).topk(k, largest=False)
        ids += [i for i, v in zip(lo.indices.tolist(), lo.values.tolist()) if v < 0 and i not in ids]
    ids.sort(key=lambda i: -float(e[i]))
    dens = np.full(len(ids), np.nan) if density is None else torch.as_tensor(density).double().cpu()[ids].numpy()
    vals = e[ids].numpy() if ids else np.zeros(0)
    return pd.DataFrame(
        {
            "feature": np.asarray(ids, dtype=np.int64),
            "effect": vals,
            "density": dens,
            "direction": np.where(vals > 0, "raised", "lowered"),
            "dense": dens > dense_threshold,
        }
    )


def top_effects(
    effects: Effects, vector_id: int, k: int = 15, dense_threshold: float = DENSE_THRESHOLD
) -> pd.DataFrame:
    """The ``k`` features vector ``vector_id`` raises most and the ``k`` it lowers most, with their
    baseline density (see :func:`top_features`); empty when the vector's effect was not measured."""
    row = effects.row(vector_id)
    return top_features(effects.effects[row], effects.baseline_density, k, True, dense_threshold)


def _table_row(effects: Effects, vector_id: int) -> dict[str, Any]:
    hit = effects.table[effects.table["id"] == int(vector_id)]
    return hit.iloc[0].to_dict() if len(hit) else {}


def vector_summary(effects: Effects, vector_id: int, is_decoder_row: bool | None = None, k: int = 15) -> dict[str, Any]:
    """Scale, calibration status and seconds of one vector and, for SAE decoder-row vectors, how its
    own feature fares among its effects: 1-based ``own_rank`` (1 = raised most), ``own_in_top_k``
    and ``own_effect``. ``is_decoder_row`` defaults to the run's vector source."""
    row = effects.row(vector_id)
    is_decoder_row = is_decoder_rows(effects) if is_decoder_row is None else is_decoder_row
    e = effects.effects[row].double()
    valid = bool(effects.valid[row])
    info = _table_row(effects, vector_id)
    out: dict[str, Any] = {
        "vector_id": int(vector_id),
        "scale": float(effects.scales[row]),
        "status": info.get("status", "unknown"),
        "seconds": float(info.get("seconds", float("nan"))),
        "valid": valid,
        "is_decoder_row": is_decoder_row,
        "top_feature": int(e.argmax()) if valid else None,
        "top_effect": float(e.max()) if valid else None,
        "own_feature": None,
        "own_rank": None,
        "own_in_top_k": None,
        "own_effect": None,
        "k": k,
    }
    if is_decoder_row and valid and 0 <= int(vector_id) < e.numel():
        own = int(vector_id)
        rank = int((e > e[own]).sum()) + 1
        out.update(own_feature=own, own_rank=rank, own_in_top_k=rank <= k, own_effect=float(e[own]))
    return out


def decode_samples(effects: Effects, vector_id: int, tokenizer: Any, skip_special_tokens: bool = True) -> list[str]:
    """The steered rollouts kept for ``vector_id`` (start token dropped), decoded; empty when the
    run kept no samples or the vector was skipped."""
    if effects.sample_tokens is None:
        return []
    row = effects.row(vector_id)
    if not bool(effects.valid[row]):
        return []
    return [
        tokenizer.decode(t[1:].tolist(), skip_special_tokens=skip_special_tokens)
        for t in effects.sample_tokens[row]
        if t.any()
    ]


def vectors_raising_feature(effects: Effects, feature: int, k: int = 10) -> pd.DataFrame:
    """The ``k`` vectors whose measured effect raises SAE ``feature`` most (positive effects only).

    Columns: vector_id, effect, scale, status; largest effect first.
    """
    d_sae = effects.effects.shape[1]
    if not 0 <= int(feature) < d_sae:
        raise ValueError(f"feature {feature} is out of range for an SAE with d_sae={d_sae}")
    col = effects.effects[:, int(feature)].double()
    col = torch.where(effects.valid & torch.isfinite(col), col, torch.full_like(col, -float("inf")))
    vals, rows = col.topk(min(int(k), col.numel()))
    keep = vals > 0
    rows, vals = rows[keep], vals[keep]
    ids = effects.vector_ids[rows].tolist()
    status = effects.table.set_index("id")["status"]
    return pd.DataFrame(
        {
            "vector_id": ids,
            "effect": vals.numpy(),
            "scale": effects.scales[rows].double().numpy(),
            "status": [status.get(i, "unknown") for i in ids],
        }
    )


def find_vectors_by_feature(effects: Effects, feature: int, k: int = 10) -> list[int]:
    """Ids of the ``k`` vectors that raise SAE ``feature`` most (see :func:`vectors_raising_feature`)."""
    return vectors_raising_feature(effects, feature, k)["vector_id"].tolist()


def effects_overview(effects: Effects) -> pd.DataFrame:
    """One table for notebook 01: vector counts per calibration status, quantiles of the calibrated
    steering scale, mean seconds per vector and, for decoder rows, how often a vector raises its own
    feature most. Columns: quantity, value."""
    rows: list[tuple[str, float]] = [
        ("vectors", float(len(effects.vector_ids))),
        ("vectors with finite effects", float(effects.valid.sum())),
    ]
    for status, n in effects.table["status"].value_counts().sort_index().items():
        rows.append((f"status: {status}", float(n)))
    scales = effects.scales[torch.isfinite(effects.scales)].double()
    if scales.numel():
        for name, q in (("min", 0.0), ("25%", 0.25), ("median", 0.5), ("75%", 0.75), ("max", 1.0)):
            rows.append((f"steering scale {name}", float(scales.quantile(q))))
    rows.append(("seconds per vector (mean)", float(effects.table["seconds"].mean())))
    if is_decoder_rows(effects):
        ok = effects.valid & (effects.vector_ids < effects.effects.shape[1])
        if ok.any():
            own = effects.effects[ok].argmax(1) == effects.vector_ids[ok]
            rows.append(("decoder rows raising their own feature most", float(own.double().mean())))
    return pd.DataFrame(rows, columns=["quantity", "value"])
