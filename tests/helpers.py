"""Shared test constants and the one way tests build a tiny run config.

The tiny model and SAE are conftest's ``tiny_model`` / ``tiny_sae`` (3 layers, d_model 32; 64
TopK-4 features at ``HOOK``); ``TINY_PARAMS`` sizes the effects step for seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from saets_utils.config import RunConfig, _deep_update, load_config

HOOK = "blocks.1.hook_resid_post"
BOS = 1  # the tiny tokenizer's <bos>
D_MODEL, D_SAE, K = 32, 64, 4

TINY_PARAMS: dict[str, Any] = {
    "approximator": {"holdout": 1},  # < the fewest vectors a tiny run measures
    "model": {"source": "tiny", "bos_token_id": BOS},
    "sae": {"source": "tiny", "hook_name": HOOK, "train": {"d_sae": D_SAE, "k": K}},
    "effects": {
        "scale_grid": {"start": 0, "stop": 40, "step": 10},
        "loss_target": {"kind": "relative", "value": 0.3},
        "loss_chunks": 4,
        "loss_chunk_tokens": 16,
        "prompts": ["", "I think"],
        "samples_per_prompt": 4,
        "total_tokens": 16,
        "baseline_multiplier": 2,
    },
}


def build_run_cfg(tmp_path: Path, *updates: Mapping[str, Any], stem: str = "tinyrun", **overrides: Any) -> RunConfig:
    """A tiny run: ``TINY_PARAMS`` deep-updated by each of ``updates``, then by ``overrides`` (one
    keyword per top-level key, e.g. ``seed=1, effects={"vectors_per_batch": 2}``), written to
    ``tmp_path/params/<stem>.yaml`` and read back with ``load_config``, as a real params file is.
    Results go to ``tmp_path/results`` unless ``results_root`` is given.

    Example:
        >>> run = build_run_cfg(tmp_path, seed=1, effects={"vectors": {"source": "decoder_rows", "ids": [0, 1]}})
    """
    data = {**TINY_PARAMS, "results_root": str(tmp_path / "results")}
    for u in (*updates, overrides):
        data = _deep_update(data, dict(u))  # nested keys merge as load_config merges its overrides
    path = tmp_path / "params" / f"{stem}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return load_config(path)
