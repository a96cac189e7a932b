"""Steering vectors to measure in notebook 01, as named by ``effects.vectors`` in params.

Every source yields ``(vector_ids [n] int64, vectors [n, d_model] unit-norm)``, in id order,
checked before any expensive work: ids in range, no zero or non-finite vector, right width.

The sources, defined once: each value of ``effects.vectors.source`` has one builder here, registered
with ``@vector_source("<name>")`` in :data:`VECTOR_SOURCES`; a name missing there fails with the
known sources listed. Adding a source (docs/extending.md): its name in ``VectorSource.source``
(``saets_utils/config.py``, with any field it requires checked there) and its builder here
(``tests/test_registry.py`` checks that the two lists agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


@dataclass(frozen=True)
class SourceInputs:
    """What a vector source builds from: ``effects.vectors`` (``spec``), the run's SAE, the model
    width, a generator seeded with the run's seed (the one draw of randomness a source may use), and
    ``load_other_sae(sae_cfg)``, the loader of another SAE (None where the caller has none)."""

    spec: VectorSource
    sae: SAE
    d_model: int
    generator: torch.Generator
    load_other_sae: Callable[[Any], SAE] | None = None


# inputs -> (vector ids, vectors [n, d_model], not yet normalised); build_vectors checks and normalises
VectorBuilder = Callable[[SourceInputs], tuple[list[int], Tensor]]
VECTOR_SOURCES: dict[str, VectorBuilder] = {}


def vector_source(name: str) -> Callable[[VectorBuilder], VectorBuilder]:
    """Register the builder of ``effects.vectors.source: <name>`` (one per source)."""

    def register(fn: VectorBuilder) -> VectorBuilder:
        if name in VECTOR_SOURCES:
            raise ValueError(f"vector source {name!r} already has a builder ({VECTOR_SOURCES[name].__name__})")
        VECTOR_SOURCES[name] = fn
        return fn

    return register


def get_vector_source(name: str) -> VectorBuilder:
    """The builder of source ``name``; ConfigError naming the known sources for any other name."""
    try:
        return VECTOR_SOURCES[name]
    except KeyError:
        raise ConfigError(f"unknown effects.vectors.source {name!r}; use one of {sorted(VECTOR_SOURCES)}") from None


def build_vectors(run: RunConfig, sae: SAE, d_model: int, load_other_sae=None) -> tuple[Tensor, Tensor]:
    """``(vector_ids [n], vectors [n, d_model])`` for ``run.effects.vectors``.

    ``load_other_sae(sae_cfg)`` loads the SAE of the ``other_sae`` source (injected so this module
    does not import the loaders).
    """
    src: VectorSource = run.effects.vectors
    builder = get_vector_source(src.source)
    g = torch.Generator().manual_seed(run.seed)
    ids, vecs = builder(SourceInputs(src, sae, d_model, g, load_other_sae))
    if vecs.ndim != 2 or vecs.shape[1] != d_model:
        raise ConfigError(f"effects.vectors: vectors have shape {tuple(vecs.shape)}, need [n, {d_model}]")
    return torch.tensor(ids, dtype=torch.int64), unit_rows(vecs, ids, "effects.vectors")


def _rows_of(sae: SAE, src: VectorSource) -> tuple[list[int], Tensor]:
    w_dec = sae.W_dec.detach()
    ids = select_ids(src.ids, w_dec.shape[0], "decoder rows")
    return ids, w_dec[ids]


@vector_source("decoder_rows")
def _decoder_rows(x: SourceInputs) -> tuple[list[int], Tensor]:
    return _rows_of(x.sae, x.spec)


@vector_source("other_sae")
def _other_sae(x: SourceInputs) -> tuple[list[int], Tensor]:
    if x.load_other_sae is None or x.spec.sae is None:
        raise ConfigError("effects.vectors.source 'other_sae' needs effects.vectors.sae")
    return _rows_of(x.load_other_sae(x.spec.sae), x.spec)


@vector_source("random")
def _random(x: SourceInputs) -> tuple[list[int], Tensor]:
    ids = list(range(int(x.spec.count or 0)))
    return ids, torch.randn(len(ids), x.d_model, generator=x.generator)


@vector_source("pairs")
def _pairs(x: SourceInputs) -> tuple[list[int], Tensor]:
    w_dec = x.sae.W_dec.detach().float().cpu()
    ids = list(range(int(x.spec.count or 0)))
    pairs = torch.stack([torch.randperm(w_dec.shape[0], generator=x.generator)[:2] for _ in ids])
    return ids, w_dec[pairs[:, 0]] + w_dec[pairs[:, 1]]


@vector_source("combined")
def _combined(x: SourceInputs) -> tuple[list[int], Tensor]:
    # The reference's "sample and combine": two rows drawn independently (a row may be drawn
    # twice) with independent U(0, 1) weights, then unit-normalised by build_vectors.
    w_dec = x.sae.W_dec.detach().float().cpu()
    ids = list(range(int(x.spec.count or 0)))
    drawn = torch.randint(0, w_dec.shape[0], (len(ids), 2), generator=x.generator)
    weights = torch.rand(len(ids), 2, generator=x.generator)
    return ids, weights[:, :1] * w_dec[drawn[:, 0]] + weights[:, 1:] * w_dec[drawn[:, 1]]


@vector_source("file")
def _file(x: SourceInputs) -> tuple[list[int], Tensor]:
    from safetensors.torch import load_file

    path = Path(x.spec.path or "")
    if not path.is_file():
        raise ConfigError(f"effects.vectors.path {x.spec.path!r} does not exist")
    data = load_file(path)
    if "vectors" not in data:
        raise ConfigError(f"{path} has no 'vectors' tensor (found {sorted(data)})")
    all_ids = data.get("vector_ids", torch.arange(data["vectors"].shape[0])).long().tolist()
    rows = select_ids(x.spec.ids, len(all_ids), "rows of the vectors file")
    ids = [all_ids[r] for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{path}: vector_ids {dup[:5]} appear more than once; each vector needs its own id")
    return ids, data["vectors"][rows]
