"""Steering vectors to measure in notebook 01, as named by ``effects.vectors`` in params.

Every source yields ``(vector_ids [n] int64, vectors [n, d_model] unit-norm)``, in id order,
checked before any expensive work: ids in range, no zero or non-finite vector, right width.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saets_utils.config import ConfigError, RunConfig, VectorSource

if TYPE_CHECKING:
    from sae_lens import SAE


def select_ids(ids: str | list[int] | dict[str, int], n: int, what: str) -> list[int]:
    """Resolve ``all`` / ``{start, stop}`` / a list against ``n`` available rows, checking the range."""
    if ids == "all":
        return list(range(n))
    if isinstance(ids, dict):
        out = list(range(int(ids["start"]), int(ids["stop"])))
    else:
        out = [int(i) for i in ids]
    if not out:
        raise ConfigError(f"effects.vectors.ids selects no {what}")
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ConfigError(f"effects.vectors.ids: {what} {bad[:5]} out of range 0..{n - 1}")
    if len(set(out)) != len(out):
        raise ConfigError("effects.vectors.ids contains duplicates")
    return sorted(out)


def unit_rows(vectors: Tensor, ids: list[int], where: str) -> Tensor:
    """Unit-normalise rows, failing on zero or non-finite rows (naming their ids)."""
    vectors = vectors.detach().float().cpu()
    norms = vectors.norm(dim=-1)
    bad = [ids[i] for i in torch.nonzero(~torch.isfinite(norms) | (norms < 1e-8))[:, 0].tolist()]
    if bad:
        raise ConfigError(f"{where}: vectors {bad[:5]} are zero or non-finite")
    return vectors / norms[:, None]


def build_vectors(run: RunConfig, sae: SAE, d_model: int, load_other_sae=None) -> tuple[Tensor, Tensor]:
    """``(vector_ids [n], vectors [n, d_model])`` for ``run.effects.vectors``.

    ``load_other_sae(sae_cfg)`` loads the SAE of the ``other_sae`` source (injected so this module
    does not import the loaders).
    """
    src: VectorSource = run.effects.vectors
    g = torch.Generator().manual_seed(run.seed)
    if src.source in ("decoder_rows", "other_sae"):
        if src.source == "other_sae":
            if load_other_sae is None or src.sae is None:
                raise ConfigError("effects.vectors.source 'other_sae' needs effects.vectors.sae")
            sae = load_other_sae(src.sae)
        w_dec = sae.W_dec.detach()
        ids = select_ids(src.ids, w_dec.shape[0], "decoder rows")
        vecs = w_dec[ids]
    elif src.source == "random":
        ids = list(range(int(src.count or 0)))
        vecs = torch.randn(len(ids), d_model, generator=g)
    elif src.source == "pairs":
        w_dec = sae.W_dec.detach().float().cpu()
        ids = list(range(int(src.count or 0)))
        pairs = torch.stack([torch.randperm(w_dec.shape[0], generator=g)[:2] for _ in ids])
        vecs = w_dec[pairs[:, 0]] + w_dec[pairs[:, 1]]
    elif src.source == "combined":
        # The reference's "sample and combine": two rows drawn independently (a row may be drawn
        # twice) with independent U(0, 1) weights, then unit-normalised below.
        w_dec = sae.W_dec.detach().float().cpu()
        ids = list(range(int(src.count or 0)))
        drawn = torch.randint(0, w_dec.shape[0], (len(ids), 2), generator=g)
        weights = torch.rand(len(ids), 2, generator=g)
        vecs = weights[:, :1] * w_dec[drawn[:, 0]] + weights[:, 1:] * w_dec[drawn[:, 1]]
    elif src.source == "file":
        from safetensors.torch import load_file

        path = Path(src.path or "")
        if not path.is_file():
            raise ConfigError(f"effects.vectors.path {src.path!r} does not exist")
        data = load_file(path)
        if "vectors" not in data:
            raise ConfigError(f"{path} has no 'vectors' tensor (found {sorted(data)})")
        all_ids = data.get("vector_ids", torch.arange(data["vectors"].shape[0])).long().tolist()
        rows = select_ids(src.ids, len(all_ids), "rows of the vectors file")
        ids = [all_ids[r] for r in rows]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ConfigError(f"{path}: vector_ids {dup[:5]} appear more than once; each vector needs its own id")
        vecs = data["vectors"][rows]
    else:  # pragma: no cover - pydantic restricts the literal
        raise ConfigError(f"unknown effects.vectors.source {src.source!r}")
    if vecs.ndim != 2 or vecs.shape[1] != d_model:
        raise ConfigError(f"effects.vectors: vectors have shape {tuple(vecs.shape)}, need [n, {d_model}]")
    return torch.tensor(ids, dtype=torch.int64), unit_rows(vecs, ids, "effects.vectors")
