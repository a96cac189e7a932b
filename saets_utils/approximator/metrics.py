"""Held-out quality of the effect approximator: MSE against baselines, R^2 with a bootstrap
interval, the noise ceiling and the split-half reliability of measured effects, cosine and
decoder-row top-1 (fit metrics the paper does not report).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from saets_utils.approximator.model import EffectApproximator


def _per_vector_sq(A: Tensor, B: Tensor, feats: Tensor | None = None, chunk: int = 1024) -> Tensor:
    """``[n]`` float64: ``sum_f (A - B)^2`` per row (over the features ``feats`` if given); rows in chunks."""
    B = B.expand_as(A) if B.ndim == 1 else B
    out = []
    for i in range(0, A.shape[0], chunk):
        a, b = A[i : i + chunk].double(), B[i : i + chunk].to(A.device, torch.float64)
        d = (a - b) if feats is None else (a - b)[:, feats]
        out.append((d * d).sum(1))
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def _percentile_interval(
    stat: Callable[[Tensor], Tensor], n: int, n_boot: int, *, seed: int, level: float
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(idx)``, ``idx [b, n]`` a batch of resamples of ``n``
    units (values ``[b]``). Resamples are drawn in batches of at most ~4M indices; a given ``seed``
    and ``n`` draws the same resamples for every statistic, so intervals of statistics of the same
    units are paired. NaN, NaN when no resample gives a finite value."""
    g = torch.Generator().manual_seed(seed)
    per = max(1, 4_000_000 // n)  # resamples per batch
    v = torch.cat([stat(torch.randint(n, (min(per, n_boot - i), n), generator=g)) for i in range(0, n_boot, per)])
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = torch.quantile(v, torch.tensor([a, 1 - a], dtype=v.dtype)).tolist()
    return lo, hi


def bootstrap_one_minus_ratio(
    num: Float[Tensor, " n"], den: Float[Tensor, " n"], n_boot: int, *, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float] | tuple[float, None, None]:
    """``1 - sum(num) / sum(den)`` and its percentile bootstrap interval over the ``n`` units.

    Each resample draws ``n`` units with replacement and recomputes the ratio of sums (numerator and
    denominator from the same units: paired). ``n_boot = 0`` gives no interval (None, None).
    """
    num, den = num.double().cpu().flatten(), den.double().cpu().flatten()
    if num.shape != den.shape or num.numel() == 0:
        raise ValueError(f"need num and den of the same length >= 1; got {tuple(num.shape)}, {tuple(den.shape)}")
    tot = den.sum()
    point = float(1 - num.sum() / tot) if tot > 0 else float("nan")
    if n_boot <= 0:
        return point, None, None
    lo, hi = _percentile_interval(
        lambda idx: 1 - num[idx].sum(1) / den[idx].sum(1), num.numel(), n_boot, seed=seed, level=level
    )
    return point, lo, hi


def heldout_r2(
    P: Float[Tensor, "n d_sae"],
    Y: Float[Tensor, "n d_sae"],
    mu: Float[Tensor, " d_sae"],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    features: Tensor | None = None,
) -> dict[str, Any]:
    """Held-out ``R^2 = 1 - sum SSE / sum SST`` (sums over vectors and features; SST about the train
    mean ``mu``) of predictions ``P`` for measured effects ``Y``, with a 95% percentile bootstrap CI
    over held-out vectors (``r2_ci_low``/``r2_ci_high``; None when ``n_boot = 0``).

    ``features`` (bool [d_sae] or indices) restricts the sums to those features.
    """
    if P.shape != Y.shape or P.ndim != 2 or mu.shape != (Y.shape[1],):
        raise ValueError(
            f"need P, Y [n, d_sae] and mu [d_sae]; got {tuple(P.shape)}, {tuple(Y.shape)}, {tuple(mu.shape)}"
        )
    f = None if features is None else torch.as_tensor(features).to(Y.device)
    sse = _per_vector_sq(P, Y, f)
    sst = _per_vector_sq(Y, mu.to(Y.device), f)
    r2, lo, hi = bootstrap_one_minus_ratio(sse, sst, n_boot, seed=seed)
    return {"r2": r2, "r2_ci_low": lo, "r2_ci_high": hi, "n_boot": int(n_boot)}


def noise_ceiling(
    Y_halves: Float[Tensor, "n 2 d_sae"],
    mu: Float[Tensor, " d_sae"],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    features: Tensor | None = None,
) -> dict[str, Any]:
    """The best held-out R^2 any predictor can reach on the full effects ``Y = (Y1 + Y2) / 2``, given
    their measurement noise: ``1 - mean ||D_i - mean_j D_j||^2 n / (n - 1) / 4 / mean ||Y - mu||^2``
    with ``D = Y1 - Y2``.

    That is the noise variance of the mean of two independent halves (summed over features), which
    even the true map cannot predict. ``D`` is centred over vectors because noise shared by every
    vector (the baseline's, and with common random numbers the rollouts' own) is the same for the
    training vectors too, so it sits in the bias and costs a predictor nothing. With a paired 95%
    percentile bootstrap CI over vectors (``noise_ceiling_ci_low``/``_high``); ``features`` as in
    :func:`heldout_r2`.
    """
    if Y_halves.ndim != 3 or Y_halves.shape[1] != 2 or mu.shape != (Y_halves.shape[2],):
        raise ValueError(f"need Y_halves [n, 2, d_sae] and mu [d_sae]; got {tuple(Y_halves.shape)}, {tuple(mu.shape)}")
    f = None if features is None else torch.as_tensor(features).to(Y_halves.device)
    Y1, Y2 = Y_halves[:, 0], Y_halves[:, 1]
    D = Y1.double() - Y2.double()
    n = D.shape[0]
    noise = _per_vector_sq(D, D.mean(0), f) / 4 * (n / max(n - 1, 1))
    sst = torch.cat(
        [
            _per_vector_sq((Y1[i : i + 1024].double() + Y2[i : i + 1024].double()) / 2, mu, f)
            for i in range(0, Y1.shape[0], 1024)
        ]
    )
    c, lo, hi = bootstrap_one_minus_ratio(noise, sst, n_boot, seed=seed)
    return {"noise_ceiling": c, "noise_ceiling_ci_low": lo, "noise_ceiling_ci_high": hi}


def r2_over_ceiling(
    P: Float[Tensor, "n d_sae"],
    Y_halves: Float[Tensor, "n 2 d_sae"],
    mu: Float[Tensor, " d_sae"],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    features: Tensor | None = None,
) -> tuple[float, float | None, float | None]:
    """Held-out R^2 of predictions ``P`` for ``Y = (Y1 + Y2) / 2`` as a fraction of the noise ceiling
    (:func:`heldout_r2` / :func:`noise_ceiling`, SST about ``mu``), with a percentile bootstrap
    interval that draws the same held-out vectors for both (paired: the two share their SST, so
    the ratio's interval is narrower than the two intervals side by side). ``n_boot = 0``: no interval."""
    f = None if features is None else torch.as_tensor(features).to(Y_halves.device)
    Y1, Y2 = Y_halves[:, 0].double(), Y_halves[:, 1].double()
    Y = (Y1 + Y2) / 2
    n = Y.shape[0]
    D = Y1 - Y2
    sse = _per_vector_sq(P.double(), Y, f)
    sst = _per_vector_sq(Y, mu, f)
    noise = _per_vector_sq(D, D.mean(0), f) / 4 * (n / max(n - 1, 1))

    def ratio(idx: Tensor | slice) -> Tensor:
        t = sst[idx].sum(-1)
        return (1 - sse[idx].sum(-1) / t) / (1 - noise[idx].sum(-1) / t)

    point = float(ratio(slice(None)))
    if n_boot <= 0:
        return point, None, None
    # the resamples heldout_r2 and noise_ceiling draw with the same seed: the three intervals are paired
    lo, hi = _percentile_interval(ratio, n, n_boot, seed=seed, level=level)
    return point, lo, hi


def split_half_reliability(Y_halves: Float[Tensor, "n 2 d_sae"]) -> Float[Tensor, " d_sae"]:
    """Per feature: the correlation across vectors of the two half-measurements, Spearman-Brown
    corrected to the full (two-half) effect, ``2 r / (1 + r)``; float64, NaN where a half never varies.

    Positive where the feature carries vector-specific signal beyond noise; ~0 (either sign) for
    features that only move by noise.
    """
    if Y_halves.ndim != 3 or Y_halves.shape[1] != 2 or Y_halves.shape[0] < 2:
        raise ValueError(f"need Y_halves [n >= 2, 2, d_sae]; got {tuple(Y_halves.shape)}")
    d = Y_halves.shape[2]
    out = torch.empty(d, dtype=torch.float64)
    for c in range(0, d, 4096):
        h = Y_halves[:, :, c : c + 4096].double()
        h = h - h.mean(0)
        a, b = h[:, 0], h[:, 1]
        den = ((a * a).sum(0) * (b * b).sum(0)).sqrt()
        r = torch.where(den > 0, (a * b).sum(0) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))
        out[c : c + 4096] = (2 * r / (1 + r)).cpu()
    return out


def _median(x: Tensor) -> float:
    # torch.median returns the lower middle value; use the usual midpoint.
    return float(x.double().quantile(0.5)) if x.numel() else float("nan")


@dataclass
class ApproximatorMetrics:
    """Held-out fit quality of an effect approximator (:func:`approximator_metrics`). Values are plain
    JSON-serialisable numbers (None where not measured); :meth:`as_dict` is the form 02 writes into
    ``approximator_metrics.json`` (keys in this order)."""

    n_val: int
    mse: float
    mse_zero: float  # of predicting zero
    mse_mean: float  # of predicting the train mean effect
    r2: float
    r2_ci_low: float | None
    r2_ci_high: float | None
    n_boot: int
    beats_mean_baseline: bool
    noise_ceiling: float | None
    noise_ceiling_ci_low: float | None
    noise_ceiling_ci_high: float | None
    r2_reliable: float | None
    r2_reliable_ci_low: float | None
    r2_reliable_ci_high: float | None
    noise_ceiling_reliable: float | None
    n_features_reliable: int | None
    # R^2 as a fraction of the noise ceiling, paired bootstrap CI (None without halves)
    r2_over_ceiling: float | None
    r2_over_ceiling_ci_low: float | None
    r2_over_ceiling_ci_high: float | None
    r2_reliable_over_ceiling: float | None
    r2_reliable_over_ceiling_ci_low: float | None
    r2_reliable_over_ceiling_ci_high: float | None
    per_feature_r2_median: float
    per_feature_r2_frac_positive: float
    n_features_varying: int
    cosine_mean: float
    cosine_median: float
    cosine_mean_baseline: float
    centered_cosine_mean: float
    decoder_top1_predicted: float | None
    decoder_top1_measured: float | None
    n_decoder_rows: int
    per_feature_r2: list[float | None]  # one per feature, None where it never varies
    per_vector: list[dict[str, Any]] | None = None  # id, mse, cosine of each held-out vector (with val_ids)

    def as_dict(self) -> dict[str, Any]:
        """Every field by name, in declaration order; ``per_vector`` only when measured."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.per_vector is None:
            del out["per_vector"]
        return out


@torch.no_grad()
def approximator_metrics(
    approx: EffectApproximator,
    X_val: Float[Tensor, "n d_model"],
    Y_val: Float[Tensor, "n d_sae"],
    Y_train_mean: Float[Tensor, " d_sae"],
    *,
    val_ids: Int[Tensor, " n"] | None = None,
    decoder_feature_ids: Int[Tensor, " n"] | None = None,
    Y_val_halves: Float[Tensor, "n 2 d_sae"] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    reliable_features: Tensor | None = None,
) -> ApproximatorMetrics:
    """Held-out fit quality (:class:`ApproximatorMetrics`).

    MSE of the approximator, of predicting zero and of predicting the train mean effect; R^2 against
    the train-mean baseline (overall with a 95% bootstrap CI over held-out vectors, ``r2_ci_low`` /
    ``r2_ci_high``, and per feature as ``per_feature_r2``, None where the feature never varies);
    ``beats_mean_baseline`` is True only when the CI's lower bound is above 0 (without intervals,
    ``n_boot = 0``: when the MSE is lower). Cosine of predicted vs measured effect (raw and with the
    train mean removed). With ``decoder_feature_ids`` (the feature whose decoder row each vector is,
    -1 for other vectors): the fraction whose predicted / measured effect has its own feature as the
    top feature. ``val_ids`` adds a ``per_vector`` table (id, mse, cosine).

    ``Y_val_halves`` (the two half-measurements of each held-out effect) adds the ``noise_ceiling``
    (best reachable R^2, with CI); ``reliable_features`` (bool [d_sae], e.g. positive split-half
    reliability on the *training* vectors) adds ``r2_reliable`` (with CI) and, with halves,
    ``noise_ceiling_reliable``: the same quantities over those features only.
    """
    if X_val.ndim != 2 or Y_val.shape != (X_val.shape[0], approx.d_sae) or X_val.shape[0] == 0:
        raise ValueError(
            f"need X_val [n, d_model] and Y_val [n, d_sae={approx.d_sae}] with n >= 1; got {tuple(X_val.shape)}, {tuple(Y_val.shape)}"
        )
    dev = approx.W.device
    Y = Y_val.to(dev, torch.float64)
    P = approx.predict(X_val.to(dev)).double()
    mu = Y_train_mean.to(dev, torch.float64).expand_as(Y)
    mse = ((P - Y) ** 2).mean().item()
    mse_zero = (Y**2).mean().item()
    mse_mean = ((mu - Y) ** 2).mean().item()
    sse_f = ((P - Y) ** 2).sum(0)
    sst_f = ((mu - Y) ** 2).sum(0)
    has_var = sst_f > 0
    r2_f = torch.where(has_var, 1 - sse_f / sst_f.clamp_min(1e-300), torch.full_like(sst_f, float("nan")))
    r2_defined = r2_f[has_var]
    cos = F.cosine_similarity(P, Y, dim=1)
    mu1 = Y_train_mean.to(dev, torch.float64)
    r2 = heldout_r2(P, Y, mu1, n_boot=n_boot, seed=seed)
    beats = r2["r2_ci_low"] > 0 if r2["r2_ci_low"] is not None else mse < mse_mean
    out: dict[str, Any] = {
        "n_val": int(Y.shape[0]),
        "mse": mse,
        "mse_zero": mse_zero,
        "mse_mean": mse_mean,
        "r2": 1 - mse / mse_mean if mse_mean > 0 else float("nan"),
        "r2_ci_low": r2["r2_ci_low"],
        "r2_ci_high": r2["r2_ci_high"],
        "n_boot": int(n_boot),
        "beats_mean_baseline": bool(beats),
        "noise_ceiling": None,
        "noise_ceiling_ci_low": None,
        "noise_ceiling_ci_high": None,
        "r2_reliable": None,
        "r2_reliable_ci_low": None,
        "r2_reliable_ci_high": None,
        "noise_ceiling_reliable": None,
        "n_features_reliable": None,
        "r2_over_ceiling": None,
        "r2_over_ceiling_ci_low": None,
        "r2_over_ceiling_ci_high": None,
        "r2_reliable_over_ceiling": None,
        "r2_reliable_over_ceiling_ci_low": None,
        "r2_reliable_over_ceiling_ci_high": None,
        "per_feature_r2_median": _median(r2_defined),
        "per_feature_r2_frac_positive": float((r2_defined > 0).double().mean()) if r2_defined.numel() else float("nan"),
        "n_features_varying": int(has_var.sum()),
        "cosine_mean": float(cos.mean()),
        "cosine_median": _median(cos),
        "cosine_mean_baseline": float(F.cosine_similarity(mu, Y, dim=1).mean()),
        "centered_cosine_mean": float(F.cosine_similarity(P - mu, Y - mu, dim=1).mean()),
        "decoder_top1_predicted": None,
        "decoder_top1_measured": None,
        "n_decoder_rows": 0,
    }
    if decoder_feature_ids is not None:
        fid = torch.as_tensor(decoder_feature_ids).long().to(dev).flatten()
        if fid.numel() != Y.shape[0]:
            raise ValueError(f"decoder_feature_ids has {fid.numel()} entries for {Y.shape[0]} validation vectors")
        is_row = fid >= 0
        if (fid >= approx.d_sae).any():
            raise ValueError(
                f"decoder_feature_ids must be < d_sae={approx.d_sae} (or -1 for vectors that are not decoder rows)"
            )
        if is_row.any():
            out["decoder_top1_predicted"] = float((P[is_row].argmax(1) == fid[is_row]).double().mean())
            out["decoder_top1_measured"] = float((Y[is_row].argmax(1) == fid[is_row]).double().mean())
        out["n_decoder_rows"] = int(is_row.sum())
    if Y_val_halves is not None:
        if Y_val_halves.shape != (Y.shape[0], 2, approx.d_sae):
            raise ValueError(
                f"Y_val_halves must be [n_val, 2, d_sae] = [{Y.shape[0]}, 2, {approx.d_sae}]; got {tuple(Y_val_halves.shape)}"
            )
        out.update(noise_ceiling(Y_val_halves.to(dev), mu1, n_boot=n_boot, seed=seed))
        frac, lo, hi = r2_over_ceiling(P, Y_val_halves.to(dev), mu1, n_boot=n_boot, seed=seed)
        out.update({"r2_over_ceiling": frac, "r2_over_ceiling_ci_low": lo, "r2_over_ceiling_ci_high": hi})
    if reliable_features is not None:
        rel = torch.as_tensor(reliable_features).to(dev).bool().flatten()
        if rel.numel() != approx.d_sae:
            raise ValueError(
                f"reliable_features must be a bool mask over d_sae={approx.d_sae} features; got {rel.numel()} entries"
            )
        out["n_features_reliable"] = int(rel.sum())
        if rel.any():
            r = heldout_r2(P, Y, mu1, n_boot=n_boot, seed=seed, features=rel)
            out.update(
                {"r2_reliable": r["r2"], "r2_reliable_ci_low": r["r2_ci_low"], "r2_reliable_ci_high": r["r2_ci_high"]}
            )
            if Y_val_halves is not None:
                out["noise_ceiling_reliable"] = noise_ceiling(Y_val_halves.to(dev), mu1, n_boot=0, features=rel)[
                    "noise_ceiling"
                ]
                frac, lo, hi = r2_over_ceiling(P, Y_val_halves.to(dev), mu1, n_boot=n_boot, seed=seed, features=rel)
                out.update(
                    {
                        "r2_reliable_over_ceiling": frac,
                        "r2_reliable_over_ceiling_ci_low": lo,
                        "r2_reliable_over_ceiling_ci_high": hi,
                    }
                )
    out["per_feature_r2"] = [None if math.isnan(v) else v for v in r2_f.tolist()]
    if val_ids is not None:
        ids = torch.as_tensor(val_ids).flatten().tolist()
        if len(ids) != Y.shape[0]:
            raise ValueError(f"val_ids has {len(ids)} entries for {Y.shape[0]} validation vectors")
        mse_v = ((P - Y) ** 2).mean(1).tolist()
        out["per_vector"] = [{"id": int(i), "mse": m, "cosine": c} for i, m, c in zip(ids, mse_v, cos.tolist())]
    return ApproximatorMetrics(**out)
