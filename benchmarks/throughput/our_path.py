"""(b) Our path: a block of vectors calibrated and measured together, as notebook 01 does it.

``calibrate`` (the params' method: the secant search by default) then ``measure_effects`` on the
vectors that got a scale, with the arguments ``effects.runner.calibrate_and_measure`` passes
(batch sizes from ``effects.memory``), without writing a shard. Timed phases:
``fast.calibration`` and ``fast.measure_effects`` (rollouts, captured activations, SAE encoding).
The per-run context (activations at the hook on the loss chunks, the unsteered loss, the secant's
start) is computed once, outside the timings, as a worker does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.throughput.setup import Setup
from benchmarks.throughput.work import ModelShape, count_measure_effects
from benchmarks.timing import Phases
from saets_utils.effects.calibration import (
    Calibration,
    SearchStart,
    calibrate,
    fit_gradient_start,
    resid_at_hook,
    scale_hint,
    steered_losses,
)
from saets_utils.effects.measure import measure_effects
from saets_utils.effects.memory import gradient_rows, loss_rows, rollout_rows

PHASES = ("fast.calibration", "fast.measure_effects")


@dataclass
class WorkerContext:
    """What a worker computes once per run: ``resid [c, seq, d_model]`` at the hook on the loss
    chunks, the unsteered loss from the hook, and the secant search's start (None for the sweep)."""

    resid: torch.Tensor
    unsteered_loss: float
    hint: SearchStart | None


@torch.no_grad()
def worker_context(s: Setup, p: Phases) -> WorkerContext:
    with p.phase("fast: loss-chunk activations at the hook + unsteered loss"):
        resid = resid_at_hook(s.model, s.hook, s.loss_tokens)
        zero = torch.zeros(1, s.model.cfg.d_model, device=s.device)
        unsteered = float(steered_losses(s.model, s.hook, s.loss_tokens, resid, zero)[0])
    hint = None
    if s.calibration.method == "secant":
        with p.phase("fast: secant starting scale (sweep of 4 vectors, once per worker)"):
            hint = scale_hint(
                model=s.model,
                hook_name=s.hook,
                tokens=s.loss_tokens,
                resid=resid,
                vectors=s.vectors[:4],
                grid=s.grid,
                target=s.target,
                unsteered_loss=unsteered,
            )
    return WorkerContext(resid, unsteered, hint)


def gradient_context(s: Setup, pilot: list[int], ctx: WorkerContext, p: Phases) -> WorkerContext:
    """``ctx`` with the gradient start (``calibration.start: gradient``) in place of the hint: the
    pilot vectors ``pilot`` calibrated from the hint, the loss's gradient, the level fitted to them
    (timed in ``p``, once per worker). The hint itself where nothing crossed."""
    assert ctx.hint is not None, "the gradient start needs the secant search's hint"
    with p.phase("gradient start: the pilot block's calibration (01 keeps it for that block)"):
        cal = calibrate_block(s, pilot, ctx)
    with p.phase("gradient start: the loss's gradient (one backward) and the level's fit"):
        start = fit_gradient_start(
            s.model,
            s.hook,
            s.loss_tokens,
            ctx.resid,
            pilot=cal,
            vectors=s.vectors[pilot],
            hint=ctx.hint,
            target=s.target,
            unsteered_loss=ctx.unsteered_loss,
            max_rows=gradient_rows(s.model, s.loss_tokens.shape[1]),
        )
    return WorkerContext(ctx.resid, ctx.unsteered_loss, start or ctx.hint)


@torch.no_grad()
def calibrate_block(s: Setup, rows: list[int], ctx: WorkerContext) -> Calibration:
    """Scales of vectors ``rows`` by the params' calibration, called as 01 calls it."""
    return calibrate(
        model=s.model,
        hook_name=s.hook,
        tokens=s.loss_tokens,
        resid=ctx.resid,
        vectors=s.vectors[rows],
        cfg=s.calibration,
        grid=s.grid,
        target=s.target,
        unsteered_loss=ctx.unsteered_loss,
        start=ctx.hint,
        max_rows=loss_rows(s.model, s.loss_tokens.shape[1]),
    )


@torch.no_grad()
def our_block(
    s: Setup, rows: list[int], ctx: WorkerContext, p: Phases, shape: ModelShape
) -> tuple[Calibration, torch.Tensor]:
    """Scales of vectors ``rows`` and their effects ``[len(rows), d_sae]`` against a zero baseline
    (NaN where no scale was found)."""
    vecs, ids = s.vectors[rows], s.vector_ids[rows]
    with p.phase("fast.calibration"):
        cal = calibrate_block(s, rows, ctx)
    # evaluations on all loss chunks per vector (coarse ones pro rata), each from the layer after the hook
    evaluations = float(cal.evaluations.sum()) if cal.evaluations is not None else 0.0
    p.count["grid_points"] += evaluations
    p.count["chunk_evals"] += evaluations * s.loss_tokens.shape[0]
    shape.from_hook(p.count, evaluations * s.loss_tokens.numel())
    ok = torch.isfinite(cal.scales)
    d_sae = s.sae.cfg.d_sae
    effects = torch.full((len(rows), d_sae), float("nan"))
    if ok.any():
        max_rows = rollout_rows(s.model, s.spec.total_tokens)
        with p.phase("fast.measure_effects"):
            blk = measure_effects(
                model=s.model,
                sae=s.sae,
                hook_name=s.hook,
                spec=s.spec,
                vectors=vecs[ok],
                vector_ids=ids[ok].tolist(),
                scales=cal.scales[ok].to(vecs.device),
                baseline_mean=torch.zeros(d_sae, device=vecs.device),
                seed=s.seed,
                max_rows=max_rows,
            )
        effects[ok] = blk.effects.float().cpu()
        count_measure_effects(p.count, shape, s.spec, int(ok.sum()), max_rows)
    return cal, effects
