"""Per-row randomness of steered decoding: a row's seed, its uniforms, and the token they sample.

Shared by TransformerLens's decode loop (:mod:`saets_utils.steering.generation`) and the static
engine (:mod:`saets_utils.steering.engine`), so both draw the same tokens from the same uniforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from saets_utils.config import SamplingConfig


@lru_cache(maxsize=1 << 16)
def row_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one batch row from the run seed and integer keys (e.g. vector id,
    prompt index, sample index); independent of batch composition. Cached: under common random
    numbers every vector's rows reuse the same few seeds."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, *[(k + 2**31) & 0xFFFFFFFF for k in keys]]).generate_state(2)
    return int(state[0]) << 31 ^ int(state[1])


def row_uniforms(seeds: Sequence[int], n: int, device: torch.device | str | None = "cpu") -> Tensor:
    """``[len(seeds), n]`` uniforms in [0, 1), each row from its own generator (rows cached by
    seed: under common random numbers a block of vectors draws the same rows again)."""
    if not len(seeds):
        return torch.zeros(0, n, dtype=torch.float64, device=device)
    return torch.stack([_uniform_row(int(s), n) for s in seeds]).to(device)


@lru_cache(maxsize=1 << 14)
def _uniform_row(seed: int, n: int) -> Tensor:
    """``[n]`` float64 uniforms from a generator seeded with ``seed`` (read-only: shared by the cache)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sample_from_logits(logits: Tensor, u: Tensor, sampling: SamplingConfig | None) -> Tensor:
    """Next token ids ``[batch]`` from ``logits [batch, vocab]`` by inverse-CDF sampling with the
    per-row uniforms ``u [batch]``: temperature, top-k, then a nucleus filter only when
    ``sampling.top_p`` is set (the reference's TransformerLens call never applied one); greedy
    when ``sampling`` is None."""
    if sampling is None:
        return logits.argmax(-1)
    k = min(sampling.top_k, logits.shape[-1])
    # top-k in the logits' own dtype (bf16 on a GPU), then only the k kept values in float: the same
    # values as scaling the whole vocabulary first (dividing by a temperature keeps the order), with
    # no full-vocabulary float copy per step
    top_logits, top_ids = logits.topk(k, dim=-1)  # sorted, descending
    probs = (top_logits.float() / sampling.temperature).double().softmax(-1)
    if sampling.top_p is None:
        keep = torch.ones_like(probs, dtype=torch.bool)
    else:
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        cum = probs.cumsum(-1)
        keep = (cum - probs) < sampling.top_p
        probs = probs * keep
    cum = probs.cumsum(-1)
    target = u.double()[:, None] * cum[:, -1:]
    # a uniform within rounding of 1 must still land inside the kept prefix
    idx = torch.minimum((cum <= target).sum(-1), keep.sum(-1) - 1)
    return top_ids.gather(-1, idx[:, None])[:, 0]
