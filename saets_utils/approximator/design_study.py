"""Design study over measured effects: how reliable they are, and how held-out approximator quality
grows with the number of measured vectors, for each fit, against the noise ceiling.

Reads only 01's files (``effects.safetensors`` with ``effect_halves``: each vector measured on two
independent halves of its rollouts), so it costs no model time. Writes to ``results/<run>/study/``:
``reliability.json``, ``learning_curve.csv`` and ``extrapolation.csv`` (the training vectors each fit
would need to reach half the noise ceiling, from a saturating curve through its points). Rerun with
``python -m saets_utils.approximator.design_study params/<run>.yaml``; compare designs measured in several runs with
``--compare params/study/pilot_crn16.yaml params/study/pilot_indep16.yaml`` (reliability per second of effects compute). The figure
``study/learning_curve.png`` is drawn by the report layer: notebook 04, or
``python -m saets_utils.report.study`` (this study, same arguments, then the figure).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from saets_utils.approximator.fitting import fit_approximator
from saets_utils.approximator.metrics import heldout_r2, noise_ceiling, split_half_reliability
from saets_utils.approximator.model import split_holdout
from saets_utils.config import ApproximatorConfig, RunConfig, load_config
from saets_utils.effects.store import Effects, load_effects
from saets_utils.io_utils import atomic_write_json, atomic_write_text

DEFAULT_FITS = ("ridge", "ridge_per_feature", "reduced_rank", "decoder_prior")


def _centred(Y: Tensor) -> Tensor:
    return Y - Y.mean(0, keepdim=True)


def reliability_summary(halves: Tensor) -> dict[str, Any]:
    """Agreement of the two half-measurements ``halves [n, 2, d_sae]`` of the same vectors.

    Both halves are centred on their mean over vectors first, so the part every vector shares (the
    approximator's bias) does not count as agreement: what remains is the vector-specific signal.
    ``centred_r`` is the correlation of the centred halves over all (vector, feature) cells and
    ``reliability`` its Spearman-Brown value for the mean of both halves (the full effect).
    """
    if halves.ndim != 3 or halves.shape[1] != 2:
        raise ValueError(f"halves must be [n, 2, d_sae]; got {tuple(halves.shape)}")
    h = halves.double()
    a, b = _centred(h[:, 0]), _centred(h[:, 1])
    r = float((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt())
    sb = split_half_reliability(halves)  # per feature, Spearman-Brown corrected
    sb = sb[torch.isfinite(sb)]
    per_feature = sb / (2 - sb)  # back to the plain correlation of the two halves
    raw_cos = torch.nn.functional.cosine_similarity(h[:, 0], h[:, 1], dim=1)
    cen_cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    share = float((h.mean(1).mean(0) ** 2).sum() / (h.mean(1) ** 2).sum(1).mean())
    return {
        "n_vectors": int(h.shape[0]),
        "centred_r": r,
        "reliability": 2 * r / (1 + r) if r > -1 else float("nan"),
        "raw_cosine_median": float(raw_cos.median()),
        "centred_cosine_median": float(cen_cos.median()),
        "per_feature_r_median": float(per_feature.median()) if per_feature.numel() else float("nan"),
        "features_r_above_0.5": int((per_feature > 0.5).sum()),
        "features_r_above_0.2": int((per_feature > 0.2).sum()),
        "shared_fraction": share,  # squared norm of the mean effect / mean squared norm of an effect
    }


def ceiling_by_tokens(
    halves: Tensor, multipliers: Sequence[float] = (0.5, 1.0, 2.0, 4.0), n_boot: int = 200, seed: int = 0
) -> pd.DataFrame:
    """Noise ceiling of the same design at ``k`` times the rollout tokens per vector.

    From the two halves ``[n, 2, d_sae]``: noise of the full effect ``N = mean ||D - mean D||^2 / 4``
    (``D`` = half 1 - half 2, as :func:`metrics.noise_ceiling`), total variance ``T`` of the full effects
    about their mean, signal ``S = T - N``. Independent rollouts divide the noise by ``k``, so the
    ceiling is ``S / (S + N / k)``: ``k = 1`` is the measured design, ``k = 0.5`` one half alone (also
    measured), larger ``k`` a projection (Spearman-Brown). 95% percentile bootstrap CIs over vectors.
    """
    if halves.ndim != 3 or halves.shape[1] != 2 or halves.shape[0] < 3:
        raise ValueError(f"halves must be [n >= 3, 2, d_sae]; got {tuple(halves.shape)}")
    H = halves.double()
    n = H.shape[0]
    Y = H.mean(1)
    D = H[:, 0] - H[:, 1]
    noise_v = ((D - D.mean(0)) ** 2).sum(1) / 4 * n / (n - 1)  # per vector
    total_v = ((Y - Y.mean(0)) ** 2).sum(1) * n / (n - 1)
    ks = torch.tensor([float(k) for k in multipliers], dtype=torch.float64)

    def ceilings(idx: Tensor) -> Tensor:
        N, T = noise_v[idx].mean(), total_v[idx].mean()
        S = (T - N).clamp_min(0)
        return S / (S + N / ks)

    point = ceilings(torch.arange(n))
    g = torch.Generator().manual_seed(seed)
    boot = torch.stack([ceilings(torch.randint(0, n, (n,), generator=g)) for _ in range(n_boot)]) if n_boot else None
    rows = []
    for j, k in enumerate(ks.tolist()):
        rows.append(
            {
                "token_multiplier": k,
                "noise_ceiling": float(point[j]),
                "ci_low": float(boot[:, j].quantile(0.025)) if boot is not None else None,
                "ci_high": float(boot[:, j].quantile(0.975)) if boot is not None else None,
                "measured": k in (0.5, 1.0),
                "n_vectors": n,
            }
        )
    return pd.DataFrame(rows)


def learning_curve(
    effects: Effects,
    sizes: Sequence[int],
    *,
    fits: Sequence[str] = DEFAULT_FITS,
    holdout: int = 256,
    seed: int = 0,
    n_boot: int = 1000,
    base: ApproximatorConfig | None = None,
    W_dec: Tensor | None = None,
) -> pd.DataFrame:
    """Held-out R² (with bootstrap CI over held-out vectors) of each fit on nested training subsets,
    over all features and (``r2_reliable``) over the features whose split-half reliability on the
    training pool is positive. ``W_dec [d_sae, d_model]``: the SAE's decoder, for ``decoder_prior``.

    One seeded held-out set of ``holdout`` vectors; training subsets are prefixes of one seeded
    permutation of the rest, so a larger size contains every smaller one. Rows with ``target =
    "half"`` train on one half of each vector's rollouts only (half the compute per vector): at equal
    compute, ``n`` vectors measured fully compare with ``2n`` vectors measured on half their
    rollouts. The held-out targets are always the full effects. A last row per size-free ``fit =
    "noise_ceiling"`` gives the best R² any predictor can reach on these held-out measurements.
    """
    ok = effects.valid
    X, Y, ids = effects.vectors[ok].float(), effects.effects[ok].float(), effects.vector_ids[ok]
    H = effects.halves[ok].float() if effects.halves is not None else None
    train, val = split_holdout(ids, holdout, seed)
    pool = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))]
    Xv, Yv = X[val], Y[val]
    spp = int(effects.meta.get("effects", {}).get("samples_per_prompt", 2))
    n_prompts = len(effects.meta.get("effects", {}).get("prompts", [])) or 1
    base = base or ApproximatorConfig()
    rows: list[dict[str, Any]] = []
    halves_ok = H is not None and bool(torch.isfinite(H).all())
    targets = ["full"] + (["half"] if halves_ok else [])
    reliable = None
    if H is not None and halves_ok:
        reliable = torch.nan_to_num(split_half_reliability(H[train]), nan=0.0) > 0
    for n in sorted({int(s) for s in sizes}):
        if n > len(pool) or n < 4:
            continue
        idx = pool[:n]
        for target in targets:
            if target == "full":
                Yt = Y[idx]
            else:
                assert H is not None  # "half" is a target only with halves
                Yt = H[idx, 0]
            rollouts = n * n_prompts * (spp if target == "full" else spp // 2)
            for fit in fits:
                cfg = base.model_copy(update={"fit": fit})
                approx, info = fit_approximator(X[idx], Yt, cfg, seed=seed, W_dec=W_dec)
                P = approx.predict(Xv).double()
                stats = heldout_r2(P, Yv.double(), Yt.double().mean(0), n_boot=n_boot, seed=seed)
                rel = (
                    heldout_r2(P, Yv.double(), Yt.double().mean(0), n_boot=n_boot, seed=seed, features=reliable)
                    if reliable is not None
                    else {"r2": None, "r2_ci_low": None, "r2_ci_high": None}
                )
                rows.append(
                    {
                        "n_train": n,
                        "target": target,
                        "fit": fit,
                        "rollouts": rollouts,
                        "r2": stats["r2"],
                        "r2_ci_low": stats["r2_ci_low"],
                        "r2_ci_high": stats["r2_ci_high"],
                        "r2_reliable": rel["r2"],
                        "r2_reliable_ci_low": rel["r2_ci_low"],
                        "r2_reliable_ci_high": rel["r2_ci_high"],
                        "n_val": len(val),
                        **{k: v for k, v in info.as_dict().items() if isinstance(v, (int, float, str))},
                    }
                )
    if H is not None and torch.isfinite(H[val]).all():
        c = noise_ceiling(H[val].double(), Y[train].double().mean(0), n_boot=n_boot, seed=seed)
        c_rel = (
            noise_ceiling(H[val].double(), Y[train].double().mean(0), n_boot=n_boot, seed=seed, features=reliable)
            if reliable is not None
            else {"noise_ceiling": None, "noise_ceiling_ci_low": None, "noise_ceiling_ci_high": None}
        )
        rows.append(
            {
                "n_train": None,
                "target": "full",
                "fit": "noise_ceiling",
                "rollouts": None,
                "r2": c["noise_ceiling"],
                "r2_ci_low": c["noise_ceiling_ci_low"],
                "r2_ci_high": c["noise_ceiling_ci_high"],
                "r2_reliable": c_rel["noise_ceiling"],
                "r2_reliable_ci_low": c_rel["noise_ceiling_ci_low"],
                "r2_reliable_ci_high": c_rel["noise_ceiling_ci_high"],
                "n_features_reliable": int(reliable.sum()) if reliable is not None else None,
                "n_val": len(val),
            }
        )
    return pd.DataFrame(rows)


def run_study(
    run: RunConfig,
    *,
    sizes: Sequence[int] | None = None,
    fits: Sequence[str] = DEFAULT_FITS,
    holdout: int | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Reliability and learning curve of ``run``'s measured effects, written to ``study/``."""
    eff = load_effects(run.results_dir)
    if eff.halves is None:
        raise ValueError(f"{run.results_dir} has no effect halves; re-run 01 with samples_per_prompt >= 2")
    out = run.paths
    ok = eff.valid
    holdout = holdout or run.approximator.holdout
    n_pool = int(ok.sum()) - holdout
    sizes = sizes or [s for s in (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384) if s < n_pool] + [n_pool]
    rel = reliability_summary(eff.halves[ok])
    rel["seconds_per_vector"] = eff.meta.get("seconds_per_vector_mean")
    W_dec = None
    if "decoder_prior" in fits:
        from saets_utils.models.sae_loading import load_sae

        W_dec = load_sae(run, "cpu").W_dec.detach().float()
    curve = learning_curve(
        eff, sizes, fits=fits, holdout=holdout, seed=run.seed, n_boot=n_boot, base=run.approximator, W_dec=W_dec
    )
    out.study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.reliability, rel)
    atomic_write_text(out.learning_curve, curve.to_csv(index=False))
    ext = curve_extrapolation(curve, rel.get("seconds_per_vector"))
    if ext is not None:
        atomic_write_text(out.extrapolation, ext.to_csv(index=False))
    return {"reliability": rel, "curve": curve, "extrapolation": ext}


def curve_extrapolation(curve: pd.DataFrame, seconds_per_vector: float | None = None) -> pd.DataFrame | None:
    """:func:`~saets_utils.approximator.extrapolation.extrapolate` of a learning curve toward half its
    noise ceiling (None without a ceiling row): how many training vectors each fit would need."""
    from saets_utils.approximator.extrapolation import extrapolate

    ceil = curve.loc[curve["fit"] == "noise_ceiling", "r2"]
    if ceil.empty or not math.isfinite(float(ceil.iloc[0])):
        return None
    return extrapolate(curve, 0.5 * float(ceil.iloc[0]), seconds_per_vector=seconds_per_vector)


def compare_designs(runs: Sequence[RunConfig], max_id: int | None = None) -> pd.DataFrame:
    """One row per run: its effects settings, split-half reliability and cost per vector, so sampling
    designs can be compared per unit of compute; ``max_id`` keeps vector ids below it only (the same
    vectors in every run)."""
    rows = []
    for run in runs:
        eff = load_effects(run.results_dir)
        if eff.halves is None:
            continue
        e = run.effects
        keep = eff.valid if max_id is None else eff.valid & (eff.vector_ids < max_id)
        rel = reliability_summary(eff.halves[keep])
        sec = eff.meta.get("seconds_per_vector_mean") or math.nan
        rows.append(
            {
                "run": run.name,
                "crn": e.common_random_numbers,
                "prompts": len(e.prompts),
                "samples_per_prompt": e.samples_per_prompt,
                "total_tokens": e.total_tokens,
                "loss_target": f"{e.loss_target.kind}:{e.loss_target.value}",
                "top_p": e.sampling.top_p,
                "max_resid_norm": e.max_resid_norm,
                "rollout_tokens_per_vector": len(e.prompts) * e.samples_per_prompt * e.total_tokens,
                "seconds_per_vector": sec,
                **rel,
            }
        )
    return pd.DataFrame(rows)


def design_table(
    runs: Sequence[RunConfig], max_id: int | None = None, multipliers: Sequence[float] = (0.5, 1.0, 2.0, 4.0)
) -> pd.DataFrame:
    """Noise ceiling per design and token budget: for each run, :func:`ceiling_by_tokens` of its halves
    (``max_id``: vector ids below it only), with the rollout tokens per vector each row stands for."""
    rows = []
    for run in runs:
        eff = load_effects(run.results_dir)
        if eff.halves is None:
            continue
        keep = eff.valid if max_id is None else eff.valid & (eff.vector_ids < max_id)
        e = run.effects
        tokens = len(e.prompts) * e.samples_per_prompt * e.total_tokens
        for row in ceiling_by_tokens(eff.halves[keep], multipliers).to_dict("records"):
            rows.append(
                {
                    "run": run.name,
                    "loss_target": f"{e.loss_target.kind}:{e.loss_target.value}",
                    "measured_tokens_per_vector": tokens,
                    "tokens_per_vector": int(tokens * row["token_multiplier"]),
                    "seconds_per_vector_measured": eff.meta.get("seconds_per_vector_mean"),
                    **row,
                }
            )
    return pd.DataFrame(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of :func:`main` (also read by ``saets_utils.report.study``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params", nargs="+", help="params file(s) of runs whose 01 has finished")
    ap.add_argument("--compare", action="store_true", help="compare the runs' designs instead of a learning curve")
    ap.add_argument("--sizes", default=None, help="comma-separated training sizes")
    ap.add_argument("--fits", default=",".join(DEFAULT_FITS))
    ap.add_argument("--holdout", type=int, default=None)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument(
        "--out", default=None, help="with --compare: CSV to write (and <name>_ceilings.csv: ceiling per token budget)"
    )
    ap.add_argument("--max-id", type=int, default=None, help="with --compare: only vector ids below this")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    runs = [load_config(p) for p in a.params]
    if a.compare:
        df = compare_designs(runs, a.max_id)
        print(df.to_string(index=False))
        ceil = design_table(runs, a.max_id)
        print(ceil.to_string(index=False))
        if a.out:
            atomic_write_text(Path(a.out), df.to_csv(index=False))
            atomic_write_text(Path(a.out).with_name(Path(a.out).stem + "_ceilings.csv"), ceil.to_csv(index=False))
        return
    for run in runs:
        sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else None
        res = run_study(run, sizes=sizes, fits=a.fits.split(","), holdout=a.holdout, n_boot=a.bootstrap)
        print(json.dumps(res["reliability"], indent=1))
        print(res["curve"].to_string(index=False))


if __name__ == "__main__":
    main()
