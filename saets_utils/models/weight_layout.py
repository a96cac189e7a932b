"""Store TransformerLens weights in the memory layout its forward pass asks for.

TransformerLens (3.x) lays its weights out as ``[d_in, d_out]`` (``W_in``, ``W_U``) or per head
(``W_Q [head, d_model, d_head]``, ``W_O [head, d_head, d_model]``) and, on every forward, turns
each into the ``[d_out, d_in]`` contiguous matrix ``F.linear`` wants with ``.T.contiguous()`` or an
einops rearrange: a copy of every weight of the model per call. One forward over many positions
hardly notices; a decoding step over one position per row spends most of its time copying (on
SmolLM2-135M on a 2-core CPU, 0.63 s of a 1.3 s step at 192 rows).

:func:`linear_layout` rewrites each such parameter in place as a strided view of storage that
already holds that contiguous matrix. Values, shapes and parameter objects stay the same, and
TransformerLens's ``.contiguous()`` then returns the tensor without copying: ``F.linear`` receives
a contiguous matrix with the same values as before, so every result is bitwise unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# the permutation of a parameter's dims that TransformerLens makes contiguous per forward, by module
Perm = tuple[int, ...]
_QKV: Perm = (0, 2, 1)  # [head, d_model, d_head] -> (head d_head) d_model  (simple_attn_linear)
_ATTENTION: dict[str, Perm] = {"W_Q": _QKV, "W_K": _QKV, "W_V": _QKV, "_W_K": _QKV, "_W_V": _QKV, "W_O": (2, 0, 1)}
_GATED_MLP: dict[str, Perm] = {"W_gate": (1, 0), "W_in": (1, 0), "W_out": (1, 0)}  # F.linear(x, W.T.contiguous())
_UNEMBED: dict[str, Perm] = {"W_U": (1, 0)}


def _permutations(module: nn.Module) -> dict[str, Perm]:
    """The parameters of ``module`` that TransformerLens copies into another layout on every forward
    (other modules, e.g. the plain MLP's ``addmm(x, W_in)``, read their weights as stored)."""
    from transformer_lens.components import AbstractAttention, GatedMLP, Unembed

    if isinstance(module, AbstractAttention):
        cfg = module.cfg
        split = cfg.use_split_qkv_input or cfg.use_attn_in or cfg.load_in_4bit
        perms: dict[str, Perm] = {} if split else {k: v for k, v in _ATTENTION.items() if k != "W_O"}
        if not (cfg.use_attn_result or cfg.load_in_4bit):
            perms["W_O"] = _ATTENTION["W_O"]
        return perms
    if type(module) is GatedMLP:
        return _GATED_MLP
    if isinstance(module, Unembed):
        return _UNEMBED
    return {}


def _handled(model: nn.Module) -> Iterator[tuple[nn.Parameter, Perm]]:
    for module in model.modules():
        perms = _permutations(module)
        for name, param in module.named_parameters(recurse=False):
            perm = perms.get(name)
            if perm is not None and param.ndim == len(perm):
                yield param, perm


@torch.no_grad()
def linear_layout(model: HookedTransformer) -> int:
    """Lay out ``model``'s projection weights so that TransformerLens's per-forward
    ``.contiguous()`` copies are no-ops; returns how many parameters were rewritten.
    Idempotent; values unchanged (each parameter keeps its shape and dtype)."""
    n = 0
    for param, perm in list(_handled(model)):
        if not param.permute(*perm).is_contiguous():
            base = param.permute(*perm).contiguous()  # what TransformerLens would copy every call
            param.data = base.permute(*sorted(range(len(perm)), key=perm.__getitem__))  # inverse permutation
            n += 1
    return n


def is_linear_layout(model: nn.Module) -> bool:
    """Whether every parameter :func:`linear_layout` handles is laid out for it."""
    return all(param.permute(*perm).is_contiguous() for param, perm in _handled(model))


@contextmanager
def stock_layout(model: HookedTransformer) -> Iterator[None]:
    """Within the block, ``model``'s weights are contiguous as TransformerLens itself lays them out
    (and copies them on every forward); the previous layout is back on exit. For benchmarks that
    time code the way it runs on a stock TransformerLens model."""
    saved = [(param, param.data) for param, _ in _handled(model)]
    try:
        for param, data in saved:
            param.data = data.contiguous()
        yield
    finally:
        for param, data in saved:
            param.data = data
