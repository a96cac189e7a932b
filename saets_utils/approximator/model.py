"""The effect approximator: a linear map from a unit steering vector to its effect on SAE features.

``effect ~= x @ W + b`` with ``W`` [d_model, d_sae] and ``b`` [d_sae] (the paper's ``M`` and ``b``):
the value object with its file format, the rank-aware pseudo-inverse of ``W``, the rotation that
maps decoder directions into effect space, and the seeded train / held-out split. Fits are in
:mod:`.fits` (one module per family), held-out metrics in :mod:`.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

FORMAT = "saets-effect-approximator"


@dataclass(frozen=True)
class EffectApproximator:
    """Linear effect predictor ``predict(x) = x @ W + b``; ``x`` must be a unit-norm steering vector.

    ``W``: Float[Tensor, "d_model d_sae"]; ``b``: Float[Tensor, "d_sae"]. Effects were measured on
    unit vectors scaled by a calibrated steering scale, so the map is only meaningful for unit ``x``;
    ``predict`` does not normalise, callers pass unit vectors.
    """

    W: Float[Tensor, "d_model d_sae"]
    b: Float[Tensor, " d_sae"]

    def __post_init__(self) -> None:
        if self.W.ndim != 2 or self.b.ndim != 1 or self.W.shape[1] != self.b.shape[0]:
            raise ValueError(
                f"EffectApproximator needs W [d_model, d_sae] and b [d_sae]; got W {tuple(self.W.shape)}, b {tuple(self.b.shape)}"
            )

    @property
    def d_model(self) -> int:
        return self.W.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W.shape[1]

    def predict(self, x: Float[Tensor, "*n d_model"]) -> Float[Tensor, "*n d_sae"]:
        """Predicted effect of each (unit-norm) steering vector in ``x``."""
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"steering vectors have width {x.shape[-1]}, the approximator expects d_model={self.d_model}"
            )
        return x.to(self.W) @ self.W + self.b

    @property
    def correction(self) -> Float[Tensor, " d_model"]:
        """``norm(W @ b)``: the direction SAE-TS subtracts to cancel the bias; zeros when ``W @ b`` is 0."""
        v = self.W.double() @ self.b.double()
        n = v.norm()
        return (v / n if n > 0 else v).to(self.W.dtype)

    def to(self, device: str | torch.device) -> EffectApproximator:
        return EffectApproximator(self.W.to(device), self.b.to(device))

    def save(
        self,
        path: str | Path,
        W_dec: Float[Tensor, "d_sae d_model"] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Write ``W``, ``b``, ``correction`` and, given ``W_dec``, the ``rotation`` matrix to safetensors."""
        from safetensors.torch import save_file

        tensors = {"W": self.W, "b": self.b, "correction": self.correction}
        if W_dec is not None:
            tensors["rotation"] = rotation_matrix(self, W_dec)
        meta = {"format": FORMAT, "formula": "effect = x @ W + b, x unit-norm", **(metadata or {})}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> EffectApproximator:
        """Read an approximator written by :meth:`save`."""
        from safetensors.torch import load_file

        t = load_file(str(path), device=str(device))
        if "W" not in t or "b" not in t:
            raise ValueError(
                f"{path} holds no effect approximator (keys {sorted(t)}); write it with EffectApproximator.save"
            )
        return cls(t["W"], t["b"])


def load_rotation(path: str | Path, device: str | torch.device = "cpu") -> Float[Tensor, "d_model d_model"] | None:
    """The rotation matrix saved next to an approximator, or None if it was saved without ``W_dec``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return f.get_tensor("rotation") if "rotation" in f.keys() else None  # noqa: SIM118 - safe_open has keys() only


def rank_rtol(shape: tuple[int, ...] | torch.Size, *dtypes: torch.dtype) -> float:
    """Cut-off, relative to the largest singular value, below which a singular value of a matrix
    of ``shape`` stored in ``dtypes`` is rounding noise: ``max(shape) * eps`` of the coarsest of
    ``dtypes`` (torch's default for ``pinv``/``matrix_rank``, but at the storage precision rather
    than the float64 the SVD is computed in). Non-float dtypes count as float64."""
    eps = max(torch.finfo(d if d.is_floating_point else torch.float64).eps for d in dtypes or (torch.float64,))
    return max(shape) * eps


def pinverse(W: Float[Tensor, "m n"], rtol: float | None = None) -> Float[Tensor, "n m"]:
    """Moore-Penrose pseudo-inverse of ``W [m, n]`` (e.g. the approximator's ``W [d_model, d_sae]``
    -> ``[d_sae, d_model]``), computed in float64, singular values at or below ``rtol * s_max``
    dropped; returned in float64.

    Why not ``torch.linalg.pinv(W.double())``: its default cut-off is float64's (``max(m, n) *
    2.2e-16``), but ``W`` is usually stored in float32 and often low rank (a reduced-rank fit). The
    singular values float32 rounding leaves in the null directions (~1e-7 relative, far above the
    float64 cut-off) then survive and are inverted, so ``x @ pinv(W)`` is dominated by rounding
    noise. ``rtol`` defaults to :func:`rank_rtol` at ``W``'s storage dtype (float32/bf16/fp16 eps;
    a float64 ``W`` gets float64's, i.e. torch's default).
    """
    if W.ndim != 2:
        raise ValueError(f"pinverse needs a 2-D matrix; got shape {tuple(W.shape)}")
    if rtol is None:
        rtol = rank_rtol(W.shape, W.dtype)
    elif not 0 <= rtol < 1:
        raise ValueError(f"rtol must be in [0, 1); got {rtol}")
    return torch.linalg.pinv(W.double(), rtol=rtol)


def rotation_matrix(
    approx: EffectApproximator, W_dec: Float[Tensor, "d_sae d_model"]
) -> Float[Tensor, "d_model d_model"]:
    """``R [d_model, d_model]`` with ``R @ norm(W_dec[j]) ~= norm(W[:, j])``: maps decoder directions
    onto the directions that drive each feature's effect, so it also applies to never-measured features.

    ``C = norm_cols(W) @ norm_rows(W_dec) = U S V^T`` (computed in float64), ``R = U_k V_k^T``
    (orthogonal Procrustes restricted to ``C``'s numerical rank ``k``: singular values above
    :func:`rank_rtol` of ``W``'s shape at the coarser storage dtype of ``W`` and ``W_dec``, times
    ``s_max``). ``rank(C) <= rank(W)``, and a reduced-rank ``W`` leaves ``C`` rank-deficient: the
    full ``U V^T`` would then be fixed by rounding noise in the other ``d_model - k`` dimensions.
    ``R`` is a partial isometry instead: it maps the span of the decoder side (``V_k``) isometrically
    onto the span of the effect side (``U_k``, inside the column span of ``W``) and sends the rest
    to zero. For a full-rank ``C`` (``k = d_model``) it is the orthogonal ``U V^T``.

    The reference code (ft_effects/adapter_analysis.py) takes the SVD of ``C^T`` and applies the
    transpose of its result, which is this ``R``; the public code's later ``R.T @ d`` goes with a ``C``
    built the other way (docs/reference.md, "Rotation"). Callers apply ``R @ d`` (tested on a known rotation).
    """
    if W_dec.shape != (approx.d_sae, approx.d_model):
        raise ValueError(
            f"W_dec must be [d_sae, d_model] = [{approx.d_sae}, {approx.d_model}] to match the approximator; got {tuple(W_dec.shape)}"
        )
    W = approx.W.double()
    D = W_dec.to(W)
    # Dead features (all-zero column or row) contribute nothing instead of NaN.
    M_n = W / W.norm(dim=0, keepdim=True).clamp_min(1e-12)
    D_n = D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)
    U, sv, Vh = torch.linalg.svd(M_n @ D_n)
    rtol = rank_rtol(approx.W.shape, approx.W.dtype, W_dec.dtype)
    k = int((sv > rtol * sv[0]).sum()) if sv.numel() and sv[0] > 0 else 0
    return (U[:, :k] @ Vh[:k]).to(approx.W.dtype)


def split_holdout(
    vector_ids: Int[Tensor, " n"], n_holdout: int, seed: int = 0
) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_holdout"]]:
    """Seeded random train/validation split; returns sorted row positions into ``vector_ids``.

    The split depends on the set of ids, not on their row order, so effects gathered in a different
    shard order give the same split. (The reference held out the last 100 rows.)
    """
    ids = torch.as_tensor(vector_ids).long().flatten().cpu()
    n = ids.numel()
    if not 1 <= n_holdout < n:
        raise ValueError(
            f"n_holdout must be between 1 and n - 1 = {n - 1} (there are {n} vectors); got {n_holdout}. Lower approximator.holdout or measure more vectors"
        )
    if ids.unique().numel() != n:
        raise ValueError(
            "vector_ids contains duplicates; a vector measured twice would leak between train and validation"
        )
    order = torch.argsort(ids)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val = order[perm[:n_holdout]].sort().values
    train = order[perm[n_holdout:]].sort().values
    return train, val
