"""Pick, per steering vector, the scale at which the LM loss reaches a target.

Reference algorithm: sweep the scale grid upwards on chunks of a text dataset, stop once the mean
LM loss exceeds the target, interpolate linearly between the last two points. Here the sweep runs
for a block of vectors at once, and only the layers after the hook are recomputed: activations up
to the hook do not depend on steering, so they are computed once per run.

Outcomes are recorded per vector, never silently invented:
- ``ok``: crossed; scale interpolated between the last point below and the first above.
- ``non_monotone``: crossed, but the loss fell by more than ``tol`` somewhere before crossing
  (scale still taken at the first crossing).
- ``not_reached``: the loss stayed below the target over the whole grid; the scale is the grid's
  maximum (the strongest steering tried).
- ``above_at_zero``: the unsteered loss already exceeds the target (absolute target set too low);
  scale NaN, the vector is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

from saets_utils.config import ConfigError, LossTarget

STATUSES = ("ok", "non_monotone", "not_reached", "above_at_zero")


def hook_layer(hook_name: str) -> int:
    """``blocks.12.hook_resid_post`` -> 12."""
    return int(hook_name.split(".")[1])


@torch.no_grad()
def resid_at_hook(model: HookedTransformer, hook_name: str, tokens: Tensor, batch_size: int = 64) -> Tensor:
    """Activations at ``hook_name`` for ``tokens [n, seq]`` -> ``[n, seq, d_model]`` (stops at the hook)."""
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        _, cache = model.run_with_cache(
            tokens[i : i + batch_size].to(model.cfg.device),
            names_filter=hook_name,
            stop_at_layer=hook_layer(hook_name) + 1,
        )
        out.append(cache[hook_name])
    return torch.cat(out)


def _next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross entropy per sequence: logits ``[n, seq, vocab]`` -> ``[n]``."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0].mean(-1)


@torch.no_grad()
def steered_losses(
    model: HookedTransformer, hook_name: str, tokens: Tensor, resid: Tensor, deltas: Tensor, max_rows: int = 64
) -> Tensor:
    """Mean LM loss over the chunks ``tokens [c, seq]`` for each steering delta ``[r, d_model]`` -> ``[r]``.

    ``resid [c, seq, d_model]`` are the unsteered activations at the hook (:func:`resid_at_hook`);
    the delta is added at every position and the model is run from the next layer on.
    """
    c = tokens.shape[0]
    layer = hook_layer(hook_name) + 1
    losses = torch.empty(deltas.shape[0], dtype=torch.float64)
    per = max(1, max_rows // c)  # deltas per forward
    for i in range(0, deltas.shape[0], per):
        d = deltas[i : i + per].to(resid.device, resid.dtype)
        x = (resid[None] + d[:, None, None, :]).flatten(0, 1)  # [per*c, seq, d_model]
        logits = model(x, start_at_layer=layer)
        loss = _next_token_loss(logits, tokens.repeat(d.shape[0], 1))
        losses[i : i + d.shape[0]] = loss.view(d.shape[0], c).mean(-1).double().cpu()
    return losses


def loss_target_value(target: LossTarget, unsteered_loss: float) -> float:
    """Absolute target as is; relative target = unsteered loss + ``value`` nats."""
    return target.value if target.kind == "absolute" else unsteered_loss + target.value


def check_loss_target(target: LossTarget, unsteered_loss: float, scales: Sequence[float]) -> None:
    """Raise :class:`ConfigError` before any vector is measured when no vector can reach the target:
    the unsteered loss is already at or above an absolute target (every vector would be
    ``above_at_zero``)."""
    tgt = loss_target_value(target, unsteered_loss)
    if not np.isfinite(unsteered_loss):
        raise ConfigError(f"the unsteered loss is {unsteered_loss}; check model.dtype and the loss text")
    if tgt <= unsteered_loss:
        raise ConfigError(
            f"effects.loss_target ({target.kind} {target.value}) is {tgt:.3f} nats, at or below the unsteered "
            f"loss {unsteered_loss:.3f} on the loss chunks, so no steering scale in {min(scales)}..{max(scales)} "
            f"can reach it; use an absolute value above {unsteered_loss:.2f}, or kind: relative "
            "(e.g. value: 0.5 nats above the unsteered loss)"
        )


def interpolate_scale(
    grid: Sequence[float], losses: Sequence[float], target: float, tol: float = 0.05
) -> tuple[float, str]:
    """Scale at which the loss curve first exceeds ``target`` (linear interpolation), and a status.

    ``losses`` may end with NaN (points never evaluated after the crossing).
    """
    g = np.asarray(grid, dtype=float)
    ls = np.asarray(losses, dtype=float)
    if np.isfinite(ls[0]) and ls[0] > target:
        return float("nan"), "above_at_zero"
    valid = np.isfinite(ls)
    above = np.nonzero(valid & (ls > target))[0]
    if above.size == 0:
        return float(g[valid][-1]), "not_reached"
    j = int(above[0])
    s0, s1, l0, l1 = g[j - 1], g[j], ls[j - 1], ls[j]
    scale = float(s0 + (target - l0) * (s1 - s0) / (l1 - l0)) if l1 != l0 else float(s1)
    before = ls[: j + 1]
    monotone = bool(np.all(np.diff(before) >= -tol))
    return scale, "ok" if monotone else "non_monotone"


@dataclass
class Calibration:
    """Per-vector result: ``scales [v]`` (NaN where skipped), ``status`` (one of :data:`STATUSES`),
    ``losses [v, g]`` (NaN where the sweep stopped), the ``target`` and the ``unsteered_loss``."""

    scales: Tensor
    status: list[str]
    losses: Tensor
    target: float
    unsteered_loss: float


@torch.no_grad()
def calibrate_scales(
    model: HookedTransformer,
    hook_name: str,
    tokens: Tensor,
    resid: Tensor,
    vectors: Tensor,
    grid: Sequence[float],
    target: LossTarget,
    unsteered_loss: float,
    max_rows: int = 64,
) -> Calibration:
    """Sweep ``grid`` upwards for all ``vectors [v, d_model]`` (unit norm) together; each vector
    leaves the sweep once its loss exceeds the target."""
    grid = sorted(float(s) for s in grid)
    tgt = loss_target_value(target, unsteered_loss)
    v = vectors.shape[0]
    losses = torch.full((v, len(grid)), float("nan"), dtype=torch.float64)
    active = torch.ones(v, dtype=torch.bool)
    for gi, s in enumerate(grid):
        idx = active.nonzero()[:, 0]
        if idx.numel() == 0:
            break
        if s == 0.0:
            losses[idx, gi] = unsteered_loss
        else:
            losses[idx, gi] = steered_losses(model, hook_name, tokens, resid, vectors[idx] * s, max_rows)
        active[idx] = losses[idx, gi] <= tgt
    scales, status = [], []
    for i in range(v):
        sc, st = interpolate_scale(grid, losses[i].tolist(), tgt)
        scales.append(sc)
        status.append(st)
    return Calibration(torch.tensor(scales, dtype=torch.float32), status, losses, tgt, unsteered_loss)
