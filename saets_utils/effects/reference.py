"""The reference algorithm for one vector's effect, kept in one place for the test that the fast
path equals it (tests/effects/test_effects.py) and for the benchmark that times both
(benchmarks/effects_throughput.py).

The SAE-TS reference code measures one vector at a time: per prompt, one generate call under the
steering hook (the prompt repeated ``samples_per_prompt`` times), then the rollouts re-run through
the unsteered model up to the hook and SAE-encoded; the effect is their mean code minus the
baseline mean. :func:`saets_utils.effects.measure.measure_effects` computes the same in batches,
with the unsteered activations captured during generation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saets_utils.config import SamplingConfig
from saets_utils.effects.calibration import resid_at_hook
from saets_utils.effects.measure import FeatureSums, RolloutSpec, encode_positions, kept_positions
from saets_utils.steering.generation import generate
from saets_utils.steering.hooks import steering_delta, steering_hook

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

# (prompt tokens [rows, prompt_len], new tokens, one seed per row, steering delta [d_model])
#   -> rollouts [rows, prompt_len + new tokens]
Rollouts = Callable[[Tensor, int, list[int], Tensor], Tensor]


def seeded_rollouts(model: HookedTransformer, hook_name: str, sampling: SamplingConfig) -> Rollouts:
    """Rollouts from :func:`generate` without KV cache, seeded per row exactly as the fast path
    seeds them, so the reference loop and the fast path see the same tokens."""

    def draw(prompt: Tensor, new_tokens: int, seeds: list[int], delta: Tensor) -> Tensor:
        return generate(
            model, prompt, new_tokens, seeds, sampling=sampling, hook_name=hook_name, delta=delta, use_cache=False
        ).tokens

    return draw


def transformer_lens_rollouts(model: HookedTransformer, hook_name: str, sampling: SamplingConfig) -> Rollouts:
    """Rollouts the way the reference code draws them: TransformerLens ``model.generate`` (KV cache,
    no stop at EOS) under the steering hook, sampling from torch's global RNG (``seeds`` unused)."""

    def draw(prompt: Tensor, new_tokens: int, seeds: list[int], delta: Tensor) -> Tensor:
        with steering_hook(model, hook_name, delta):
            out = model.generate(
                prompt.to(model.cfg.device),
                max_new_tokens=new_tokens,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                temperature=sampling.temperature,
                stop_at_eos=False,
                use_past_kv_cache=True,
                verbose=False,
            )
        assert isinstance(out, Tensor)  # token input gives token output
        return out

    return draw


@torch.no_grad()
def reference_effects(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    spec: RolloutSpec,
    *,
    vector: Tensor,
    vector_id: int,
    scale: float,
    baseline_mean: Tensor,
    seed: int,
    rollouts: Rollouts | None = None,
) -> Tensor:
    """Effect ``[d_sae]`` of one vector the way the reference code measures it: one generate call per
    prompt, then each prompt's rollouts re-run at once through the unsteered model and SAE-encoded.

    ``rollouts`` draws the steered rollouts; default :func:`seeded_rollouts` (the fast path's
    tokens), or :func:`transformer_lens_rollouts` (the reference's own sampler, for timing).
    """
    draw = rollouts or seeded_rollouts(model, hook_name, spec.sampling)
    sums = FeatureSums.zeros(sae.cfg.d_sae)
    delta = steering_delta(vector, scale).to(model.cfg.device)
    for p, ids in enumerate(spec.prompts):
        seeds = [spec.steered_seed(seed, vector_id, p, s) for s in range(spec.samples_per_prompt)]
        tokens = draw(torch.tensor([ids] * len(seeds)), spec.new_tokens(p), seeds, delta)
        acts = resid_at_hook(model, hook_name, tokens, batch_size=tokens.shape[0])
        sums.add(
            encode_positions(sae, acts, spec.include_first_position),
            kept_positions(acts, spec.include_first_position, spec.max_resid_norm),
        )
    return sums.mean - baseline_mean.float()
