"""Apply steering vectors through a hook.

Steering adds ``scale * v`` to the residual stream at one hook, at every position (prompt and
generated tokens alike). Each batch row may carry its own vector, so many vectors are steered
in one forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def hook_layer(hook_name: str) -> int:
    """``blocks.12.hook_resid_post`` -> 12."""
    return int(hook_name.split(".")[1])


def steering_delta(vectors: Tensor, scales: Tensor | float | Sequence[float]) -> Tensor:
    """``scales[:, None] * vectors``: vectors ``[batch, d_model]`` (or ``[d_model]``), scales
    ``[batch]`` or a scalar -> ``[batch, d_model]`` (or ``[d_model]``)."""
    s = torch.as_tensor(scales, dtype=vectors.dtype, device=vectors.device)
    return vectors * (s[..., None] if s.ndim else s)


@contextmanager
def steering_hook(
    model: HookedTransformer, hook_name: str, delta: Tensor | None, capture: list[Tensor] | None = None
) -> Iterator[None]:
    """Within the block, add ``delta`` (``[d_model]`` or ``[batch, d_model]``) at ``hook_name``.

    ``capture``, if given, receives the hook's activations *before* steering on every forward
    (``[batch, pos, d_model]``). Steering enters the residual stream after this hook, so those
    are exactly the unsteered model's activations on the same tokens. The hook is removed on
    exit, also when the block raises.
    """

    def hook(act: Tensor, hook: Any) -> Tensor:  # TransformerLens's hook signature
        if capture is not None:
            capture.append(act.detach())
        if delta is None:
            return act
        d = delta.to(act.dtype)
        return act + (d[:, None, :] if d.ndim == 2 else d)

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        yield
