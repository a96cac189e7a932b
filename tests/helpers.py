"""Shared test constants and the one way tests build a tiny run config.

The tiny model and SAE are conftest's ``tiny_model`` / ``tiny_sae`` (3 layers, d_model 32; 64
TopK-4 features at ``HOOK``); ``TINY_PARAMS`` sizes the effects step for seconds on a CPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from saets_utils.config import RunConfig, _deep_update, load_config
from saets_utils.effects.plan import work_dir

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


# --- notebook 01's runner tests (test_effects_runner, test_effects_workers) ---

N_VECTORS = 24  # with 2 vectors per block: 12 blocks, so a kill lands mid-run even on a slow machine
WAIT_S = 240  # bound on every wait for worker subprocesses


DECODER_ROWS = {"source": "decoder_rows", "ids": {"start": 0, "stop": N_VECTORS}}


def tiny_run(tmp_path: Path, **effects: Any) -> RunConfig:
    """The tiny run of these tests: N_VECTORS decoder rows, 2 per block, seed 1; ``effects`` keys replace these."""
    return build_run_cfg(tmp_path, seed=1, effects={"vectors": DECODER_ROWS, "vectors_per_batch": 2, **effects})


FIRST_8 = {"source": "decoder_rows", "ids": {"start": 0, "stop": 8}}  # 4 blocks: the worker tests' runs


def assert_equals_reference(run: RunConfig, reference) -> None:
    """``run``'s merged files equal the uninterrupted reference run's rows of the same vector ids
    (each vector's numbers depend only on its id and the settings, not on its block or worker)."""
    ref_run, ref_path = reference
    got, ref = load_file(run.results_dir / "effects.safetensors"), load_file(ref_path)
    ids = got["vector_ids"].tolist()
    rows = [ref["vector_ids"].tolist().index(v) for v in ids]
    for k in ("effects", "effect_halves", "scales", "vectors", "used_vectors", "losses"):
        torch.testing.assert_close(got[k], ref[k][rows], atol=1e-5, rtol=1e-5, equal_nan=True, msg=k)
    t_got = pd.read_csv(run.results_dir / "effects_table.csv")
    t_ref = pd.read_csv(ref_run.results_dir / "effects_table.csv").set_index("id")
    assert t_got["status"].tolist() == t_ref.loc[ids, "status"].tolist()


def shard_files(run) -> list[Path]:
    return sorted((work_dir(run) / "shards").glob("*.safetensors"))


def shard_ids(run) -> Counter:
    ids: Counter = Counter()
    for p in shard_files(run):
        with safe_open(str(p), "pt") as f:
            ids.update(f.get_tensor("vector_ids").tolist())
    return ids
