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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

from saets_utils.config import CalibrationConfig, ConfigError, LossTarget
from saets_utils.steering.engine import nonzero_bias
from saets_utils.steering.hooks import hook_layer

STATUSES = ("ok", "non_monotone", "not_reached", "above_at_zero")


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


LOGIT_CHUNK_BYTES = 64 * 2**20  # one block of float32 logits in the loss below


def final_resid_loss(model: HookedTransformer, resid_final: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross entropy per sequence from the residual after the last block
    ``resid_final [n, seq, d_model]`` and ``tokens [n, seq]`` -> ``[n]`` float64.

    The same number as ``model(tokens, return_type="loss")`` per sequence, computed as
    ``logsumexp(logits) - logit[next token]`` on blocks of positions, so the ``[n, seq, vocab]``
    logits (and their log-softmax) are never held at once, and the last position (which predicts
    nothing here) is not unembedded. A zero unembedding bias is left out, and without autograd each
    block's ``logsumexp`` (``torch.logsumexp``'s steps) is taken in the block's own buffer.
    """
    from transformer_lens.utilities.activation_functions import apply_softcap

    x = resid_final[:, :-1]
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    x = x.reshape(-1, x.shape[-1])
    nxt = tokens[:, 1:].reshape(-1).to(x.device)
    nll = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    step = max(1, LOGIT_CHUNK_BYTES // (4 * model.cfg.d_vocab))
    b_U = nonzero_bias(model.b_U)
    for i in range(0, x.shape[0], step):
        logits = apply_softcap(F.linear(x[i : i + step], model.W_U.T, b_U), model.cfg.output_logits_soft_cap)
        logits = logits.float()
        picked = logits.gather(-1, nxt[i : i + step, None])[:, 0]
        lse = logits.logsumexp(-1) if logits.requires_grad else _logsumexp_(logits)  # loss_gradient's backward
        nll[i : i + step] = lse - picked
    return nll.view(tokens.shape[0], -1).double().mean(-1)


def _logsumexp_(x: Tensor) -> Tensor:
    """``torch.logsumexp(x, -1)`` of ``x [n, k]``, step for step (the max, ``exp(x - max)`` summed,
    its log plus the max), overwriting ``x`` instead of allocating a copy of it."""
    m = x.amax(-1, keepdim=True)
    m.masked_fill_(m.abs() == math.inf, 0.0)
    return x.sub_(m).exp_().sum(-1).log_().add_(m[:, 0])


@torch.no_grad()
def steered_losses(
    model: HookedTransformer, hook_name: str, tokens: Tensor, resid: Tensor, deltas: Tensor, *, max_rows: int = 64
) -> Tensor:
    """Mean LM loss over the chunks ``tokens [c, seq]`` for each steering delta ``[r, d_model]`` -> ``[r]``.

    ``resid [c, seq, d_model]`` are the unsteered activations at the hook (:func:`resid_at_hook`);
    the delta is added at every position and the model is run from the next layer on
    (:func:`final_resid_loss` for the loss).
    """
    c = tokens.shape[0]
    layer = hook_layer(hook_name) + 1
    losses = torch.empty(deltas.shape[0], dtype=torch.float64)
    per = max(1, max_rows // c)  # deltas per forward
    for i in range(0, deltas.shape[0], per):
        d = deltas[i : i + per].to(resid.device, resid.dtype)
        x = (resid[None] + d[:, None, None, :]).flatten(0, 1)  # [per*c, seq, d_model]
        x = model(x, start_at_layer=layer, stop_at_layer=model.cfg.n_layers)
        loss = final_resid_loss(model, x, tokens.repeat(d.shape[0], 1))
        losses[i : i + d.shape[0]] = loss.view(d.shape[0], c).mean(-1).cpu()
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
    ``losses [v, g]`` (NaN where the sweep stopped), the ``target`` and the ``unsteered_loss``; the
    secant search adds the points it evaluated on all chunks (``probe_scales``/``probe_losses
    [v, k]``) and ``evaluations [v]``, its cost in evaluations on all chunks."""

    scales: Tensor
    status: list[str]
    losses: Tensor
    target: float
    unsteered_loss: float
    probe_scales: Tensor | None = None
    probe_losses: Tensor | None = None
    evaluations: Tensor | None = None

    def rows(self, idx: Sequence[int]) -> Calibration:
        """The calibration of the vectors ``idx`` alone (same target and unsteered loss)."""
        pick = lambda t: None if t is None else t[list(idx)]
        return Calibration(
            self.scales[list(idx)],
            [self.status[i] for i in idx],
            self.losses[list(idx)],
            self.target,
            self.unsteered_loss,
            pick(self.probe_scales),
            pick(self.probe_losses),
            pick(self.evaluations),
        )


@torch.no_grad()
def calibrate_scales(
    model: HookedTransformer,
    hook_name: str,
    tokens: Tensor,
    resid: Tensor,
    vectors: Tensor,
    *,
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
            losses[idx, gi] = steered_losses(model, hook_name, tokens, resid, vectors[idx] * s, max_rows=max_rows)
        active[idx] = losses[idx, gi] <= tgt
    scales, status = [], []
    for i in range(v):
        sc, st = interpolate_scale(grid, losses[i].tolist(), tgt)
        scales.append(sc)
        status.append(st)
    evaluations = torch.isfinite(losses).sum(1).double() - float(grid[0] == 0.0)  # scale 0 is free
    return Calibration(
        torch.tensor(scales, dtype=torch.float32), status, losses, tgt, unsteered_loss, None, None, evaluations
    )


# --- the cheap search: a few evaluations near the crossing instead of a sweep ----------------------

EXPONENT_RANGE = (0.5, 8.0)


def _power_law_scale(s: float, rise: float, need: float, exponent: float, s_max: float) -> float:
    """Scale where ``rise * (scale / s) ** exponent`` reaches ``need``; where the loss did not rise,
    twice ``s``; at most ``s_max``."""
    if rise <= 1e-6:
        return min(2.0 * s, s_max)
    return min(s * (need / rise) ** (1.0 / exponent), s_max)


def local_exponent(s: Sequence[float], rise: Sequence[float], default: float) -> float:
    """Exponent of ``rise ~ scale ** p`` through the two points ``(s[i], rise[i])`` (clamped to
    :data:`EXPONENT_RANGE`); ``default`` where they do not determine it."""
    if len(s) < 2 or min(rise[0], rise[1]) <= 1e-6 or s[0] <= 0 or s[1] <= 0 or s[0] == s[1]:
        return default
    p = math.log(rise[1] / rise[0]) / math.log(s[1] / s[0])
    return min(max(p, EXPONENT_RANGE[0]), EXPONENT_RANGE[1]) if math.isfinite(p) else default


def _next_scale(
    s: Tensor, loss: Tensor, l0: float, target: float, exponent: float, s_max: float
) -> tuple[float, float]:
    """From the points ``(s [k], loss [k])`` evaluated so far: the scale to try next (the crossing
    of a power law through the two points closest to the target, or through the closest one with
    ``exponent``) and the scale it moves from."""
    order = sorted(range(len(s)), key=lambda i: abs(float(loss[i]) - target))
    near = order[0]
    p = exponent
    if len(order) > 1:
        two = order[:2]
        p = local_exponent([float(s[i]) for i in two], [float(loss[i]) - l0 for i in two], exponent)
    nxt = _power_law_scale(float(s[near]), float(loss[near]) - l0, target - l0, p, s_max)
    return nxt, float(s[near])


@torch.no_grad()
def calibrate_scales_secant(
    model: HookedTransformer,
    hook_name: str,
    tokens: Tensor,
    resid: Tensor,
    vectors: Tensor,
    *,
    grid: Sequence[float],
    target: LossTarget,
    unsteered_loss: float,
    start: SearchStart | None = None,
    coarse_chunks: int | None = None,
    rtol: float = 0.1,
    max_evals: int = 3,
    tol: float = 0.05,
    max_rows: int = 64,
) -> Calibration:
    """The scale at which the loss crosses the target for ``vectors [v, d_model]`` (unit norm), from
    one to ``max_evals`` evaluations on all loss chunks per vector instead of the reference's sweep.

    The loss rise is modelled locally as ``loss - unsteered ~ scale ** p``.

    1. **Guess**: ``start.scale`` (e.g. the sweep's median over a few fixed vectors,
       :func:`scale_hint`), refined by one evaluation on the first ``coarse_chunks`` chunks
       (default ``c // 8``: none below 8 chunks, where one chunk's loss is too noisy to help).
       Without a start, the sweep on those chunks (or on all of them).
    2. **Refine** on all chunks: evaluate at the guess, move to the crossing of the power law
       through the point (``p = start.exponent``) or through the two points closest to the target
       (``p`` fitted to them); stop once the move is at most ``rtol`` of the scale.

    Statuses as :func:`calibrate_scales`: ``not_reached`` when the loss at the grid's largest scale
    stays below the target (scale = that maximum), ``above_at_zero`` (NaN), and ``non_monotone``
    when an evaluated loss lies more than ``tol`` below the unsteered loss (a sweep sees more dips
    than these few points do). ``losses [v, g]`` holds only the unsteered loss (column 0);
    ``probe_scales``/``probe_losses [v, max_evals]`` the points evaluated on all chunks and
    ``evaluations [v]`` the cost in evaluations on all chunks (coarse ones pro rata).
    """
    grid = sorted(float(s) for s in grid)
    s_max = grid[-1]
    tgt = loss_target_value(target, unsteered_loss)
    v, c = vectors.shape[0], tokens.shape[0]
    losses = torch.full((v, len(grid)), float("nan"), dtype=torch.float64)
    losses[:, 0] = unsteered_loss
    probe_s = torch.full((v, max_evals), float("nan"), dtype=torch.float64)
    probe_l = torch.full((v, max_evals), float("nan"), dtype=torch.float64)
    cost = torch.zeros(v, dtype=torch.float64)
    if unsteered_loss > tgt:
        nan = torch.full((v,), float("nan"))
        return Calibration(nan, ["above_at_zero"] * v, losses, tgt, unsteered_loss, probe_s, probe_l, cost)
    exponent = start.exponent if start is not None else 2.0

    # 1. the guess
    m = min(c, coarse_chunks or c // 8)
    coarse = 0 < m < c
    if start is not None:
        guess = start.scales_for(vectors).clamp(max=s_max)
        if coarse:
            sub_t, sub_r = tokens[:m], resid[:m]
            l0_sub = float(steered_losses(model, hook_name, sub_t, sub_r, vectors[:1] * 0.0)[0])
            l_h = steered_losses(
                model, hook_name, sub_t, sub_r, vectors * guess[:, None].to(vectors), max_rows=max_rows
            )
            cost += m / c
            guess = torch.tensor(
                [
                    _power_law_scale(float(guess[i]), float(l_h[i]) - l0_sub, tgt - unsteered_loss, exponent, s_max)
                    for i in range(v)
                ],
                dtype=torch.float64,
            )
    else:
        sub = slice(0, m if coarse else c)
        l0_sub = (
            unsteered_loss
            if not coarse
            else float(steered_losses(model, hook_name, tokens[sub], resid[sub], vectors[:1] * 0.0)[0])
        )
        sweep = calibrate_scales(
            model,
            hook_name,
            tokens[sub],
            resid[sub],
            vectors,
            grid=grid,
            target=target,
            unsteered_loss=l0_sub,
            max_rows=max_rows,
        )
        assert sweep.evaluations is not None
        cost += sweep.evaluations * (m / c if coarse else 1.0)
        guess = sweep.scales.double().nan_to_num(nan=grid[1] if len(grid) > 1 else s_max)
    guess = guess.clamp(min=1e-3 * s_max, max=s_max)

    # 2. refine on all chunks
    scale = torch.full((v,), float("nan"), dtype=torch.float64)
    active = torch.ones(v, dtype=torch.bool)
    for k in range(max_evals):
        idx = active.nonzero()[:, 0]
        if idx.numel() == 0:
            break
        s_k = guess[idx]
        l_k = steered_losses(
            model, hook_name, tokens, resid, vectors[idx] * s_k[:, None].to(vectors), max_rows=max_rows
        )
        cost[idx] += 1
        probe_s[idx, k], probe_l[idx, k] = s_k, l_k
        for i in idx.tolist():
            pts_s, pts_l = probe_s[i, : k + 1], probe_l[i, : k + 1]
            if bool((pts_s >= s_max).any()) and not bool((pts_l > tgt).any()):
                scale[i], active[i] = s_max, False  # not reached: the sweep's answer too
                continue
            nxt, frm = _next_scale(pts_s, pts_l, unsteered_loss, tgt, exponent, s_max)
            if abs(nxt - frm) <= rtol * frm or k + 1 == max_evals:
                scale[i], active[i] = nxt, False
            else:
                guess[i] = nxt
    status = []
    for i in range(v):
        seen = probe_l[i][torch.isfinite(probe_l[i])]
        at_max = bool(scale[i] >= s_max and (seen <= tgt).all())
        dips = bool((seen < unsteered_loss - tol).any())
        status.append("not_reached" if at_max else "non_monotone" if dips else "ok")
    return Calibration(scale.float(), status, losses, tgt, unsteered_loss, probe_s, probe_l, cost)


def calibrate(
    model: HookedTransformer,
    hook_name: str,
    tokens: Tensor,
    resid: Tensor,
    vectors: Tensor,
    *,
    cfg: CalibrationConfig,
    grid: Sequence[float],
    target: LossTarget,
    unsteered_loss: float,
    start: SearchStart | None = None,
    max_rows: int = 64,
) -> Calibration:
    """Scales for ``vectors [v, d_model]`` with the method ``cfg`` names (``start``: the secant
    search's starting point, :func:`scale_hint`; the sweep ignores it)."""
    if cfg.method == "sweep":
        return calibrate_scales(
            model,
            hook_name,
            tokens,
            resid,
            vectors,
            grid=grid,
            target=target,
            unsteered_loss=unsteered_loss,
            max_rows=max_rows,
        )
    return calibrate_scales_secant(
        model,
        hook_name,
        tokens,
        resid,
        vectors,
        grid=grid,
        target=target,
        unsteered_loss=unsteered_loss,
        start=start,
        coarse_chunks=cfg.coarse_chunks,
        rtol=cfg.rtol,
        max_evals=cfg.max_evals,
        max_rows=max_rows,
    )


@dataclass(frozen=True)
class SearchStart:
    """Where the secant search starts: a ``scale`` and the ``exponent`` of ``loss rise ~ scale ** p``
    near the crossing; with a ``gradient [d_model]`` (:func:`loss_gradient`) each vector ``v``
    starts at ``scale * exp(slope * (gradient . v))`` instead (:func:`gradient_start`)."""

    scale: float
    exponent: float
    gradient: Tensor | None = None
    slope: float = 0.0

    def scales_for(self, vectors: Tensor) -> Tensor:
        """Starting scales ``[v]`` (float64, on the CPU) of ``vectors [v, d_model]``."""
        if self.gradient is None:
            return torch.full((vectors.shape[0],), self.scale, dtype=torch.float64)
        gv = vectors.detach().double().cpu() @ self.gradient.double().cpu()
        return self.scale * torch.exp(self.slope * gv)


@torch.no_grad()
def loss_gradient(
    model: HookedTransformer, hook_name: str, tokens: Tensor, resid: Tensor, *, max_rows: int = 64
) -> Tensor:
    """``[d_model]`` float32: the gradient of the mean loss over the chunks ``tokens [c, seq]`` with
    respect to a steering delta added at every position at ``hook_name``, at delta 0 (``resid [c,
    seq, d_model]``: the unsteered activations there). One forward and backward from the next layer
    on, in batches of ``max_rows`` chunks; the model's parameters get no gradient."""
    c = tokens.shape[0]
    layer = hook_layer(hook_name) + 1
    delta = torch.zeros(resid.shape[-1], dtype=resid.dtype, device=resid.device)
    grad = torch.zeros(resid.shape[-1], dtype=torch.float64, device=resid.device)
    for i in range(0, c, max_rows):
        with torch.enable_grad():
            d = delta.clone().requires_grad_(True)
            x = model(resid[i : i + max_rows] + d, start_at_layer=layer, stop_at_layer=model.cfg.n_layers)
            loss = final_resid_loss(model, x, tokens[i : i + max_rows]).sum() / c
            (g,) = torch.autograd.grad(loss, d)
        grad += g.double()
    return grad.float().cpu()


def gradient_start(
    pilot: Calibration, vectors: Tensor, gradient: Tensor, hint: SearchStart, need: float, iterations: int = 50
) -> SearchStart | None:
    """A per-vector start from a ``pilot`` calibration of ``vectors [k, d_model]``: to first order in
    the loss's slope ``g . v`` (``gradient``), the rise ``s (g . v) + A s ** p = need`` crosses at
    ``log s = a + b (g . v)`` with ``b = -exp(a) / (p * need)`` (``p``: ``hint.exponent``); the level
    ``a`` is fitted to the pilot's scales (least squares, ``b`` following ``a``). None when fewer
    than 2 pilot vectors crossed."""
    ok = [i for i, st in enumerate(pilot.status) if st in ("ok", "non_monotone")]
    if len(ok) < 2:
        return None
    log_s = torch.log(pilot.scales[ok].double())
    gv = vectors[ok].detach().double().cpu() @ gradient.double().cpu()
    a = float(log_s.median())
    p = hint.exponent
    for _ in range(iterations):  # a fixed point: b depends on the level
        b = -math.exp(a) / (p * need)
        a = float((log_s - b * gv).mean())
    return SearchStart(math.exp(a), p, gradient.float().cpu(), -math.exp(a) / (p * need))


def fit_gradient_start(
    model: HookedTransformer,
    hook_name: str,
    tokens: Tensor,
    resid: Tensor,
    *,
    pilot: Calibration,
    vectors: Tensor,
    hint: SearchStart,
    target: LossTarget,
    unsteered_loss: float,
    max_rows: int = 64,
) -> SearchStart | None:
    """:func:`gradient_start` from the ``pilot`` calibration of ``vectors [k, d_model]``, with the
    loss's gradient on the chunks ``tokens`` (:func:`loss_gradient`, batches of ``max_rows``) and the
    rise ``target`` asks above ``unsteered_loss``."""
    g = loss_gradient(model, hook_name, tokens, resid, max_rows=max_rows)
    need = loss_target_value(target, unsteered_loss) - unsteered_loss
    return gradient_start(pilot, vectors, g, hint, need)


def scale_hint(
    model: HookedTransformer,
    hook_name: str,
    tokens: Tensor,
    resid: Tensor,
    vectors: Tensor,
    *,
    grid: Sequence[float],
    target: LossTarget,
    unsteered_loss: float,
    default_exponent: float = 2.0,
) -> SearchStart | None:
    """The secant search's start from the reference sweep of ``vectors [k, d_model]`` (a few fixed
    vectors, e.g. a plan's first rows, so every block of a run starts alike whatever worker or
    resume computes it): their median scale, and the median exponent of the loss rise between the
    two grid points around each crossing. None if none crosses."""
    cal = calibrate_scales(
        model, hook_name, tokens, resid, vectors, grid=grid, target=target, unsteered_loss=unsteered_loss
    )
    g = sorted(float(x) for x in grid)
    ok = [i for i, st in enumerate(cal.status) if st in ("ok", "non_monotone")]
    if not ok:
        return None
    exps = []
    for i in ok:
        row = cal.losses[i]
        j = int(torch.isfinite(row).sum()) - 1  # the first point above the target
        exps.append(
            local_exponent(
                [g[j - 1], g[j]], [float(row[j - 1]) - unsteered_loss, float(row[j]) - unsteered_loss], math.nan
            )
        )
    finite = [p for p in exps if math.isfinite(p)]
    exponent = float(np.median(finite)) if finite else default_exponent
    return SearchStart(float(np.median([float(cal.scales[i]) for i in ok])), exponent)
