"""Merge finished shards into notebook 01's output files, and read them back (for 02 and widgets).

Outputs in ``results/<run>/``:
- ``effects.safetensors``: ``effects [n, d_sae]``, ``effect_halves [n, 2, d_sae]`` (the effect measured
  on each half of the rollouts: two independent measurements), ``vectors [n, d_model]`` (unit directions),
  ``scales [n]``, ``vector_ids [n]`` (int64, ascending), ``used_vectors [n, d_model]`` (v * scale),
  ``losses [n, g]`` (calibration sweep, NaN where it stopped);
- ``baseline.safetensors``: ``mean [d_sae]``, ``density [d_sae]`` of the unsteered rollouts;
- ``effects_samples.safetensors``: ``vector_ids [n]``, ``sample_tokens [n, k, total_tokens]``;
- ``effects_table.csv``: id, scale, status, seconds; ``effects_meta.json``: settings and counts.

The set is consistent: each file is written atomically, and ``effects_meta.json``, written last,
names the merge (``merge_id``, also in each safetensors file's metadata) and the table's digest;
:func:`load_effects` refuses a mixed set left by a merge that was interrupted (re-run 01 to merge).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from saets_utils.effects.plan import Plan, current_shards
from saets_utils.io_utils import atomic_save_safetensors, atomic_write_json, atomic_write_text
from saets_utils.paths import RunPaths
from saets_utils.steering.hooks import steering_delta

if TYPE_CHECKING:
    from saets_utils.config import RunConfig


def _read_shard(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 - safe_open has keys() only


def merge_effects(run: RunConfig, plan: Plan) -> Path:
    """Combine the plan's shards (each vector once, in id order) with the plan into the output files."""
    rows: dict[int, dict] = {}
    for p in current_shards(run, plan):
        t, meta = _read_shard(p)
        status = json.loads(meta["status"])
        for j, vid in enumerate(t["vector_ids"].tolist()):
            rows.setdefault(
                vid,
                {
                    "effects": t["effects"][j],
                    "halves": t["effect_halves"][j],
                    "scale": float(t["scales"][j]),
                    "losses": t["losses"][j],
                    "samples": t["sample_tokens"][j],
                    "status": status[j],
                    "seconds": float(meta["seconds"]),
                },
            )
    order = torch.argsort(plan.vector_ids)
    ids = plan.vector_ids[order]
    missing = [v for v in ids.tolist() if v not in rows]
    if missing:
        raise RuntimeError(f"cannot merge: vectors {missing[:5]} (of {len(missing)}) have no shard")
    recs = [rows[v] for v in ids.tolist()]
    vectors = plan.vectors[order]
    scales = torch.tensor([r["scale"] for r in recs], dtype=torch.float32)
    out = run.paths
    tag = {"merge_id": uuid.uuid4().hex[:12]}
    atomic_save_safetensors(
        {
            "effects": torch.stack([r["effects"] for r in recs]).float(),
            "vectors": vectors.float(),
            "effect_halves": torch.stack([r["halves"] for r in recs]).float(),
            "scales": scales,
            "vector_ids": ids.long(),
            "used_vectors": steering_delta(vectors.float(), scales),
            "losses": torch.stack([r["losses"] for r in recs]).float(),
        },
        out.effects,
        tag,
    )
    atomic_save_safetensors(
        {
            "mean": plan.baseline_mean.float(),
            "density": plan.baseline_density.float(),
            "halves": plan.baseline_halves.float(),
        },
        out.baseline,
        tag,
    )
    atomic_save_safetensors(
        {"vector_ids": ids.long(), "sample_tokens": torch.stack([r["samples"] for r in recs])},
        out.effects_samples,
        tag,
    )
    table = pd.DataFrame(
        {
            "id": ids.tolist(),
            "scale": scales.tolist(),
            "status": [r["status"] for r in recs],
            "seconds": [r["seconds"] for r in recs],
        }
    )
    csv = table.to_csv(index=False)
    atomic_write_text(out.effects_table, csv)
    atomic_write_json(  # last: it names the set the files above belong to
        out.effects_meta,
        {
            **tag,
            "table_sha256": hashlib.sha256(csv.encode()).hexdigest(),
            "model": run.model.model_dump(),
            "sae": {**run.sae.model_dump(), "key": run.sae.key},
            "hook_name": run.sae.hook_name,
            "effects": run.effects.model_dump(),
            "seed": run.seed,
            "fingerprint": plan.fingerprint,
            "n_vectors": len(ids),
            "d_sae": int(plan.baseline_mean.shape[0]),
            "d_model": int(vectors.shape[1]),
            "unsteered_loss": plan.unsteered_loss,
            "baseline_positions": plan.baseline_positions,
            "status_counts": dict(Counter(table["status"])),
            "seconds_per_vector_mean": float(table["seconds"].mean()),
        },
    )
    return out.effects


@dataclass
class Effects:
    """Notebook 01's results as read back: tensors in id order, the per-vector table, the baseline
    ``mean``/``density`` and the metadata."""

    effects: Tensor
    vectors: Tensor
    scales: Tensor
    vector_ids: Tensor
    table: pd.DataFrame
    baseline_mean: Tensor
    baseline_density: Tensor
    meta: dict
    sample_tokens: Tensor | None = None
    halves: Tensor | None = None  # [n, 2, d_sae]: the effect from each half of the rollouts

    def row(self, vector_id: int) -> int:
        """Row index of ``vector_id``; KeyError naming the id if it was not measured."""
        hits = (self.vector_ids == int(vector_id)).nonzero()
        if hits.numel() == 0:
            raise KeyError(f"vector id {vector_id} was not measured in this run")
        return int(hits[0, 0])

    @property
    def valid(self) -> Tensor:
        """``[n]`` bool: rows with a finite scale and finite effects."""
        return torch.isfinite(self.scales) & torch.isfinite(self.effects).all(-1)


def _check_merged_set(d: RunPaths, meta: dict, tensor_files: list[Path]) -> None:
    """Every file belongs to the merge ``effects_meta.json`` names (sets from before merge ids pass)."""
    if "merge_id" not in meta:
        return
    bad = []
    for p in tensor_files:
        if p.is_file():
            with safe_open(str(p), "pt") as f:
                if (f.metadata() or {}).get("merge_id") != meta["merge_id"]:
                    bad.append(p.name)
    if hashlib.sha256(d.effects_table.read_bytes()).hexdigest() != meta.get("table_sha256"):
        bad.append(d.effects_table.name)
    if bad:
        raise RuntimeError(
            f"{d.root}: {bad} do not belong to the merge {d.effects_meta.name} records (an interrupted merge); "
            "re-run notebooks/01_effects.ipynb, which merges its saved shards again"
        )


def load_effects(results_dir: str | Path) -> Effects:
    """Read ``results/<run>/`` files written by :func:`merge_effects`; clear error if 01 has not run."""
    d = RunPaths(results_dir)
    if not d.effects.is_file():
        raise FileNotFoundError(f"{d.effects} not found; run notebooks/01_effects.ipynb first")
    meta = json.loads(d.effects_meta.read_text())
    samples = d.effects_samples
    _check_merged_set(d, meta, [d.effects, d.baseline, samples])
    t = load_file(d.effects)
    b = load_file(d.baseline)
    return Effects(
        effects=t["effects"],
        vectors=t["vectors"],
        scales=t["scales"],
        vector_ids=t["vector_ids"],
        table=pd.read_csv(d.effects_table),
        baseline_mean=b["mean"],
        baseline_density=b["density"],
        meta=meta,
        sample_tokens=load_file(samples)["sample_tokens"] if samples.is_file() else None,
        halves=t.get("effect_halves"),
    )
