"""Notebook 01's plan and work folder: what a run measures, and the settings it was made with.

``results/<run>/effects_work/plan.safetensors`` holds the vectors, the loss chunks and the unsteered
baseline; its fingerprint hashes every setting that changes the numbers and the content of the SAE
and of a vectors file, so work made with other settings or inputs is never resumed (the runner) nor
reused (the store, targeting). Its ``plan_id`` is new each time a plan is built: shards carry it, so
work left by a discarded plan (``restart``) is never merged, even when the settings are the same.

A run may grow: a plan whose settings differ only in which vectors it measures (``effects.vectors``
``ids`` or ``count``: its :func:`base_fingerprint` is the same), that keeps every vector it had, bit for
bit, is extended instead of refused (:func:`grow_plan`). The grown plan gets a new id and lists the
old ones in ``ancestors``, whose shards stay its own: only the added vectors are measured.
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

RECIPE_VERSION = 3  # bump when the measurement changes, so stale partial work is not resumed


def work_dir(run: RunConfig) -> Path:
    return run.paths.effects_work


# Settings that do not change the numbers: batching, where and how workers run (the decode engine
# included: equal to float rounding, as batching), and ``sae.targets_key`` (read by 03 only).
NOT_FINGERPRINTED = {"vectors_per_batch", "executor", "slurm", "lease_s", "max_failures", "engine"}


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


def path_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in name order);
    ``missing`` if neither exists."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if not p.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}:{file_digest(f)};".encode())
    return h.hexdigest()[:16]


def input_digests(run: RunConfig, sae: Any) -> dict[str, str]:
    """Content digests of the inputs besides settings: the SAE's weights (a retrained or replaced
    SAE file under the same settings), the vectors file of ``effects.vectors.source: file``, and the
    files of ``other_sae``'s SAE when it is read from a path (a replaced SAE at the same path)."""
    from saets_utils.models.sae_loading import sae_source_path

    out = {"sae": tensors_digest(dict(sae.state_dict()))}
    spec = run.effects.vectors
    if spec.source == "file":
        out["vectors_file"] = file_digest(spec.path or "")
    other = sae_source_path(spec.sae) if spec.source == "other_sae" and spec.sae is not None else None
    if other is not None:  # the files the loader reads
        out["other_sae"] = path_digest(other)
    return out


def fingerprint(run: RunConfig, digests: dict[str, str] | None = None, *, vector_selection: bool = True) -> str:
    """Hash of every setting that changes the numbers (not batching, not workers, not
    ``sae.targets_key``), and of the inputs' content ``digests`` (:func:`input_digests`).
    ``vector_selection=False`` leaves out which vectors are measured (:func:`base_fingerprint`)."""
    eff = run.effects.model_dump(exclude=NOT_FINGERPRINTED)
    if eff["calibration"]["start"] == "hint":  # the default before ``start`` existed: fingerprints unchanged
        del eff["calibration"]["start"]
    else:  # the gradient start's level is fitted to the first block: its size changes the scales
        eff["pilot_vectors"] = run.effects.vectors_per_batch
    if not vector_selection:
        eff["vectors"] = {k: v for k, v in eff["vectors"].items() if k not in SELECTION}
        digests = {k: v for k, v in (digests or {}).items() if k != "vectors_file"}
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


# Settings of effects.vectors that only say which vectors are measured: a plan may grow along them.
SELECTION = {"ids", "count"}


def base_fingerprint(run: RunConfig, digests: dict[str, str] | None = None) -> str:
    """:func:`fingerprint` without the vector selection (``effects.vectors`` ``ids``/``count`` and the
    vectors file's digest): equal for runs that measure the same way and differ only in which vectors."""
    return fingerprint(run, digests, vector_selection=False)


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
    base_fingerprint: str = ""  # without the vector selection; "" in plans saved before growth existed
    ancestors: list[str] = field(default_factory=list)  # ids of the plans this one grew from

    @property
    def shard_ids(self) -> set[str]:
        """Plan ids whose shards belong to this plan: its own and its ancestors'."""
        return {self.plan_id, *self.ancestors}

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
            "base_fingerprint": self.base_fingerprint,
            "ancestors": json.dumps(self.ancestors),
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
            base_fingerprint=meta.get("base_fingerprint", ""),
            ancestors=json.loads(meta.get("ancestors", "[]")),
            **t,
        )


def _legacy_base(run: RunConfig, old: Plan) -> str:
    """The base fingerprint of a plan saved before plans stored one: the current settings with the old
    plan's vector selection must reproduce its fingerprint (ids as a ``{start, stop}`` range or a list);
    "" where none does."""
    ids = old.vector_ids.tolist()
    forms: list[Any] = [ids]
    if ids and ids == list(range(ids[0], ids[0] + len(ids))):
        forms.insert(0, {"start": ids[0], "stop": ids[0] + len(ids)})
    vec = run.effects.vectors
    for form in forms:
        update: dict[str, Any] = {"ids": form} if vec.count is None else {"count": len(ids)}
        then = run.model_copy(
            update={"effects": run.effects.model_copy(update={"vectors": vec.model_copy(update=update)})}
        )
        if fingerprint(then, old.inputs) == old.fingerprint:
            return base_fingerprint(then, old.inputs)
    return ""


def grow_plan(
    old: Plan, run: RunConfig, *, ids: Tensor, vectors: Tensor, digests: dict[str, str]
) -> tuple[Plan | None, str]:
    """``old`` extended to the vectors ``ids [n]``, ``vectors [n, d_model]`` of ``run``, or ``(None, why)``.

    Growth needs the same settings but for the vector selection (:func:`base_fingerprint`), every old
    id among the new ones, and each old vector equal bit for bit to the new one of its id. The grown
    plan keeps the old loss chunks and baseline, gets a new ``plan_id`` and lists ``old``'s among its
    ``ancestors``, so the old plan's shards count as its own.
    """
    base = base_fingerprint(run, digests)
    old_base = old.base_fingerprint or _legacy_base(run, old)
    if old_base != base:
        return None, "its settings differ in more than which vectors are measured"
    new_row = {int(v): r for r, v in enumerate(ids.tolist())}
    lost = [v for v in old.vector_ids.tolist() if v not in new_row]
    if lost:
        return None, f"it measured vectors {lost[:5]} that the new selection leaves out (a plan only grows)"
    rows = torch.tensor([new_row[int(v)] for v in old.vector_ids.tolist()], dtype=torch.long)
    if not torch.equal(vectors[rows], old.vectors):
        return None, "the vectors of its ids differ from the new selection's (e.g. another random draw)"
    grown = Plan(
        ids,
        vectors,
        old.loss_tokens,
        old.baseline_mean,
        old.baseline_density,
        old.baseline_halves,
        old.unsteered_loss,
        old.baseline_positions,
        fingerprint(run, digests),
        inputs=digests,
        base_fingerprint=base,
        ancestors=[*old.ancestors, old.plan_id],
    )
    return grown, ""


def _shard_tag(path: Path) -> tuple[str, list[int]]:
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("plan_id", ""), f.get_tensor("vector_ids").tolist()


def current_shards(run: RunConfig, plan: Plan, seen: dict[Path, tuple[str, list[int]]] | None = None) -> list[Path]:
    """Finished shards of this plan or of a plan it grew from (by plan id: work of a discarded plan is
    never taken), sorted;
    ``seen`` caches shards read before."""
    seen = {} if seen is None else seen
    for p in run.paths.work.shards.glob("*.safetensors"):
        if p not in seen:
            try:
                seen[p] = _shard_tag(p)
            except FileNotFoundError:  # removed by a restart meanwhile
                continue
    mine = plan.shard_ids
    return sorted(p for p, (pid, _) in seen.items() if pid in mine)


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
