"""Measure the effect of steering vectors on SAE features.

Effect of a vector = mean SAE activation over all positions of rollouts generated with the steered
model (re-encoded with the unsteered model) minus the same mean over unsteered baseline rollouts.

Fast path (:func:`measure_effects`): several vectors share one batch (one vector per row group),
prompts of one length are batched together, generation uses the KV cache, and the unsteered
activations are captured at the hook during generation instead of re-running the rollouts:
steering enters after the hook, so the activations there are those of the unsteered model.
:func:`reference_effects` is the one-vector, one-prompt-per-call loop of the reference code,
kept for the equivalence test and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import SamplingConfig
from .steering import generate, row_seed, steering_delta

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

STEERED, BASELINE = 0, 1  # seed streams
KEEP_SAMPLES = 4  # steered rollouts kept per vector for the explorer


@dataclass(frozen=True)
class RolloutSpec:
    """How rollouts are drawn: tokenised prompts (each starting with the start token), samples per
    prompt, total length in tokens (prompt included), sampling, and whether position 0 counts."""

    prompts: tuple[tuple[int, ...], ...]
    samples_per_prompt: int
    total_tokens: int
    sampling: SamplingConfig
    include_first_position: bool = True

    def new_tokens(self, p: int) -> int:
        return self.total_tokens - len(self.prompts[p])


def prompt_token_ids(model: "HookedTransformer", prompts: Sequence[str], bos: int, total_tokens: int) -> tuple[tuple[int, ...], ...]:
    """Each prompt as ``(bos, *tokens)``; fails early if a prompt leaves no room to generate."""
    assert model.tokenizer is not None
    out = []
    for p in prompts:
        ids = (bos, *model.tokenizer.encode(p, add_special_tokens=False)) if p else (bos,)
        if len(ids) >= total_tokens:
            raise ValueError(f"prompt {p!r} is {len(ids)} tokens; effects.total_tokens={total_tokens} leaves no room")
        out.append(ids)
    return tuple(out)


@dataclass
class FeatureSums:
    """Running sums of SAE activations: ``sum [d_sae]``, ``active [d_sae]`` (count of positions where
    the feature fires) and ``n`` positions."""

    sum: Tensor
    active: Tensor
    n: int = 0

    @classmethod
    def zeros(cls, d_sae: int) -> "FeatureSums":
        return cls(torch.zeros(d_sae, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.float64), 0)

    def add(self, codes: Tensor) -> None:
        """Add ``codes [rows, pos, d_sae]``."""
        flat = codes.reshape(-1, codes.shape[-1])
        self.sum += flat.sum(0).double().cpu()
        self.active += (flat > 0).sum(0).double().cpu()
        self.n += flat.shape[0]

    @property
    def mean(self) -> Tensor:
        return (self.sum / max(self.n, 1)).float()

    @property
    def density(self) -> Tensor:
        return (self.active / max(self.n, 1)).float()


@torch.no_grad()
def encode_positions(sae: "SAE", acts: Tensor, include_first_position: bool) -> Tensor:
    """SAE codes of ``acts [rows, pos, d_model]`` -> ``[rows, pos', d_sae]`` (pos' drops position 0 if asked)."""
    if not include_first_position:
        acts = acts[:, 1:]
    return sae.encode(acts.to(sae.W_dec.dtype))


def prompt_groups(spec: RolloutSpec, max_prompts: int | None = None) -> list[list[int]]:
    """Prompt indices grouped by token length (same length = one batch), at most ``max_prompts`` each."""
    by_len: dict[int, list[int]] = {}
    for p, ids in enumerate(spec.prompts):
        by_len.setdefault(len(ids), []).append(p)
    k = max_prompts or len(spec.prompts)
    return [g[i:i + k] for g in by_len.values() for i in range(0, len(g), k)]


@torch.no_grad()
def measure_baseline(model: "HookedTransformer", sae: "SAE", hook_name: str, spec: RolloutSpec,
                     multiplier: int, seed: int, max_rows: int = 256) -> FeatureSums:
    """Feature sums over ``multiplier * samples_per_prompt`` unsteered rollouts per prompt."""
    sums = FeatureSums.zeros(sae.cfg.d_sae)
    n = spec.samples_per_prompt * multiplier
    rows = [(p, s) for g in prompt_groups(spec) for p in g for s in range(n)]
    start = 0
    while start < len(rows):
        length = len(spec.prompts[rows[start][0]])
        chunk = [r for r in rows[start:start + max_rows] if len(spec.prompts[r[0]]) == length]
        start += len(chunk)
        seeds = [row_seed(seed, BASELINE, p, s) for p, s in chunk]
        prompt = torch.tensor([spec.prompts[p] for p, _ in chunk])
        gen = generate(model, prompt, spec.new_tokens(chunk[0][0]), seeds, spec.sampling, hook_name, None, capture=True)
        sums.add(encode_positions(sae, gen.activations, spec.include_first_position))
    return sums


@dataclass
class EffectsBlock:
    """Effects of a block of vectors: ``effects [v, d_sae]`` and a few steered rollouts per vector
    ``sample_tokens [v, k, total_tokens]`` (the first ``k`` samples of the last prompt of the last
    batch of equally long prompts)."""

    effects: Tensor
    sample_tokens: Tensor


@torch.no_grad()
def measure_effects(model: "HookedTransformer", sae: "SAE", hook_name: str, spec: RolloutSpec,
                    vectors: Tensor, vector_ids: Sequence[int], scales: Tensor, baseline_mean: Tensor,
                    seed: int, keep_samples: int = KEEP_SAMPLES, max_rows: int = 2048) -> EffectsBlock:
    """Effects of ``vectors [v, d_model]`` (unit) steered at ``scales [v]``: one batch per group of
    equally long prompts, rows ordered (prompt, vector, sample).

    Row ``(vector i, prompt p, sample s)`` is seeded by ``(seed, vector_ids[i], p, s)``, so the
    result does not depend on how vectors or prompts are grouped into batches.
    """
    v, s_n = vectors.shape[0], spec.samples_per_prompt
    sums = [FeatureSums.zeros(sae.cfg.d_sae) for _ in range(v)]
    delta = steering_delta(vectors, scales).to(model.cfg.device).repeat_interleave(s_n, dim=0)
    samples = None
    for group in prompt_groups(spec, max(1, max_rows // (v * s_n))):
        seeds = [row_seed(seed, STEERED, int(vid), p, s) for p in group for vid in vector_ids for s in range(s_n)]
        prompt = torch.tensor([spec.prompts[p] for p in group for _ in range(v * s_n)])
        gen = generate(model, prompt, spec.new_tokens(group[0]), seeds, spec.sampling, hook_name,
                       delta.repeat(len(group), 1), capture=True)
        codes = encode_positions(sae, gen.activations, spec.include_first_position)
        codes = codes.view(len(group), v, s_n, *codes.shape[1:])
        for i in range(v):
            sums[i].add(codes[:, i])
        samples = gen.tokens.view(len(group), v, s_n, -1)[-1, :, :keep_samples].cpu()
    effects = torch.stack([s.mean for s in sums]) - baseline_mean[None].float()
    assert samples is not None
    return EffectsBlock(effects=effects, sample_tokens=samples)


@torch.no_grad()
def reference_effects(model: "HookedTransformer", sae: "SAE", hook_name: str, spec: RolloutSpec,
                      vector: Tensor, vector_id: int, scale: float, baseline_mean: Tensor, seed: int) -> Tensor:
    """Effect ``[d_sae]`` of one vector the way the reference code does it: one prompt per
    generate call, then the rollouts re-run through the unsteered model and SAE-encoded."""
    from .calibration import resid_at_hook

    sums = FeatureSums.zeros(sae.cfg.d_sae)
    delta = steering_delta(vector, scale).to(model.cfg.device)
    for p, ids in enumerate(spec.prompts):
        seeds = [row_seed(seed, STEERED, int(vector_id), p, s) for s in range(spec.samples_per_prompt)]
        prompt = torch.tensor([ids] * len(seeds))
        gen = generate(model, prompt, spec.new_tokens(p), seeds, spec.sampling, hook_name, delta, use_cache=False)
        acts = resid_at_hook(model, hook_name, gen.tokens)
        sums.add(encode_positions(sae, acts, spec.include_first_position))
    return sums.mean - baseline_mean.float()
