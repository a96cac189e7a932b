"""Build one steering vector per method: CAA, SAE, SAE-TS, pinverse, rotation, FGAA (pure functions
of tensors; :mod:`saets_utils.evaluation.task_vectors` feeds them a task and the run's files).

Each builder is a plain function that returns a unit vector [d_model] (``prompt`` needs none),
never mutates its inputs and rejects bad input with a ValueError. A target is a list of
``(feature id, weight)`` pairs, as in docs/reference.md.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from saets_utils.approximator.model import EffectApproximator, pinverse, rank_rtol, rotation_matrix

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

__all__ = [
    "Target",
    "build_caa_vector",
    "build_fgaa_target",
    "build_fgaa_vector",
    "build_pinverse_vector",
    "build_random_vector",
    "build_rotation_vector",
    "build_sae_ts_vector",
    "build_sae_vector",
    "discover_target_features",
    "feature_density",
    "mean_resid",
    "mean_sae_acts",
    "pinverse",
    "rotation_matrix",
    "target_vector",
]

Target = list[tuple[int, float]]
TokenSeqs = Sequence[Tensor | Sequence[int]] | Tensor


def _unit(v: Tensor, what: str) -> Tensor:
    n = v.norm()
    if not torch.isfinite(v).all() or not n > 0:
        raise ValueError(f"{what} is zero or not finite; it cannot be normalised to a steering vector")
    return v / n


def target_vector(
    targets: Target, d_sae: int, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> Float[Tensor, " d_sae"]:
    """Dense target ``t`` [d_sae] from ``[(feature id, weight), ...]``."""
    if not targets:
        raise ValueError("target is empty; give at least one (feature id, weight) pair")
    t = torch.zeros(d_sae, dtype=dtype, device=device)
    seen: set[int] = set()
    for pair in targets:
        try:
            fid, w = pair
            ok_id = not isinstance(fid, bool) and int(fid) == fid
            w = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"target entry {pair!r} is not a (feature id, weight) pair of numbers") from None
        if not ok_id or not 0 <= int(fid) < d_sae:
            raise ValueError(f"target feature id {fid!r} is out of range for an SAE with d_sae={d_sae}")
        if int(fid) in seen:
            raise ValueError(f"target feature id {fid} appears twice; merge its weights")
        if not math.isfinite(w):
            raise ValueError(f"target weight {w!r} of feature {fid} is not finite")
        seen.add(int(fid))
        t[int(fid)] = w
    if not t.any():
        raise ValueError("all target weights are zero")
    return t


def build_random_vector(d_model: int, key: str, seed: int) -> Float[Tensor, " d_model"]:
    """Control: an isotropic unit vector [d_model], fixed by ``key`` (e.g. the task's name) and ``seed``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    v = torch.randn(d_model, generator=g)
    return v / v.norm()


def build_sae_vector(W_dec: Float[Tensor, "d_sae d_model"], targets: Target) -> Float[Tensor, " d_model"]:
    """SAE: weighted sum of the target features' decoder rows, unit-normalised."""
    t = target_vector(targets, W_dec.shape[0], W_dec.dtype, W_dec.device)
    return _unit(t @ W_dec, "the weighted sum of decoder rows")


def build_sae_ts_vector(approx: EffectApproximator, targets: Target, lam: float = 1.0) -> Float[Tensor, " d_model"]:
    """SAE-TS: ``norm(W t) - lam * norm(W b)``, unit-normalised.

    ``W t`` is the direction whose predicted effect best matches the target; subtracting the bias
    direction cancels the effect every steering vector has (BOS, position and other dense features).
    """
    if not math.isfinite(lam):
        raise ValueError(f"SAE-TS lam must be finite; got {lam}")
    t = target_vector(targets, approx.d_sae, approx.W.dtype, approx.W.device)
    s = _unit(approx.W @ t, "W @ t (the target's predicted direction)") - lam * approx.correction
    return _unit(s, f"the SAE-TS vector (lam={lam})")


def build_pinverse_vector(
    approx: EffectApproximator, targets: Target, W_pinv: Float[Tensor, "d_sae d_model"] | None = None
) -> Float[Tensor, " d_model"]:
    """Pseudoinverse: least-squares ``x`` with ``x @ W + b ~= t / ||t||``, i.e. ``(t/||t|| - b) @ pinv(W)``.

    Unit-normalised here so every method is compared at the same steering scales; the reference
    code used it unnormalised. ``pinv(W)`` is :func:`pinverse`: float64 with a cut-off at ``W``'s
    storage precision, so a low-rank ``W`` stored in float32 gives the rank-k solution and not
    inverted rounding noise. Pass ``W_pinv [d_sae, d_model]`` to reuse one pseudoinverse across tasks.
    """
    t = target_vector(targets, approx.d_sae, torch.float64, approx.W.device)
    if W_pinv is None:
        W_pinv = pinverse(approx.W)
    elif W_pinv.shape != (approx.d_sae, approx.d_model):
        raise ValueError(
            f"W_pinv must be [d_sae, d_model] = [{approx.d_sae}, {approx.d_model}]; got {tuple(W_pinv.shape)}"
        )
    x = (t / t.norm() - approx.b.double()) @ W_pinv.double()
    return _unit(x, "the pseudoinverse solution").to(approx.W.dtype)


def build_rotation_vector(
    approx: EffectApproximator,
    W_dec: Float[Tensor, "d_sae d_model"],
    targets: Target,
    *,
    R: Float[Tensor, "d_model d_model"] | None = None,
    lam: float = 1.0,
) -> Float[Tensor, " d_model"]:
    """Rotation: rotate the target's decoder direction into effect space, ``norm(R d) - lam * norm(W b)``, normalised.

    Needs no measured effect for the target feature, only its decoder row. ``R`` defaults to
    :func:`rotation_matrix`; pass a precomputed one (it is saved next to the approximator). When
    ``W`` is low rank, ``R`` maps only the span it was fitted on: a target direction ``d`` with no
    component there (``R @ d`` zero up to ``R``'s rounding) raises a ValueError.
    """
    if W_dec.shape != (approx.d_sae, approx.d_model):
        raise ValueError(
            f"W_dec must be [d_sae, d_model] = [{approx.d_sae}, {approx.d_model}] to match the approximator; got {tuple(W_dec.shape)}"
        )
    if R is None:
        R = rotation_matrix(approx, W_dec)
    elif R.shape != (approx.d_model, approx.d_model):
        raise ValueError(f"R must be [d_model, d_model] = [{approx.d_model}, {approx.d_model}]; got {tuple(R.shape)}")
    d = build_sae_vector(W_dec.to(approx.W), targets)
    Rd = R.double() @ d.double()
    if torch.isfinite(Rd).all() and Rd.norm() <= rank_rtol(R.shape, R.dtype, d.dtype) * d.double().norm():
        raise ValueError(
            f"R @ d is zero (|R @ d| = {Rd.norm().item():.3g}): the target's decoder direction lies entirely outside "
            "the span the rotation maps (C = norm_cols(W) @ norm_rows(W_dec) is rank-deficient, e.g. a reduced-rank "
            "approximator); this target has no rotation vector, use SAE-TS or pinverse"
        )
    s = _unit(Rd.to(d), "R @ d") - lam * approx.correction
    return _unit(s, f"the rotation vector (lam={lam})")


def _stop_layer(model: HookedTransformer, hook_name: str) -> int | None:
    if hook_name not in model.hook_dict:
        raise ValueError(f"hook {hook_name!r} is not a hook of the model (e.g. blocks.0.hook_resid_post)")
    parts = hook_name.split(".")
    return int(parts[1]) + 1 if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def _as_seqs(tokens: TokenSeqs) -> list[Tensor]:
    seqs = [torch.as_tensor(t).long().flatten() for t in tokens]
    if not seqs:
        raise ValueError("no token sequences given")
    return seqs


@torch.no_grad()
def _per_example_acts(
    model: HookedTransformer,
    hook_name: str,
    tokens: TokenSeqs,
    include_first_position: bool,
    batch_size: int,
    max_resid_norm: float | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(acts [b, seq, d_model], mask [b, seq])`` per batch; mask marks the positions to average:
    real (unpadded) tokens, not the first unless ``include_first_position``, and, given
    ``max_resid_norm``, only those whose residual norm at ``hook_name`` is at most it (attention
    sinks left out, as :func:`saets_utils.effects.measure.kept_positions` does for 01's effects)."""
    if max_resid_norm is not None and not max_resid_norm > 0:
        raise ValueError(f"max_resid_norm must be > 0 or None; got {max_resid_norm}")
    seqs = _as_seqs(tokens)
    start = 0 if include_first_position else 1
    for i, s in enumerate(seqs):
        if s.numel() <= start:
            raise ValueError(
                f"token sequence {i} has {s.numel()} tokens and no position to average"
                + ("" if include_first_position else " once the first (start) position is excluded")
            )
    stop = _stop_layer(model, hook_name)
    device = model.cfg.device
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i : i + batch_size]
        lens = torch.tensor([len(s) for s in batch])
        # Right padding: with causal attention a pad token never influences an earlier real
        # position, so no attention mask is needed; padded positions are masked out of the mean.
        toks = torch.zeros(len(batch), int(lens.max()), dtype=torch.long)
        for j, s in enumerate(batch):
            toks[j, : len(s)] = s
        _, cache = model.run_with_cache(toks.to(device), names_filter=hook_name, stop_at_layer=stop)
        pos = torch.arange(toks.shape[1])
        acts = cache[hook_name]
        mask = ((pos[None] < lens[:, None]) & (pos[None] >= start)).to(acts.device)
        if max_resid_norm is not None:
            mask &= acts.float().norm(dim=-1) <= max_resid_norm
        yield acts, mask


def _masked_example_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Per-example mean of ``x [b, seq, d]`` over the masked positions -> ``[b', d]`` (CPU, float64);
    examples with no masked position (all of them over ``max_resid_norm``) are left out."""
    m = mask.to(x.device)
    n = m.sum(1)
    sums = torch.where(m.unsqueeze(-1), x.double(), 0.0).sum(1)
    keep = n > 0
    return (sums[keep] / n[keep].unsqueeze(-1)).cpu()


def _mean_of_examples(means: list[Tensor], max_resid_norm: float | None) -> Tensor:
    m = torch.cat(means)
    if m.shape[0] == 0:
        raise ValueError(
            f"every position of every example has a residual norm above max_resid_norm={max_resid_norm}; nothing to average"
        )
    return m.mean(0).float()


def mean_resid(
    model: HookedTransformer,
    hook_name: str,
    tokens: TokenSeqs,
    *,
    include_first_position: bool,
    batch_size: int = 32,
    max_resid_norm: float | None = None,
) -> Float[Tensor, " d_model"]:
    """Mean residual activation at ``hook_name``: over each example's tokens, then over examples.

    ``tokens``: 1-D token id tensors of any lengths (BOS already added by the caller), or a 2-D
    tensor of equal-length rows. Given ``max_resid_norm``, positions whose residual norm exceeds it
    are left out (and an example left with none is skipped). Returned as float32 on the CPU.
    """
    means = [
        _masked_example_mean(acts, mask)
        for acts, mask in _per_example_acts(
            model, hook_name, tokens, include_first_position, batch_size, max_resid_norm
        )
    ]
    return _mean_of_examples(means, max_resid_norm)


def build_caa_vector(
    model: HookedTransformer,
    hook_name: str,
    pos_tokens: TokenSeqs,
    neg_tokens: TokenSeqs,
    *,
    include_first_position: bool,
    batch_size: int = 32,
) -> Float[Tensor, " d_model"]:
    """CAA: ``mean_resid(positive) - mean_resid(negative)``, unit-normalised."""
    diff = mean_resid(
        model, hook_name, pos_tokens, include_first_position=include_first_position, batch_size=batch_size
    ) - mean_resid(model, hook_name, neg_tokens, include_first_position=include_first_position, batch_size=batch_size)
    return _unit(diff, "the CAA difference of means")


def _sae_codes(sae: SAE, acts: Tensor) -> Tensor:
    p = next(sae.parameters())
    return sae.encode(acts.to(p.device, p.dtype))


def mean_sae_acts(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    tokens: TokenSeqs,
    *,
    include_first_position: bool,
    batch_size: int = 32,
    max_resid_norm: float | None = None,
) -> Float[Tensor, " d_sae"]:
    """Mean SAE activation: over each example's tokens, then over examples (float32, CPU).

    Given ``max_resid_norm`` (the run's ``effects.max_resid_norm``), positions whose residual norm
    at ``hook_name`` exceeds it (attention sinks) are left out, as in 01's effects and baseline.
    """
    means = [
        _masked_example_mean(_sae_codes(sae, acts), mask)
        for acts, mask in _per_example_acts(
            model, hook_name, tokens, include_first_position, batch_size, max_resid_norm
        )
    ]
    return _mean_of_examples(means, max_resid_norm)


def feature_density(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    tokens: TokenSeqs,
    *,
    include_first_position: bool,
    batch_size: int = 32,
    max_resid_norm: float | None = None,
) -> Float[Tensor, " d_sae"]:
    """Fraction of (unpadded) token positions on which each SAE feature is active (> 0); given
    ``max_resid_norm``, of the positions whose residual norm is at most it."""
    active, count = None, 0
    for acts, mask in _per_example_acts(model, hook_name, tokens, include_first_position, batch_size, max_resid_norm):
        codes = _sae_codes(sae, acts)
        on = ((codes > 0) & mask.to(codes.device).unsqueeze(-1)).sum((0, 1)).double().cpu()
        active = on if active is None else active + on
        count += int(mask.sum())
    assert active is not None  # _per_example_acts yields at least one batch or raises
    if count == 0:
        raise ValueError(
            f"every position has a residual norm above max_resid_norm={max_resid_norm}; no position to count"
        )
    return (active / count).float()


def _top_contrast(
    pos_acts: Tensor, neg_acts: Tensor, density: Tensor, density_max: float, k: int, exclude: Sequence[int] = ()
) -> Target:
    if not (pos_acts.shape == neg_acts.shape == density.shape) or pos_acts.ndim != 1:
        raise ValueError(
            f"pos_acts, neg_acts and density must all be [d_sae]; got {tuple(pos_acts.shape)}, {tuple(neg_acts.shape)}, {tuple(density.shape)}"
        )
    if k < 1:
        raise ValueError(f"top-k must be >= 1; got {k}")
    if not 0 < density_max <= 1:
        raise ValueError(f"density_max must be in (0, 1]; got {density_max}")
    d_sae = pos_acts.shape[0]
    bad = [f for f in exclude if not 0 <= int(f) < d_sae]
    if bad:
        raise ValueError(f"excluded (BOS) feature ids {bad} are out of range for d_sae={d_sae}")
    diff = pos_acts.double().cpu() - neg_acts.double().cpu()
    if not torch.isfinite(diff).all():
        raise ValueError("pos_acts / neg_acts contain non-finite values")
    keep = density.cpu() <= density_max
    keep[list(map(int, exclude))] = False
    diff = torch.where(keep, diff, torch.zeros_like(diff))
    vals, ids = diff.topk(min(k, d_sae))
    pos = vals > 0
    if not pos.any():
        raise ValueError(
            "no feature is more active on the positive examples once dense and excluded features are dropped"
        )
    vals, ids = vals[pos], ids[pos]
    vals = vals / vals.sum()
    return [(int(i), float(v)) for i, v in zip(ids, vals)]


def build_fgaa_target(
    pos_acts: Float[Tensor, " d_sae"],
    neg_acts: Float[Tensor, " d_sae"],
    density: Float[Tensor, " d_sae"],
    *,
    density_max: float,
    bos_features: Sequence[int],
    top_k: int,
) -> Target:
    """FGAA target: ``pos - neg`` mean SAE activations, dense (> density_max) and BOS-only features
    dropped, the top-k positive entries kept and L1-normalised (largest first)."""
    return _top_contrast(pos_acts, neg_acts, density, density_max, top_k, exclude=bos_features)


def build_fgaa_vector(approx: EffectApproximator, targets: Target, lam: float = 1.0) -> Float[Tensor, " d_model"]:
    """FGAA: the SAE-TS formula applied to the FGAA target."""
    return build_sae_ts_vector(approx, targets, lam)


def discover_target_features(
    pos_acts: Float[Tensor, " d_sae"],
    neg_acts: Float[Tensor, " d_sae"],
    density: Float[Tensor, " d_sae"],
    *,
    density_max: float,
    k: int,
) -> Target:
    """Target features for an SAE with no published ids: the top-k features of the positive minus
    negative contrast, dense features dropped, weights L1-normalised (largest first)."""
    return _top_contrast(pos_acts, neg_acts, density, density_max, k)
