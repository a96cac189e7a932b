"""The reference training (``fit: adam``): MSE, Adam, shuffled minibatches, cosine LR decay per epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from saets_utils.approximator.fits.common import FitInfo, check_finite, check_xy, mse
from saets_utils.approximator.model import EffectApproximator

if TYPE_CHECKING:
    from saets_utils.config import ApproximatorConfig


def fit_adam(
    X: Float[Tensor, "n d_model"],
    Y: Float[Tensor, "n d_sae"],
    *,
    lr: float = 2e-4,
    epochs: int = 15,
    batch_size: int = 64,
    seed: int = 0,
    X_val: Tensor | None = None,
    Y_val: Tensor | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    init: str = "mean",
) -> tuple[EffectApproximator, list[dict[str, Any]]]:
    """The reference training: MSE, Adam, shuffled minibatches, cosine LR decay per epoch (T_max = epochs).

    ``init``: ``mean`` (W = 0, b = the mean effect) or ``reference`` (the reference code's
    ``LinearAdapter``: W Kaiming-uniform over ``[d_model, d_sae]``, b = 0; a feature no training
    vector moved keeps a random column instead of a zero one).

    Returns the approximator and one history row per epoch: ``epoch``, ``lr``, ``train_mse`` (mean
    over the epoch's batches) and, with a validation set, ``val_mse`` (after the epoch).
    """
    check_xy(X, Y)
    if (X_val is None) != (Y_val is None):
        raise ValueError("pass both X_val and Y_val, or neither")
    if X_val is not None and Y_val is not None:
        check_xy(X_val, Y_val)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    from saets_utils.progress import progress as progress_bar

    device = torch.device(device) if device is not None else X.device
    n = X.shape[0]
    g = torch.Generator().manual_seed(seed)
    # Start at the mean predictor (W = 0, b = mean effect) instead of the reference's random W and
    # zero b: the large dense-feature entries of b need not be learnt at lr 2e-4, and epoch 1
    # starts from the baseline the fit is judged against.
    if init == "reference":
        W0 = torch.nn.init.kaiming_uniform_(torch.empty(X.shape[1], Y.shape[1]), generator=g)
        W = W0.to(device).requires_grad_(True)
        b = torch.zeros(Y.shape[1], device=device, requires_grad=True)
    elif init == "mean":
        W = torch.zeros(X.shape[1], Y.shape[1], device=device, requires_grad=True)
        b = Y.float().mean(0).to(device).requires_grad_(True)
    else:
        raise ValueError(f"init must be 'mean' or 'reference', not {init!r}")
    opt = torch.optim.Adam([W, b], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    history: list[dict[str, Any]] = []
    for epoch in progress_bar(iterable=range(1, epochs + 1), total=epochs, desc="fit_adam", disable=not progress):
        cur_lr = opt.param_groups[0]["lr"]
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            xb = X[idx].to(device, torch.float32)
            yb = Y[idx].to(device, torch.float32)
            loss = F.mse_loss(xb @ W + b, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        row: dict[str, Any] = {"epoch": epoch, "lr": cur_lr, "train_mse": total / n}
        if X_val is not None and Y_val is not None:
            row["val_mse"] = mse(EffectApproximator(W.detach(), b.detach()), X_val, Y_val)
        history.append(row)
    return check_finite(EffectApproximator(W.detach().clone(), b.detach().clone())), history


def fit_from_config(
    X: Float[Tensor, "n d_model"],
    Y: Float[Tensor, "n d_sae"],
    cfg: ApproximatorConfig,
    *,
    seed: int = 0,
    X_val: Tensor | None = None,
    Y_val: Tensor | None = None,
    W_dec: Tensor | None = None,
    progress: bool = False,
) -> tuple[EffectApproximator, FitInfo]:
    """``fit: adam`` with ``cfg.lr``, ``cfg.epochs``, ``cfg.batch_size`` and ``cfg.adam_init``; the history
    has a row per epoch."""
    approx, rows = fit_adam(
        X,
        Y,
        lr=cfg.lr,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=seed,
        X_val=X_val,
        Y_val=Y_val,
        progress=progress,
        init=cfg.adam_init,
    )
    return approx, FitInfo(fit="adam", history=rows)
