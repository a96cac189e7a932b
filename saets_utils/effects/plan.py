"""Notebook 01's plan and work folder: what a run measures, and the settings it was made with.

``results/<run>/effects_work/plan.safetensors`` holds the vectors, the loss chunks and the unsteered
baseline; its fingerprint hashes every setting that changes the numbers and the content of the SAE
and of a vectors file, so work made with other settings or inputs is never resumed (the runner) nor
reused (the store, targeting). Its ``plan_id`` is new each time a plan is built: shards carry it, so
work left by a discarded plan (``restart``) is never merged, even when the settings are the same.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from saets_utils.config import RunConfig
from saets_utils.io_utils import atomic_save_safetensors

WORK = "effects_work"
RECIPE_VERSION = 3  # bump when the measurement changes, so stale partial work is not resumed


def work_dir(run: RunConfig) -> Path:
    return run.results_dir / WORK


# Settings that do not change the numbers: batching, where and how workers run, and
# ``sae.targets_key`` (read by 03 only).
NOT_FINGERPRINTED = {"vectors_per_batch", "executor", "slurm", "lease_s", "max_failures"}


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` (e.g. an SAE's state dict)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(tensors[k].shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (``missing`` if it does not exist: the caller reports that)."""
    p = Path(path)
    if not p.is_file():
        return "missing"
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def input_digests(run: RunConfig, sae: Any) -> dict[str, str]:
    """Content digests of the inputs besides settings: the SAE's weights (a retrained or replaced
    SAE file under the same settings) and the vectors file of ``effects.vectors.source: file``."""
    out = {"sae": tensors_digest(dict(sae.state_dict()))}
    if run.effects.vectors.source == "file":
        out["vectors_file"] = file_digest(run.effects.vectors.path or "")
    return out


def fingerprint(run: RunConfig, digests: dict[str, str] | None = None) -> str:
    """Hash of every setting that changes the numbers (not batching, not workers, not
    ``sae.targets_key``), and of the inputs' content ``digests`` (:func:`input_digests`)."""
    eff = run.effects.model_dump(exclude=NOT_FINGERPRINTED)
    blob = json.dumps(
        {
            "model": run.model.model_dump(),
            "sae": run.sae.model_dump(exclude={"targets_key"}),
            "text": run.text.model_dump(),
            "effects": eff,
            "seed": run.seed,
            "recipe": RECIPE_VERSION,
            "inputs": digests or {},
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Plan:
    """What a run measures: ``vector_ids [n]``, ``vectors [n, d_model]``, loss chunks ``[c, seq]``,
    ``baseline_mean / baseline_density [d_sae]``, ``baseline_halves [2, d_sae]`` (mean of each half of the
    baseline rollouts), the unsteered loss, the settings fingerprint and the id of this build."""

    vector_ids: Tensor
    vectors: Tensor
    loss_tokens: Tensor
    baseline_mean: Tensor
    baseline_density: Tensor
    baseline_halves: Tensor
    unsteered_loss: float
    baseline_positions: int
    fingerprint: str
    plan_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    inputs: dict[str, str] = field(default_factory=dict)  # input_digests at build time

    def save(self, path: Path) -> None:
        tensors = {
            k: getattr(self, k).contiguous()
            for k in ("vector_ids", "vectors", "loss_tokens", "baseline_mean", "baseline_density", "baseline_halves")
        }
        meta = {
            "unsteered_loss": repr(self.unsteered_loss),
            "baseline_positions": str(self.baseline_positions),
            "fingerprint": self.fingerprint,
            "plan_id": self.plan_id,
            "inputs": json.dumps(self.inputs),
        }
        atomic_save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: Path) -> Plan:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys() only
        return cls(
            unsteered_loss=float(meta["unsteered_loss"]),
            baseline_positions=int(meta["baseline_positions"]),
            fingerprint=meta["fingerprint"],
            plan_id=meta.get("plan_id", meta["fingerprint"]),
            inputs=json.loads(meta.get("inputs", "{}")),
            **t,
        )


def _shard_tag(path: Path) -> tuple[str, list[int]]:
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("plan_id", ""), f.get_tensor("vector_ids").tolist()


def current_shards(run: RunConfig, plan: Plan, seen: dict[Path, tuple[str, list[int]]] | None = None) -> list[Path]:
    """Finished shards of this plan (by plan id: work of a discarded plan is never taken), sorted;
    ``seen`` caches shards read before."""
    seen = {} if seen is None else seen
    for p in (work_dir(run) / "shards").glob("*.safetensors"):
        if p not in seen:
            try:
                seen[p] = _shard_tag(p)
            except FileNotFoundError:  # removed by a restart meanwhile
                continue
    return sorted(p for p, (pid, _) in seen.items() if pid == plan.plan_id)


def done_ids(run: RunConfig, plan: Plan, seen: dict[Path, tuple[str, list[int]]] | None = None) -> set[int]:
    """Vector ids already recorded in finished shards of this plan."""
    seen = {} if seen is None else seen
    return {v for p in current_shards(run, plan, seen) for v in seen[p][1]}


def plan_blocks(plan: Plan, size: int) -> list[list[int]]:
    """The fixed partition of the plan's rows into blocks of ``size``: the unit of claims and shards."""
    n = len(plan.vector_ids)
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def block_key(plan: Plan, size: int, k: int) -> str:
    return f"{plan.plan_id}-b{size}-{k:05d}"


def todo_blocks(run: RunConfig, plan: Plan) -> list[list[int]]:
    """Row indices into the plan of vectors still to measure, grouped by block."""
    done = done_ids(run, plan)
    ids = plan.vector_ids.tolist()
    blocks = [[r for r in b if ids[r] not in done] for b in plan_blocks(plan, run.effects.vectors_per_batch)]
    return [b for b in blocks if b]
