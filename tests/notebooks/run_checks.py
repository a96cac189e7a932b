"""Behaviour checks on a finished run's files, shared by the notebook tests (params/test.yaml) and the
reference-shaped run (params/gemma-ci.yaml): each steering vector 03 saved follows its method's
formula given the approximator 02 saved and the targets 03 recorded, and 02's metrics are what its
saved approximator gives on its held-out vectors.

The formulas are written out here again in float64 (not imported from
``saets_utils.evaluation.methods``), so a builder whose formula breaks disagrees with them.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from torch import Tensor

from saets_utils.config import RunConfig
from saets_utils.registry import REGISTRY

ATOL = 1e-5  # saved vectors are float32 unit vectors


def unit(v: Tensor) -> Tensor:
    return v / v.norm()


def dense(pairs: list[list[float]], d_sae: int) -> Tensor:
    """Dense target [d_sae] from the ``[[feature id, weight], ...]`` of eval/targets.json."""
    t = torch.zeros(d_sae, dtype=torch.float64)
    for f, w in pairs:
        t[int(f)] = float(w)
    return t


def _svd_cut(M: Tensor, storage: torch.dtype) -> tuple[Tensor, Tensor, Tensor, int]:
    """SVD of ``M`` (float64) and its numerical rank: singular values above ``max(shape) * eps`` of
    the storage dtype, relative to the largest (the documented cut-off of pinverse and rotation)."""
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    k = int((s > max(M.shape) * torch.finfo(storage).eps * s[0]).sum())
    return U, s, Vh, k


class RunFiles:
    """What the checks read: the approximator (W, b, correction, rotation), the SAE decoder, the
    targets and the vectors 03 saved."""

    def __init__(self, run: RunConfig, W_dec: Tensor) -> None:
        d = run.results_dir
        a = load_file(d / "approximator.safetensors")
        self.run = run
        self.W, self.b = a["W"].double(), a["b"].double()
        self.storage = a["W"].dtype
        self.correction, self.rotation = a["correction"].double(), a.get("rotation")
        self.W_dec = W_dec.detach().double().cpu()
        self.vectors = load_file(d / "eval" / "vectors.safetensors")
        self.targets = {
            (r["task"], r["method"]): json.loads(r["targets"])
            for r in json.loads((d / "eval" / "targets.json").read_text())
        }
        self.lam = run.approximator.sae_ts_lambda

    @property
    def d_sae(self) -> int:
        return int(self.W.shape[1])

    def t(self, task: str, method: str) -> Tensor:
        return dense(self.targets[(task, method)], self.d_sae)

    def sae_ts(self, t: Tensor, lam: float) -> Tensor:
        """SAE-TS: ``norm(norm(W t) - lam * norm(W b))``."""
        return unit(unit(self.W @ t) - lam * unit(self.W @ self.b))


def _sae(f: RunFiles, task: str, ctx: Any) -> Tensor:
    return unit(f.t(task, "SAE") @ f.W_dec)


def _sae_ts(f: RunFiles, task: str, ctx: Any) -> Tensor:
    return f.sae_ts(f.t(task, "SAE-TS"), f.lam)


def _sae_ts_nobias(f: RunFiles, task: str, ctx: Any) -> Tensor:
    return f.sae_ts(f.t(task, "SAE-TS-nobias"), 0.0)


def _fgaa(f: RunFiles, task: str, ctx: Any) -> Tensor:
    return f.sae_ts(f.t(task, "FGAA"), f.lam)


def _pinverse(f: RunFiles, task: str, ctx: Any) -> Tensor:
    """The least-squares ``x`` of ``x W + b = t / |t|``, minimum norm, on ``W``'s numerical rank."""
    t = f.t(task, "pinverse")
    U, s, Vh, k = _svd_cut(f.W, f.storage)
    y = t / t.norm() - f.b
    return unit(((y @ Vh[:k].T) / s[:k]) @ U[:, :k].T)


def _rotation(f: RunFiles, task: str, ctx: Any) -> Tensor:
    d = unit(f.t(task, "rotation") @ f.W_dec)
    R = f.rotation.double()
    return unit(unit(R @ d) - f.lam * unit(f.W @ f.b))


def _caa(f: RunFiles, task: str, ctx: Any) -> Tensor:
    """Mean residual at the hook over the positive examples minus the negative ones: per example the
    mean over its tokens after the start token, then the mean over examples."""
    from saets_utils.steering.tasks import load_task

    model, bos = ctx["model"], ctx["bos"]
    tk = load_task(task)
    hook = f.run.sae.hook_name
    start = 0 if f.run.effects.include_first_position else 1

    def mean_resid(texts: list[str]) -> Tensor:
        means = []
        for text in texts:  # one example at a time: no padding to get right
            toks = torch.tensor([[bos, *model.tokenizer.encode(text, add_special_tokens=False)]])
            _, cache = model.run_with_cache(toks, names_filter=hook, stop_at_layer=f.run.sae.layer + 1)
            means.append(cache[hook][0, start:].double().mean(0))
        return torch.stack(means).mean(0)

    with torch.no_grad():
        return unit(mean_resid(tk.positive) - mean_resid(tk.negative))


def _random(f: RunFiles, task: str, ctx: Any) -> Tensor:
    """A seeded isotropic draw, fixed by the task's name and the run's seed."""
    g = torch.Generator().manual_seed(f.run.seed * 1_000_003 + zlib.crc32(task.encode()))
    return unit(torch.randn(int(f.W.shape[0]), generator=g).double())


FORMULAS: dict[str, Callable[[RunFiles, str, Any], Tensor]] = {
    "CAA": _caa,
    "SAE": _sae,
    "SAE-TS": _sae_ts,
    "SAE-TS-nobias": _sae_ts_nobias,
    "pinverse": _pinverse,
    "rotation": _rotation,
    "FGAA": _fgaa,
    "random": _random,
}
assert set(FORMULAS) == {m.name for m in REGISTRY if m.vector}, "a method with a vector needs its formula here"


def check_approximator_file(f: RunFiles) -> None:
    """The saved correction is ``norm(W b)`` and the saved rotation the Procrustes partial isometry
    ``U_k V_k^T`` of ``C = norm_cols(W) @ norm_rows(W_dec)`` on ``C``'s numerical rank ``k``."""
    torch.testing.assert_close(f.correction, unit(f.W @ f.b), atol=ATOL, rtol=0)
    assert f.rotation is not None, "02 saved no rotation next to the approximator"
    C = (f.W / f.W.norm(dim=0, keepdim=True).clamp_min(1e-12)) @ (
        f.W_dec / f.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    )
    U, _, Vh, k = _svd_cut(C, f.storage)
    assert k >= 1
    torch.testing.assert_close(f.rotation.double(), U[:, :k] @ Vh[:k], atol=1e-4, rtol=0)


def check_targets(f: RunFiles, baseline_density: Tensor) -> None:
    """Targets are (feature, weight) pairs in range; FGAA's are the top features of its contrast:
    positive, L1-normalised, largest first, at most ``fgaa_top_k``, none dense or a start-token feature."""
    ev = f.run.eval
    for (task, method), pairs in f.targets.items():
        ids = [int(i) for i, _ in pairs]
        assert pairs and len(set(ids)) == len(ids) and all(0 <= i < f.d_sae for i in ids), (task, method, pairs)
        if method == "FGAA":
            w = torch.tensor([w for _, w in pairs], dtype=torch.float64)
            assert (w > 0).all() and abs(float(w.sum()) - 1) < 1e-6 and (w[:-1] >= w[1:]).all(), pairs
            assert len(pairs) <= ev.fgaa_top_k and not set(ids) & set(ev.fgaa_bos_features)
            assert (baseline_density[ids] <= ev.fgaa_density_max).all(), "FGAA kept a dense feature"


def check_vectors_follow_formulas(run: RunConfig, W_dec: Tensor, model: Any, bos: int) -> list[str]:
    """Every vector in eval/vectors.safetensors equals its method's formula (unit norm, atol 1e-5).
    Returns the ``task/method`` keys checked."""
    f = RunFiles(run, W_dec)
    check_approximator_file(f)
    check_targets(f, load_file(run.results_dir / "baseline.safetensors")["density"])
    ctx = {"model": model, "bos": bos}
    # CAA reads the model's activations: batched and padded in 03, one example at a time here; in a
    # float32 model they agree to rounding (1e-7 seen), in bfloat16 (the reference's Gemma) to 1e-4.
    caa_tol = ATOL if model.cfg.dtype == torch.float32 else 1e-3
    checked = []
    for key, v in sorted(f.vectors.items()):
        task, method = key.split("/", 1)
        assert abs(float(v.double().norm()) - 1) < ATOL, f"{key} is not unit-norm"
        expected = FORMULAS[method](f, task, ctx)
        err = float((v.double() - expected).abs().max())
        tol = caa_tol if method == "CAA" else ATOL
        assert err < tol, f"{key} does not follow the {method} formula (max abs difference {err:.3g})"
        checked.append(key)
    return checked


def check_approximator_metrics(run: RunConfig) -> dict[str, Any]:
    """02's metrics are those of its saved approximator on its held-out vectors, and in range."""
    d = run.results_dir
    m = json.loads((d / "approximator_metrics.json").read_text())
    a, h, e = (
        load_file(d / f)
        for f in ("approximator.safetensors", "approximator_holdout.safetensors", "effects.safetensors")
    )
    ids = e["vector_ids"].tolist()
    rows = [ids.index(i) for i in h["vector_ids"].tolist()]
    valid = torch.isfinite(e["scales"]) & torch.isfinite(e["effects"]).all(-1)
    train = [r for r in range(len(ids)) if r not in rows and valid[r]]
    assert m["n_val"] == len(rows) == run.approximator.holdout and m["n_train"] + m["n_dropped"] == len(train)
    assert m["fit"] == run.approximator.fit
    Y = h["measured"].double()
    torch.testing.assert_close(h["measured"], e["effects"][rows])  # held out: the measured effects of those ids
    P = e["vectors"][rows].double() @ a["W"].double() + a["b"].double()
    torch.testing.assert_close(h["pred"].double(), P, atol=1e-4, rtol=1e-4)  # predicted by the saved W, b
    mean = e["effects"][train].double().mean(0)
    expect = {
        "mse": ((P - Y) ** 2).mean(),
        "mse_zero": (Y**2).mean(),
        "mse_mean": ((mean - Y) ** 2).mean(),
    }
    for k, v in expect.items():
        assert abs(m[k] - float(v)) <= 1e-4 * float(v) + 1e-9, (k, m[k], float(v))
    assert m["r2"] == _approx(1 - m["mse"] / m["mse_mean"]) and m["beats_mean_baseline"] == (m["mse"] < m["mse_mean"])
    assert m["r2_ci_low"] <= m["r2"] <= m["r2_ci_high"] <= 1
    assert m["noise_ceiling_ci_low"] <= m["noise_ceiling"] <= m["noise_ceiling_ci_high"] <= 1
    cos = torch.nn.functional.cosine_similarity(P, Y, dim=1)
    assert m["cosine_mean"] == _approx(float(cos.mean()), 1e-4) and -1 <= m["cosine_mean"] <= 1
    assert [p["id"] for p in m["per_vector"]] == h["vector_ids"].tolist()
    assert 0 <= m["per_feature_r2_frac_positive"] <= 1 and 0 <= m["n_features_varying"] <= int(Y.shape[1])
    return m


def _approx(x: float, rel: float = 1e-6) -> Any:
    import pytest

    return pytest.approx(x, rel=rel, abs=1e-9)


def check_eval_tables(run: RunConfig) -> None:
    """03's tables follow from its per-text scores: by_scale holds the mean scores per task, method
    and scale and their product; summary the largest product over scales; the battle ratings count
    each method's wins, losses and ties in battles.jsonl and average 1000."""
    ev = run.results_dir / "eval"
    samples = pd.read_json(ev / "samples.jsonl", lines=True)
    for col in ("behaviour", "coherence"):
        assert samples[col].dropna().between(0, 1).all(), f"{col} scores outside [0, 1]"
    keys = ["task", "method", "scale"]
    by_scale = pd.read_csv(ev / "by_scale.csv").set_index(keys)
    means = samples.groupby(keys)[["behaviour", "coherence"]].mean().loc[by_scale.index]
    np.testing.assert_allclose(by_scale[["behaviour", "coherence"]], means, atol=1e-9)
    np.testing.assert_allclose(by_scale["product"], by_scale["behaviour"] * by_scale["coherence"], atol=1e-12)
    assert (by_scale["n"] == samples.groupby(keys).size().loc[by_scale.index]).all()
    summary = pd.read_csv(ev / "summary.csv")
    best = by_scale.reset_index().groupby(["task", "method"])["product"].max()
    np.testing.assert_allclose(summary["max_product"], best.loc[list(zip(summary.task, summary.method))], atol=1e-12)
    at_best = by_scale.loc[list(zip(summary.task, summary.method, summary.best_scale)), "product"]
    np.testing.assert_allclose(at_best, summary["max_product"], atol=1e-12)
    if not (ev / "battle_ratings.csv").is_file():
        return
    ratings = pd.read_csv(ev / "battle_ratings.csv").set_index("method")
    battles = pd.read_json(ev / "battles.jsonl", lines=True)
    battles = battles[battles["error"].isna()]
    counts = {m: {"wins": 0, "losses": 0, "ties": 0} for m in ratings.index}
    for a, b, w in zip(battles.method_a, battles.method_b, battles.winner):
        if w == "tie":
            counts[a]["ties"] += 1
            counts[b]["ties"] += 1
        else:
            win, lose = (a, b) if w == "A" else (b, a)
            counts[win]["wins"] += 1
            counts[lose]["losses"] += 1
    got = ratings[["wins", "losses", "ties"]].to_dict("index")
    assert got == counts
    assert (ratings.wins + ratings.losses + ratings.ties == ratings.battles).all()
    assert abs(ratings.rating.mean() - 1000) < 1e-6
    assert ((ratings.ci_low <= ratings.rating) & (ratings.rating <= ratings.ci_high)).all()
