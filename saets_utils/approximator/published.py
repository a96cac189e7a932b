"""Published artifacts in the reference's format: effects to train 02 on, and a trained adapter for 03.

The reference keeps its measurements on the Hugging Face Hub (dataset repo ``schalnev/sae-ts-effects``,
docs/reference.md) and reads them with a plain ``torch.load``, which runs any code a pickle carries.
Here every ``.pt`` file is read with ``torch.load(weights_only=True)``: tensors, dicts and numbers
only; a file that needs more is refused, naming it. ``.safetensors`` files are read as such.

- effects file: a dict ``{features [n, d_model], effects [n, d_sae]}``; the features are the steering
  vectors, unit-normalised here as the reference's training script does (:func:`published_effects`);
- adapter file: the state dict ``{W [d_model, d_sae], b [d_sae]}``, prediction ``x @ W + b``
  (:func:`load_published_adapter`, with the optional rotation ``R_dec [d_model, d_model]`` and
  correction bias ``[d_model]``, compared with the ones computed from ``W``, ``b``).

Shapes are checked against the run's SAE (``W_dec [d_sae, d_model]``), so the 9B adapter with the
2B SAE fails before anything is built. Params name the files in ``approximator.published``
(:class:`saets_utils.config.PublishedArtifacts`): a Hub file or a local path. docs/published.md.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from saets_utils.approximator.model import EffectApproximator, rotation_matrix
from saets_utils.config import REPO_ROOT, Artifact, RunConfig
from saets_utils.effects.store import Effects, load_effects

NO_HALVES_NOTE = (
    "Trained on published effects ({source}): {n} vectors measured elsewhere, without split halves, so "
    "there is no noise ceiling and no design study for this run; the held-out metrics are computed as for "
    "01's effects."
)


class PublishedFileError(ValueError):
    """A published file is unsafe to read, malformed, or does not fit the run's model and SAE."""


def artifact_path(a: Artifact) -> Path:
    """The local file of ``a``: its ``path`` (relative to the repo root or absolute), or the Hub file
    through ``huggingface_hub.hf_hub_download`` (its cache; offline mode reads the cache only)."""
    if a.path:
        p = Path(a.path)
        p = p if p.is_absolute() else REPO_ROOT / p
        if not p.is_file():
            raise FileNotFoundError(f"published file {a.path!r} not found (looked at {p})")
        return p
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo_id=a.repo_id or "", filename=a.filename or "", repo_type=a.repo_type, revision=a.revision
            )
        )
    except Exception as e:  # offline without a cached copy, unknown repo or file, no network
        raise FileNotFoundError(
            f"cannot get {a.describe()}: {type(e).__name__}: {e}. Download it once with network access "
            "(huggingface-cli download ... --repo-type dataset), or give approximator.published.<file>.path"
        ) from e


def safe_load(path: str | Path) -> Any:
    """Tensors of a ``.pt`` file read with ``torch.load(weights_only=True)`` (no code runs), or of a
    ``.safetensors`` file; a pickle that needs full unpickling is refused, naming the file."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise PublishedFileError(
            f"refused {p}: it needs full unpickling (it holds more than tensors, dicts and numbers), which could "
            f"run code from the file. Re-save it as a plain dict of tensors (or safetensors). Detail: "
            f"{str(e).splitlines()[0]}"
        ) from None


def _dict_of_tensors(obj: Any, path: Path, keys: tuple[str, ...], what: str) -> dict[str, Tensor]:
    if not isinstance(obj, dict):
        raise PublishedFileError(
            f"{path} is not a {what} file: expected a dict with {list(keys)}, got {type(obj).__name__}"
        )
    missing = [k for k in keys if k not in obj]
    if missing:
        raise PublishedFileError(f"{path} is not a {what} file: missing key(s) {missing} (found {sorted(obj)})")
    bad = [k for k in keys if not isinstance(obj[k], Tensor)]
    if bad:
        raise PublishedFileError(f"{path}: {bad} must be tensors")
    return {k: obj[k].detach().float().cpu() for k in keys}


def _one_tensor(obj: Any, path: Path) -> Tensor:
    if isinstance(obj, Tensor):
        return obj.detach().float().cpu()
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), Tensor):
        return next(iter(obj.values())).detach().float().cpu()
    raise PublishedFileError(f"{path}: expected one tensor (or a dict holding one), got {type(obj).__name__}")


def _other_model(d_model: int, d_sae: int) -> str:
    return f"this run's model and SAE have d_model {d_model}, d_sae {d_sae}; is it the file of another model or SAE (e.g. the 9B file with the 2B SAE)?"


def read_effects_file(path: str | Path, d_model: int, d_sae: int) -> tuple[Tensor, Tensor]:
    """``(features [n, d_model] as stored, effects [n, d_sae])`` of a reference-format effects file."""
    p = Path(path)
    t = _dict_of_tensors(safe_load(p), p, ("features", "effects"), "effects")
    X, Y = t["features"], t["effects"]
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise PublishedFileError(
            f"{p}: features must be [n, d_model] and effects [n, d_sae] with the same n; got {tuple(X.shape)} and {tuple(Y.shape)}"
        )
    if X.shape[1] != d_model or Y.shape[1] != d_sae:
        raise PublishedFileError(
            f"{p}: features have d_model {X.shape[1]} and effects d_sae {Y.shape[1]}, but {_other_model(d_model, d_sae)}"
        )
    return X, Y


def effects_from_arrays(features: Tensor, effects: Tensor, source: str) -> Effects:
    """An :class:`Effects` (what 02 trains on) from reference-format arrays: features unit-normalised
    (the reference's training script does so), ``scales`` = the stored norms, ids ``0..n-1``, no
    baseline (NaN density and mean), no halves. Zero or non-finite features are marked invalid
    (NaN scale) and dropped by 02, as 01's failed rows are."""
    norms = features.norm(dim=-1)
    ok = torch.isfinite(norms) & (norms > 1e-8)
    vectors = torch.where(ok[:, None], features / norms.clamp_min(1e-12)[:, None], torch.zeros_like(features))
    scales = torch.where(ok, norms, torch.full_like(norms, float("nan")))
    n, d_sae = effects.shape
    ids = torch.arange(n, dtype=torch.int64)
    nan = torch.full((d_sae,), float("nan"))
    return Effects(
        effects=effects,
        vectors=vectors,
        scales=scales,
        vector_ids=ids,
        table=pd.DataFrame(
            {"id": ids.tolist(), "scale": scales.tolist(), "status": ["published"] * n, "seconds": [float("nan")] * n}
        ),
        baseline_mean=nan,
        baseline_density=nan.clone(),
        meta={
            "source": source,
            "effects": {"vectors": {"source": "published"}},
            "n_vectors": n,
            "d_sae": d_sae,
            "d_model": int(features.shape[1]),
            "note": NO_HALVES_NOTE.format(source=source, n=n),
        },
        halves=None,
    )


def published_effects(a: Artifact, d_model: int, d_sae: int) -> Effects:
    """The published effects file ``a`` as an :class:`Effects` for 02 (see :func:`effects_from_arrays`)."""
    X, Y = read_effects_file(artifact_path(a), d_model, d_sae)
    return effects_from_arrays(X, Y, a.describe())


def effects_source_is_published(run: RunConfig) -> bool:
    """Whether 02 trains on ``approximator.published.effects`` (``auto``: when 01 has not run)."""
    src = run.approximator.effects_source
    return src == "published" or (src == "auto" and not run.paths.effects.is_file())


def training_effects(run: RunConfig, W_dec: Tensor) -> Effects:
    """What 02 trains on, as ``approximator.effects_source`` says: 01's ``effects.safetensors``, or
    the published effects file (checked against the SAE's ``W_dec [d_sae, d_model]``); the published
    ones carry ``meta["note"]`` saying so (no halves, so no noise ceiling)."""
    if not effects_source_is_published(run):
        return load_effects(run.results_dir)
    a = run.approximator.published.effects
    assert a is not None  # config validation
    return published_effects(a, int(W_dec.shape[1]), int(W_dec.shape[0]))


def read_adapter_file(path: str | Path, d_model: int, d_sae: int) -> EffectApproximator:
    """``EffectApproximator(W, b)`` from a reference adapter state dict ``{W [d_model, d_sae], b [d_sae]}``."""
    p = Path(path)
    t = _dict_of_tensors(safe_load(p), p, ("W", "b"), "adapter")
    W, b = t["W"], t["b"]
    if W.ndim != 2 or b.ndim != 1 or W.shape[1] != b.shape[0]:
        raise PublishedFileError(
            f"{p}: need W [d_model, d_sae] and b [d_sae]; got W {tuple(W.shape)}, b {tuple(b.shape)}"
        )
    if tuple(W.shape) != (d_model, d_sae):
        raise PublishedFileError(
            f"{p}: W is [{W.shape[0]}, {W.shape[1]}] (d_model {W.shape[0]}, d_sae {W.shape[1]}), but {_other_model(d_model, d_sae)}"
        )
    return EffectApproximator(W, b)


@dataclass
class PublishedAdapter:
    """A published adapter loaded for 03: the approximator, the rotation 03 uses (the published one
    in the orientation that matches ours, else ours), and how the published rotation and correction
    compare with the ones computed from ``W``, ``b`` and the SAE's decoder (``comparison``)."""

    approx: EffectApproximator
    rotation: Tensor
    source: str
    comparison: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.comparison)


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _cos(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def compare_rotation(published: Tensor, ours: Tensor) -> tuple[Tensor, list[dict[str, Any]]]:
    """The published rotation in our orientation (``R @ d``; the reference's later code applies
    ``R.T @ d``), chosen by the smaller relative difference, and one row per orientation."""
    diffs = {name: (_rel(m, ours), _cos(m, ours)) for name, m in (("R", published), ("R^T", published.T))}
    rows: list[dict[str, Any]] = [
        {"what": f"rotation {name} vs ours", "rel_diff": d, "cosine": c} for name, (d, c) in diffs.items()
    ]
    use = published if diffs["R"][0] <= diffs["R^T"][0] else published.T
    return use, rows


def load_published_adapter(run: RunConfig, W_dec: Tensor) -> PublishedAdapter:
    """``approximator.published.adapter`` (and ``rotation`` / ``correction_bias`` when given) for the
    run's SAE ``W_dec [d_sae, d_model]``; shapes checked, differences from our own computation reported."""
    pub = run.approximator.published
    assert pub.adapter is not None  # config validation
    d_sae, d_model = int(W_dec.shape[0]), int(W_dec.shape[1])
    approx = read_adapter_file(artifact_path(pub.adapter), d_model, d_sae)
    ours = rotation_matrix(approx, W_dec.detach().float().cpu())
    rotation, rows = ours, list[dict[str, Any]]()
    if pub.rotation is not None:
        p = artifact_path(pub.rotation)
        R = _one_tensor(safe_load(p), p)
        if tuple(R.shape) != (d_model, d_model):
            raise PublishedFileError(
                f"{p}: rotation is {tuple(R.shape)}, need [{d_model}, {d_model}] (d_model {d_model})"
            )
        rotation, rows = compare_rotation(R, ours)
    if pub.correction_bias is not None:
        p = artifact_path(pub.correction_bias)
        c = _one_tensor(safe_load(p), p).flatten()
        if c.shape[0] != d_model:
            raise PublishedFileError(f"{p}: correction bias has {c.shape[0]} entries, need d_model {d_model}")
        ours_c = approx.correction
        rows.append(
            {
                "what": "correction bias vs norm(W @ b)",
                "rel_diff": _rel(c / c.norm().clamp_min(1e-30), ours_c),
                "cosine": _cos(c, ours_c),
                "published_norm": float(c.norm()),
            }
        )
    return PublishedAdapter(approx, rotation, pub.adapter.describe(), rows)


def adapter_source_is_published(run: RunConfig) -> bool:
    """Whether 03 uses ``approximator.published.adapter`` (``auto``: when 02 has not run)."""
    src = run.approximator.adapter_source
    return src == "published" or (src == "auto" and not run.paths.approximator.is_file())


def approximator_is_published(run: RunConfig) -> bool:
    """Whether 03's approximator comes from published artifacts, so that 03 can run without 01: the
    published adapter (:func:`adapter_source_is_published`), or 02's fit of the published effects
    (:func:`effects_source_is_published`)."""
    return adapter_source_is_published(run) or effects_source_is_published(run)
