"""Measure the effect of steering vectors on SAE features.

Effect of a vector = mean SAE activation over all positions of rollouts generated with the steered
model (re-encoded with the unsteered model) minus the same mean over unsteered baseline rollouts.

Two sampling designs (``RolloutSpec.common_random_numbers``): the reference's independent rollouts
per vector against a larger independent baseline, or common random numbers, where rollout
``(prompt, sample)`` uses the same uniforms for every vector and for its paired unsteered rollout.
Either way each effect is also reported for the two halves of the rollouts (even and odd sample
index, each against the matching half of the baseline): two independent measurements of the same
vector, whose agreement is the effect's split-half reliability.

Fast path (:func:`measure_effects`): several vectors share one batch (one vector per row group),
prompts of all lengths share it too (:func:`~saets_utils.steering.generation.generate_aligned`:
every row steps through the same positions, so no padding), generation uses the KV cache, and the unsteered
activations are captured at the hook during generation instead of re-running the rollouts:
steering enters after the hook, so the activations there are those of the unsteered model.
:func:`saets_utils.effects.reference.reference_effects` is the one-vector, one-prompt-per-call loop
of the reference code, kept for the equivalence test and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saets_utils.config import SamplingConfig
from saets_utils.steering.generation import generate_aligned, row_seed
from saets_utils.steering.hooks import steering_delta

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

STEERED, BASELINE, PAIRED = 0, 1, 2  # seed streams
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
    common_random_numbers: bool = False
    max_resid_norm: float | None = None
    engine: str = "tl"  # the decoder (generate_aligned's engine): "tl" or "static"

    def new_tokens(self, p: int) -> int:
        return self.total_tokens - len(self.prompts[p])

    def steered_seed(self, seed: int, vector_id: int, p: int, s: int) -> int:
        """Seed of steered rollout ``(vector, prompt p, sample s)``; with common random numbers it
        does not depend on the vector and equals the paired unsteered rollout's seed."""
        if self.common_random_numbers:
            return row_seed(seed, PAIRED, p, s)
        return row_seed(seed, STEERED, int(vector_id), p, s)


def prompt_token_ids(
    model: HookedTransformer, prompts: Sequence[str], bos: int, total_tokens: int
) -> tuple[tuple[int, ...], ...]:
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
    def zeros(cls, d_sae: int) -> FeatureSums:
        return cls(torch.zeros(d_sae, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.float64), 0)

    def add(self, codes: Tensor, keep: Tensor | None = None) -> None:
        """Add ``codes [rows, pos, d_sae]``, only the positions where ``keep [rows, pos]`` is True.
        The sums move to the codes' device (no host copy per call on a GPU)."""
        flat = codes.reshape(-1, codes.shape[-1])
        if keep is not None:
            flat = flat[keep.reshape(-1).to(flat.device)]
        if self.sum.device != flat.device:
            self.sum, self.active = self.sum.to(flat.device), self.active.to(flat.device)
        self.sum += flat.sum(0).double()
        self.active += (flat > 0).sum(0).double()
        self.n += flat.shape[0]

    def __add__(self, other: FeatureSums) -> FeatureSums:
        return FeatureSums(self.sum.cpu() + other.sum.cpu(), self.active.cpu() + other.active.cpu(), self.n + other.n)

    @property
    def mean(self) -> Tensor:
        """``[d_sae]`` float32 on the CPU."""
        return (self.sum.cpu() / max(self.n, 1)).float()

    @property
    def density(self) -> Tensor:
        return (self.active.cpu() / max(self.n, 1)).float()


@dataclass
class HalfSums:
    """Running feature sums of a block of ``v`` vectors' rollouts, kept in two halves by sample
    parity: ``sum [v, 2, d_sae]``, ``active [v, 2, d_sae]`` (positions where the feature fires) and
    ``n [v, 2]`` positions, all float64 on the codes' device."""

    sum: Tensor
    active: Tensor
    n: Tensor

    @classmethod
    def zeros(cls, v: int, d_sae: int, device: torch.device | str) -> HalfSums:
        z = torch.zeros(v, 2, d_sae, dtype=torch.float64, device=device)
        return cls(z, z.clone(), torch.zeros(v, 2, dtype=torch.float64, device=device))

    def add(self, codes: Tensor, keep: Tensor | None) -> None:
        """Add ``codes [groups, v, samples, pos, d_sae]`` at the positions where ``keep [groups, v,
        samples, pos]`` is True (all when None): one masked sum per half over groups, samples and
        positions, with no host sync (a mask multiplies instead of selecting). The sums move to the
        codes' device."""
        if self.sum.device != codes.device:
            self.sum, self.active, self.n = (t.to(codes.device) for t in (self.sum, self.active, self.n))
        for h in (0, 1):
            c = codes[:, :, h::2]
            if c.shape[2] == 0:
                continue
            m = torch.ones(c.shape[:-1], dtype=c.dtype, device=c.device) if keep is None else keep[:, :, h::2]
            m = m.to(c.device, c.dtype)
            self.sum[:, h] += torch.einsum("gvsp,gvspd->vd", m, c).double()
            self.active[:, h] += torch.einsum("gvsp,gvspd->vd", m, (c > 0).to(c.dtype)).double()
            self.n[:, h] += m.sum((0, 2, 3)).double()

    def means(self) -> Tensor:
        """``[v, 2, d_sae]`` float32 on the CPU: each half's mean (0 for a half with no positions)."""
        return (self.sum / self.n.clamp(min=1)[..., None]).float().cpu()

    def mean(self) -> Tensor:
        """``[v, d_sae]`` float32 on the CPU: the mean over both halves."""
        return (self.sum.sum(1) / self.n.sum(1).clamp(min=1)[:, None]).float().cpu()


@torch.no_grad()
def encode_positions(sae: SAE, acts: Tensor, include_first_position: bool) -> Tensor:
    """SAE codes of ``acts [rows, pos, d_model]`` -> ``[rows, pos', d_sae]`` (pos' drops position 0 if asked)."""
    if not include_first_position:
        acts = acts[:, 1:]
    return sae.encode(acts.to(sae.W_dec.dtype))


def kept_positions(acts: Tensor, include_first_position: bool, max_resid_norm: float | None) -> Tensor | None:
    """``[rows, pos']`` mask of the positions that count (aligned with :func:`encode_positions`):
    all but those whose residual norm in ``acts [rows, pos, d_model]`` exceeds ``max_resid_norm``
    (attention sinks); None when every position counts."""
    if max_resid_norm is None:
        return None
    if not include_first_position:
        acts = acts[:, 1:]
    return acts.float().norm(dim=-1) <= max_resid_norm


def prompt_chunks(spec: RolloutSpec, max_prompts: int | None = None) -> list[list[int]]:
    """Prompt indices in order, in chunks of at most ``max_prompts`` (one batch each; lengths may differ)."""
    k = max_prompts or len(spec.prompts)
    return [list(range(i, min(i + k, len(spec.prompts)))) for i in range(0, len(spec.prompts), k)]


@dataclass
class BaselineSums:
    """The unsteered rollouts' feature sums in two halves (even / odd sample index)."""

    halves: tuple[FeatureSums, FeatureSums]

    @property
    def full(self) -> FeatureSums:
        return self.halves[0] + self.halves[1]

    @property
    def mean(self) -> Tensor:
        """``[d_sae]`` mean over all baseline positions."""
        return self.full.mean

    @property
    def density(self) -> Tensor:
        return self.full.density

    @property
    def n(self) -> int:
        return self.full.n

    @property
    def half_means(self) -> Tensor:
        """``[2, d_sae]``: the mean of each half."""
        return torch.stack([h.mean for h in self.halves])


@torch.no_grad()
def measure_baseline(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    spec: RolloutSpec,
    *,
    multiplier: int,
    seed: int,
    max_rows: int = 256,
) -> BaselineSums:
    """Feature sums of the unsteered rollouts, kept in two halves by sample parity.

    Independent design: ``multiplier * samples_per_prompt`` rollouts per prompt from their own seed
    stream. Common random numbers: exactly the ``samples_per_prompt`` rollouts per prompt whose
    uniforms every steered rollout shares (``multiplier`` is not used).
    """
    halves = (FeatureSums.zeros(sae.cfg.d_sae), FeatureSums.zeros(sae.cfg.d_sae))
    n = spec.samples_per_prompt * (1 if spec.common_random_numbers else multiplier)
    rows = [(p, s) for p in range(len(spec.prompts)) for s in range(n)]
    for start in range(0, len(rows), max_rows):
        chunk = rows[start : start + max_rows]
        seeds = [
            row_seed(seed, PAIRED, p, s) if spec.common_random_numbers else row_seed(seed, BASELINE, p, s)
            for p, s in chunk
        ]
        prompts = [spec.prompts[p] for p, _ in chunk]
        gen = generate_aligned(
            model,
            prompts,
            spec.total_tokens,
            seeds,
            sampling=spec.sampling,
            hook_name=hook_name,
            delta=None,
            capture=True,
            engine=spec.engine,
        )
        assert gen.activations is not None  # generate_aligned(..., capture=True)
        codes = encode_positions(sae, gen.activations, spec.include_first_position)
        keep = kept_positions(gen.activations, spec.include_first_position, spec.max_resid_norm)
        parity = torch.tensor([s % 2 for _, s in chunk], device=codes.device)
        for h in (0, 1):
            if (parity == h).any():
                halves[h].add(codes[parity == h], None if keep is None else keep[parity == h])
    return BaselineSums(halves)


@dataclass
class EffectsBlock:
    """Effects of a block of vectors: ``effects [v, d_sae]``, the same from each half of the
    rollouts ``halves [v, 2, d_sae]`` (NaN with one sample per prompt), and a few steered rollouts
    per vector ``sample_tokens [v, k, total_tokens]`` (the first ``k`` samples of the last prompt)."""

    effects: Tensor
    halves: Tensor
    sample_tokens: Tensor


@torch.no_grad()
def measure_effects(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    spec: RolloutSpec,
    *,
    vectors: Tensor,
    vector_ids: Sequence[int],
    scales: Tensor,
    baseline_mean: Tensor,
    seed: int,
    keep_samples: int = KEEP_SAMPLES,
    max_rows: int = 2048,
    baseline_halves: Tensor | None = None,
) -> EffectsBlock:
    """Effects of ``vectors [v, d_model]`` (unit) steered at ``scales [v]`` against ``baseline_mean
    [d_sae]``; each half of the rollouts against ``baseline_halves [2, d_sae]`` (the baseline's own
    halves, :attr:`BaselineSums.half_means`; default: the full mean). One batch per chunk of prompts
    (all of them if ``max_rows`` allows), rows ordered (prompt, vector, sample).

    Row ``(vector i, prompt p, sample s)`` is seeded by :meth:`RolloutSpec.steered_seed`, so the
    result does not depend on how vectors or prompts are grouped into batches.
    """
    v, s_n = vectors.shape[0], spec.samples_per_prompt
    sums = HalfSums.zeros(v, sae.cfg.d_sae, model.cfg.device or "cpu")
    delta = steering_delta(vectors, scales).to(model.cfg.device).repeat_interleave(s_n, dim=0)
    samples = None
    for group in prompt_chunks(spec, max(1, max_rows // (v * s_n))):
        seeds = [spec.steered_seed(seed, vid, p, s) for p in group for vid in vector_ids for s in range(s_n)]
        gen = generate_aligned(
            model,
            [spec.prompts[p] for p in group for _ in range(v * s_n)],
            spec.total_tokens,
            seeds,
            sampling=spec.sampling,
            hook_name=hook_name,
            delta=delta.repeat(len(group), 1),
            capture=True,
            engine=spec.engine,
        )
        assert gen.activations is not None  # generate_aligned(..., capture=True)
        codes = encode_positions(sae, gen.activations, spec.include_first_position)
        codes = codes.view(len(group), v, s_n, *codes.shape[1:])
        keep = kept_positions(gen.activations, spec.include_first_position, spec.max_resid_norm)
        keep = None if keep is None else keep.view(len(group), v, s_n, -1)
        sums.add(codes, keep)
        samples = gen.tokens.view(len(group), v, s_n, -1)[-1, :, :keep_samples]  # the last group's
    base = baseline_mean.float().cpu()
    base_h = base.expand(2, -1) if baseline_halves is None else baseline_halves.float().cpu()
    effects = sums.mean() - base[None]
    if s_n >= 2:
        halves = sums.means() - base_h[None]
    else:
        halves = torch.full((v, 2, sae.cfg.d_sae), float("nan"))
    assert samples is not None
    return EffectsBlock(effects=effects, halves=halves, sample_tokens=samples.cpu())
