"""Ridge with ``ridge_lambda: cv`` at the paper's scale: seconds and peak memory of the whole path.

A synthetic effect matrix: ``X [n, d]`` Gaussian unit vectors' stand-ins, ``Y = X A B + noise``
(rank ``--rank`` signal, float32 ``[n, k]``), like 02 fits at the reference's size (50,000
vectors of Gemma-2-2B's 2304 -> Gemma Scope's 16,384 features). Timed:

- ``ridge_cv_path`` (5-fold CV MSE of all 8 penalties of ``RIDGE_PATH``) and the final fit at the
  chosen penalty with every penalty's training MSE (:class:`RidgePath`, from the same moments), at
  ``--n/--d/--k``;
- side by side at ``--small`` (n,d,k), the same CV by refitting ``fit_ridge`` per fold and
  penalty (what ``choose_ridge_lambda`` did before) against ``ridge_cv_path``: the ratio; and
  02's whole ``fit: ridge, ridge_lambda: cv`` fit (CV, a history row per penalty, the final fit)
  the way ``fit_approximator`` did it before (a ``fit_ridge`` and an MSE pass per penalty) against
  now (one pass over the data for all of it, :class:`RidgePath`).

Peak memory: the process's max RSS on CPU (it includes the data), ``max_memory_allocated`` on CUDA.

    python -m benchmarks.ridge_cv                                # 50,000 x 2304 -> 16,384 on the CPU
    python -m benchmarks.ridge_cv --device cuda
    python -m benchmarks.ridge_cv --smoke                        # every step at toy sizes, seconds
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from benchmarks.output import write_json
from saets_utils.approximator.fits import (
    RIDGE_PATH,
    RidgePath,
    choose_ridge_lambda,
    cv_folds,
    fit_ridge,
    moments,
    mse,
    ridge_cv_path,
)
from saets_utils.approximator.fitting import fit_approximator
from saets_utils.config import ApproximatorConfig


def synthetic(n: int, d: int, k: int, rank: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``X [n, d]``, ``Y [n, k]`` float32 on ``device``: a rank-``rank`` linear map plus noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(n, d, generator=g, device=device) / d**0.5
    A = torch.randn(d, rank, generator=g, device=device)
    B = torch.randn(rank, k, generator=g, device=device) / rank**0.5
    Y = torch.empty(n, k, device=device)
    for i in range(0, n, 4096):
        Y[i : i + 4096] = X[i : i + 4096] @ A @ B + 0.5 * torch.randn(min(4096, n - i), k, generator=g, device=device)
    return X, Y


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def refit_path(X: torch.Tensor, Y: torch.Tensor, folds: int, seed: int) -> dict[float, float]:
    """The CV the way ``choose_ridge_lambda`` did it before: one ``fit_ridge`` per fold and penalty."""
    n = X.shape[0]
    parts = cv_folds(n, folds, seed)
    cv = {}
    for lam in RIDGE_PATH:
        sse = 0.0
        for j, part in enumerate(parts):
            tr = torch.cat([p for i, p in enumerate(parts) if i != j]).to(X.device)
            sse += mse(fit_ridge(X[tr], Y[tr], lam), X[part.to(X.device)], Y[part.to(X.device)]) * len(part)
        cv[lam] = sse / n
    return cv


def old_fit_approximator(X: torch.Tensor, Y: torch.Tensor, folds: int, seed: int) -> None:
    """``fit_approximator``'s ridge branch before :class:`RidgePath`: CV path, then per penalty a
    ``fit_ridge`` and its training MSE, then the final fit."""
    lam, _ = choose_ridge_lambda(X, Y, "cv", folds=folds, seed=seed)
    for lam_i in sorted({*RIDGE_PATH, lam}):
        mse(fit_ridge(X, Y, lam_i), X, Y)
    fit_ridge(X, Y, lam)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=2304)
    ap.add_argument("--k", type=int, default=16_384)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--small", type=int, nargs=3, default=[4000, 576, 4608], metavar=("N", "D", "K"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-full", action="store_true", help="only the side-by-side ratio at --small")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (1000 x 32 -> 64, small 300 x 16 -> 32)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        a.n, a.d, a.k, a.rank, a.small = 1000, 32, 64, 4, [300, 16, 32]
    dev = a.device
    out: dict = {"device": dev, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if dev.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()

    # side by side at the small size: refit per fold and penalty vs the path
    Xs, Ys = synthetic(*a.small, a.rank, dev)
    _sync(dev)
    t0 = time.perf_counter()
    old = refit_path(Xs, Ys, a.folds, 0)
    _sync(dev)
    t1 = time.perf_counter()
    new = ridge_cv_path(Xs, Ys, RIDGE_PATH, folds=a.folds, seed=0)
    _sync(dev)
    t2 = time.perf_counter()
    worst = max(abs(old[lam] - new[lam]) / old[lam] for lam in RIDGE_PATH)
    out["small"] = {
        "shape": a.small,
        "refit_s": t1 - t0,
        "path_s": t2 - t1,
        "ratio": (t1 - t0) / (t2 - t1),
        "max_rel_diff_cv_mse": worst,
        "best_lambda": [min(old, key=old.__getitem__), min(new, key=new.__getitem__)],
    }
    print(
        f"small {a.small}: refit per fold and penalty {t1 - t0:.2f} s, path {t2 - t1:.2f} s -> "
        f"{(t1 - t0) / (t2 - t1):.1f}x; CV MSE max rel. difference {worst:.1e}; best lambda {out['small']['best_lambda']}",
        flush=True,
    )
    cfg = ApproximatorConfig(fit="ridge", ridge_lambda="cv", cv_folds=a.folds)
    _sync(dev)
    t0 = time.perf_counter()
    old_fit_approximator(Xs, Ys, a.folds, 0)
    _sync(dev)
    t1 = time.perf_counter()
    fit_approximator(Xs, Ys, cfg, seed=0)
    _sync(dev)
    t2 = time.perf_counter()
    out["small"]["fit_approximator"] = {"before_s": t1 - t0, "now_s": t2 - t1, "ratio": (t1 - t0) / (t2 - t1)}
    print(
        f"small {a.small}: 02's ridge fit (CV + history + final) before {t1 - t0:.2f} s, now {t2 - t1:.2f} s -> "
        f"{(t1 - t0) / (t2 - t1):.1f}x",
        flush=True,
    )
    del Xs, Ys
    if not a.skip_full:
        X, Y = synthetic(a.n, a.d, a.k, a.rank, dev)
        data_gb = (X.numel() + Y.numel()) * 4 / 1e9
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        _sync(dev)
        t0 = time.perf_counter()
        total = moments(X, Y)
        cv = ridge_cv_path(X, Y, RIDGE_PATH, folds=a.folds, seed=0, total=total)
        _sync(dev)
        t1 = time.perf_counter()
        best = min(cv, key=cv.__getitem__)
        path = RidgePath.of(total)  # the final fit and every penalty's training error, no pass over the data
        path.fit(best)
        for lam in RIDGE_PATH:
            path.train_mse(lam)
        _sync(dev)
        t2 = time.perf_counter()
        peak = (
            torch.cuda.max_memory_allocated() / 1e9
            if dev.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        )
        out["full"] = {
            "shape": [a.n, a.d, a.k],
            "path_s": t1 - t0,
            "final_fit_s": t2 - t1,
            "best_lambda": best,
            "cv_mse": cv,
            "data_gb": data_gb,
            "peak_gb": peak,
        }
        print(
            f"full {a.n} x {a.d} -> {a.k} ({a.folds} folds, {len(RIDGE_PATH)} penalties): path {t1 - t0:.1f} s, "
            f"final fit + every penalty's training MSE {t2 - t1:.1f} s; data {data_gb:.1f} GB, peak memory {peak:.1f} GB "
            f"({'max allocated' if dev.startswith('cuda') else 'max RSS'}); best lambda {best:g}",
            flush=True,
        )
    write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
