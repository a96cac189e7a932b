"""Published SAE-TS results (Chalnev, Siu, Conmy 2024): max over steering scales of
mean behavioural score x mean coherence score, per task and method.

Kept as data so notebooks can put our numbers beside the paper's. The data keep the paper's
method names (its column headers); tables use ours, mapped through each method's ``paper_name`` in
:mod:`saets_utils.registry` (the paper's "Pinv" is ``pinverse``, "Rotation" is ``rotation``).
Task names are our file stems.
"""

from __future__ import annotations

import re

import pandas as pd

from saets_utils.registry import REGISTRY

# The paper's column headers, in its order.
_METHODS_2B = ("CAA", "SAE", "SAE-TS", "Pinv", "Rotation")

# Gemma-2-2B, Gemma Scope layer 12, 16k, L0 82 (paper's results table).
_GEMMA_2_2B: dict[str, tuple[float, ...]] = {
    "anger": (0.1666, 0.0810, 0.2424, 0.1899, 0.2460),
    "christian": (0.3486, 0.0902, 0.3302, 0.0025, 0.0870),
    "conspiracy": (0.3748, 0.2319, 0.3729, 0.0644, 0.4074),
    "french": (0.2684, 0.0589, 0.3186, 0.1912, 0.3724),
    "london": (0.0476, 0.0061, 0.5380, 0.0722, 0.2745),
    "love": (0.3039, 0.1004, 0.4234, 0.2682, 0.3851),
    "praise": (0.1332, 0.2654, 0.2842, 0.0638, 0.2833),
    "want_to_die": (0.1284, 0.0649, 0.1870, 0.1683, 0.2167),
    "wedding": (0.1768, 0.2626, 0.5432, 0.0567, 0.5313),
    "average": (0.2165, 0.1290, 0.3600, 0.1197, 0.3115),
}

# The nine reference tasks, in the paper's order (names as our task files spell them).
REFERENCE_TASKS: tuple[str, ...] = tuple(t for t in _GEMMA_2_2B if t != "average")

# Gemma-2-9B: the paper gives averages over the nine tasks only.
_GEMMA_2_9B_AVERAGE: dict[str, float] = {"CAA": 0.2531, "SAE": 0.2184, "SAE-TS": 0.3376}

# The paper's method name -> ours.
_OURS: dict[str, str] = {m.paper_name: m.name for m in REGISTRY if m.paper_name is not None}

# Base models only: the paper steered the pretrained models, not the "-it" variants.
_PATTERNS = {
    "gemma-2-2b": re.compile(r"gemma-2-2b(?!-it)", re.IGNORECASE),
    "gemma-2-9b": re.compile(r"gemma-2-9b(?!-it)", re.IGNORECASE),
}


def _rows(model: str) -> list[tuple[str, str, float]]:
    if model == "gemma-2-2b":
        return [(t, _OURS[m], p) for t, vals in _GEMMA_2_2B.items() for m, p in zip(_METHODS_2B, vals)]
    return [("average", _OURS[m], p) for m, p in _GEMMA_2_9B_AVERAGE.items()]


def published_model(model_name: str) -> str | None:
    """``"gemma-2-2b"`` / ``"gemma-2-9b"`` when ``model_name`` (TransformerLens or HF name) is one, else None."""
    for key, pat in _PATTERNS.items():
        if pat.search(model_name):
            return key
    return None


def published_table(model_name: str) -> pd.DataFrame | None:
    """The paper's max behaviour x coherence as a long table ``task, method, product``.

    Rows with ``task == "average"`` hold the paper's averages over the nine tasks. None for models
    the paper did not evaluate (e.g. the embedded SmolLM2 default).

    Example:
        >>> published_table("google/gemma-2-2b").query("task == 'london'")
    """
    model = published_model(model_name)
    if model is None:
        return None
    return pd.DataFrame(_rows(model), columns=["task", "method", "product"])
