"""What the measured calls cost, counted in tokens through each part of the model.

The FLOP estimate is 2 x (parameters used) x (tokens through them), per part actually run: the
transformer blocks (all of them for a full forward, those after the hook from the hook's
activations, those up to the hook for a re-run), the unembedding and the SAE encoder. The counts
are derived from each call's arguments and results, so no package function is wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass

from saets_utils.effects.measure import RolloutSpec, prompt_chunks
from saets_utils.steering.hooks import hook_layer


@dataclass
class ModelShape:
    """Parameters per transformer block, of the unembedding and of the SAE encoder."""

    n_layers: int
    block_params: float
    unembed_params: int
    sae_enc_params: int
    hook_layer: int

    @classmethod
    def of(cls, model, sae, hook_name: str) -> ModelShape:
        per_block = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
        return cls(
            n_layers=model.cfg.n_layers,
            block_params=sum(per_block) / len(per_block),
            unembed_params=model.W_U.numel(),
            sae_enc_params=sae.W_enc.numel(),
            hook_layer=hook_layer(hook_name),
        )

    @property
    def n_params(self) -> float:
        """Non-embedding parameters that a full forward multiplies by (blocks + unembedding)."""
        return self.n_layers * self.block_params + self.unembed_params

    def flops(self, count: dict[str, float]) -> float:
        return 2.0 * (
            count["layer_tokens"] * self.block_params
            + count["unembed_tokens"] * self.unembed_params
            + count["sae_tokens"] * self.sae_enc_params
        )

    # --- one method per kind of pass; ``count`` is a Phases' counters -------------------------------

    def full_forward(self, count: dict[str, float], tokens: float) -> None:
        count["layer_tokens"] += tokens * self.n_layers
        count["unembed_tokens"] += tokens

    def from_hook(self, count: dict[str, float], tokens: float) -> None:
        """Steered loss evaluations: the blocks after the hook, then the unembedding."""
        count["layer_tokens"] += tokens * (self.n_layers - self.hook_layer - 1)
        count["unembed_tokens"] += tokens

    def to_hook(self, count: dict[str, float], tokens: float) -> None:
        count["layer_tokens"] += tokens * (self.hook_layer + 1)

    def sae_encode(self, count: dict[str, float], positions: float) -> None:
        count["sae_tokens"] += positions


def positions_encoded(spec: RolloutSpec) -> int:
    """Positions of one rollout that are SAE-encoded (position 0 only if the spec counts it)."""
    return spec.total_tokens - (0 if spec.include_first_position else 1)


def count_measure_effects(count: dict[str, float], shape: ModelShape, spec: RolloutSpec, v: int, max_rows: int) -> None:
    """The work of ``measure_effects`` on ``v`` vectors: one KV-cache decode per chunk of prompts
    (rows: prompts x vectors x samples), the captured activations' last position run to the hook,
    every kept position SAE-encoded. The chunking is ``measure_effects``'s (as many prompts per call
    as ``max_rows`` holds); it only sizes the raw forward compared against and the FLOP estimate."""
    per_call = max(1, max_rows // (v * spec.samples_per_prompt))
    for group in prompt_chunks(spec, per_call):
        rows = len(group) * v * spec.samples_per_prompt
        count["gen_calls"] += 1
        count["gen_rows"] += rows
        count["rollout_tokens"] += rows * spec.total_tokens
        shape.full_forward(count, rows * (spec.total_tokens - 1))
        shape.to_hook(count, rows)
        shape.sae_encode(count, rows * positions_encoded(spec))
