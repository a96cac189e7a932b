"""Notebook 01's plan and work folder: what a run measures, and the settings it was made with.

``results/<run>/effects_work/plan.safetensors`` holds the vectors, the loss chunks and the unsteered
baseline; its fingerprint hashes every setting that changes the numbers, so work made with other
settings is never resumed (the runner) nor reused (the store, targeting).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from saets_utils.config import RunConfig
from saets_utils.io_utils import atomic_save_safetensors

WORK = "effects_work"
RECIPE_VERSION = 3  # bump when the measurement changes, so stale partial work is not resumed


def work_dir(run: RunConfig) -> Path:
    return run.results_dir / WORK


def fingerprint(run: RunConfig) -> str:
    """Hash of every setting that changes the numbers (not batching, not worker count)."""
    eff = run.effects.model_dump(exclude={"vectors_per_batch"})
    blob = json.dumps(
        {
            "model": run.model.model_dump(),
            "sae": run.sae.model_dump(),
            "text": run.text.model_dump(),
            "effects": eff,
            "seed": run.seed,
            "recipe": RECIPE_VERSION,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Plan:
    """What a run measures: ``vector_ids [n]``, ``vectors [n, d_model]``, loss chunks ``[c, seq]``,
    ``baseline_mean / baseline_density [d_sae]``, ``baseline_halves [2, d_sae]`` (mean of each half of the
    baseline rollouts), the unsteered loss and the settings fingerprint."""

    vector_ids: Tensor
    vectors: Tensor
    loss_tokens: Tensor
    baseline_mean: Tensor
    baseline_density: Tensor
    baseline_halves: Tensor
    unsteered_loss: float
    baseline_positions: int
    fingerprint: str

    def save(self, path: Path) -> None:
        tensors = {
            k: getattr(self, k).contiguous()
            for k in ("vector_ids", "vectors", "loss_tokens", "baseline_mean", "baseline_density", "baseline_halves")
        }
        meta = {
            "unsteered_loss": repr(self.unsteered_loss),
            "baseline_positions": str(self.baseline_positions),
            "fingerprint": self.fingerprint,
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
            **t,
        )
