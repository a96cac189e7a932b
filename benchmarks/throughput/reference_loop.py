"""(a) The reference loop: one vector at a time, the way the SAE-TS reference code measures it.

Scale search: sweep the grid upwards with a *full* forward of the model on the loss chunks at each
scale (``model(tokens, return_type="loss")``, the steering hook at every position), stop once the
loss exceeds the target, interpolate linearly between the last two points
(:func:`saets_utils.effects.calibration.interpolate_scale`). Effect:
:func:`saets_utils.effects.reference.reference_effects` with TransformerLens's own sampler
(:func:`~saets_utils.effects.reference.transformer_lens_rollouts`): one ``model.generate`` call per
prompt under the steering hook, then the rollouts re-run to the hook and SAE-encoded.

Timed phases: ``ref.calibration`` (the sweep), ``ref.effect`` (all of ``reference_effects``) and,
inside it, ``ref.generate`` (the rollouts); the re-run and encoding are the difference.
"""

from __future__ import annotations

import math

import torch

from benchmarks.throughput.setup import Setup
from benchmarks.throughput.work import ModelShape, positions_encoded
from benchmarks.timing import Phases
from saets_utils.effects.calibration import interpolate_scale
from saets_utils.effects.reference import Rollouts, reference_effects, transformer_lens_rollouts
from saets_utils.steering.hooks import steering_hook

PHASES = ("ref.calibration", "ref.effect")  # together, all of a vector's time (ref.generate is inside ref.effect)


@torch.no_grad()
def unsteered_loss(s: Setup) -> float:
    """The reference's unsteered loss: one full forward on the loss chunks."""
    return float(s.model(s.loss_tokens, return_type="loss"))


@torch.no_grad()
def reference_sweep(s: Setup, v: torch.Tensor, target: float, p: Phases, shape: ModelShape) -> tuple[float, str]:
    """The scale at which vector ``v [d_model]`` takes the loss above ``target`` (absolute), and its
    status: the grid swept upwards, a full forward per point, until the loss exceeds the target."""
    grid = sorted(s.grid)
    losses: list[float] = []
    with p.phase("ref.calibration"):
        for scale in grid:
            with steering_hook(s.model, s.hook, scale * v):
                losses.append(float(s.model(s.loss_tokens, return_type="loss")))
            shape.full_forward(p.count, s.loss_tokens.numel())
            p.count["grid_points"] += 1
            if losses[-1] > target:
                break
    return interpolate_scale(grid, losses + [math.nan] * (len(grid) - len(losses)), target)


def _timed(draw: Rollouts, p: Phases, shape: ModelShape) -> Rollouts:
    """``draw`` timed as ``ref.generate``, its tokens counted."""

    def rollouts(prompt: torch.Tensor, new_tokens: int, seeds: list[int], delta: torch.Tensor) -> torch.Tensor:
        with p.phase("ref.generate"):
            out = draw(prompt, new_tokens, seeds, delta)
        shape.full_forward(p.count, out.shape[0] * (out.shape[1] - 1))
        return out

    return rollouts


@torch.no_grad()
def reference_effect(s: Setup, v: torch.Tensor, scale: float, p: Phases, shape: ModelShape) -> torch.Tensor:
    """The effect ``[d_sae]`` of ``v`` at ``scale`` (zero baseline), by the package's reference loop
    with the reference's own sampler."""
    sample = _timed(transformer_lens_rollouts(s.model, s.hook, s.spec.sampling), p, shape)
    with p.phase("ref.effect"):
        effect = reference_effects(
            model=s.model,
            sae=s.sae,
            hook_name=s.hook,
            spec=s.spec,
            vector=v,
            vector_id=0,
            scale=scale,
            baseline_mean=torch.zeros(s.sae.cfg.d_sae),
            seed=s.seed,
            rollouts=sample,
        )
    rows = len(s.spec.prompts) * s.spec.samples_per_prompt  # every rollout re-run to the hook and encoded
    shape.to_hook(p.count, rows * s.spec.total_tokens)
    shape.sae_encode(p.count, rows * positions_encoded(s.spec))
    return effect


def reference_vector(
    s: Setup, v: torch.Tensor, target: float, p: Phases, shape: ModelShape
) -> tuple[float, str, torch.Tensor]:
    """One vector through the reference loop: the sweep, then (if it found a scale) the effect."""
    scale, status = reference_sweep(s, v, target, p, shape)
    if not math.isfinite(scale):
        return scale, status, torch.full((s.sae.cfg.d_sae,), float("nan"))
    return scale, status, reference_effect(s, v, scale, p, shape)
