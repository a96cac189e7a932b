"""Grouped-query attention without TransformerLens's copies of the key and value cache.

TransformerLens (3.x) computes grouped-query attention (several query heads per key/value head, as
in SmolLM2 and Gemma-2) by first repeating every key and value head once per query head of its
group (``repeat_interleave``), then multiplying through transposed views that ``matmul`` copies
again. On a KV-cache decoding step that is several copies of the whole cache per layer for one
query position: on SmolLM2-135M on a 2-core CPU, most of the copies that took 23% of a 896-row step.

:func:`grouped_attention` gives each grouped-query attention module two methods of its own (the
class is untouched) that multiply each key/value head with its group of query heads as one batch
of matrices: ``matmul`` still copies the (unrepeated) keys and values once per layer and step, a
fraction of TransformerLens's copies. Every hook sees the same shapes and values (``hook_attn_scores``, ``hook_pattern``,
``hook_z``); the sums are the same but run through another matrix shape, so results match
TransformerLens's to float rounding, not bitwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

_METHODS = ("calculate_attention_scores", "calculate_z_scores")


def _grouped(module: nn.Module) -> bool:
    from transformer_lens.components import GroupedQueryAttention

    # exactly the class whose methods these replace (a subclass may override them)
    return type(module) is GroupedQueryAttention and not module.cfg.ungroup_grouped_query_attention


def calculate_attention_scores(self, q: Tensor, k: Tensor) -> Tensor:
    """``q [batch, q_pos, head, d_head]``, ``k [batch, k_pos, kv_head, d_head]`` -> scores
    ``[batch, head, q_pos, k_pos]`` (scaled and soft-capped as TransformerLens does); query head
    ``h`` reads key head ``h // (head / kv_head)``, as after TransformerLens's ``repeat_interleave``."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    b, qp, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    q_ = q.reshape(b, qp, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * qp, d)
    scores = (q_ @ k.permute(0, 2, 3, 1)).view(b, kvh, g, qp, -1).reshape(b, h, qp, -1) / self.attn_scale
    return apply_softcap(scores, self.cfg.attn_scores_soft_cap)


def calculate_z_scores(self, v: Tensor, pattern: Tensor) -> Tensor:
    """``v [batch, k_pos, kv_head, d_head]``, ``pattern [batch, head, q_pos, k_pos]`` -> ``z [batch,
    q_pos, head, d_head]`` through ``hook_z``."""
    b, h, qp, kp = pattern.shape
    kvh = v.shape[2]
    z = pattern.reshape(b, kvh, (h // kvh) * qp, kp) @ v.permute(0, 2, 1, 3)
    return self.hook_z(z.view(b, h, qp, -1).permute(0, 2, 1, 3))


def grouped_attention(model: HookedTransformer) -> int:
    """Give every grouped-query attention module of ``model`` the copy-free methods above; returns
    how many modules changed. Idempotent; :func:`stock_attention` undoes it for a block."""
    n = 0
    for module in model.modules():
        if _grouped(module) and not is_grouped_module(module):
            # instance attributes shadow the class's methods (setattr: nn.Module's typing expects submodules)
            # partials of module-level functions: a pickled model gets them back (a bound method would
            # unpickle as the class's own); setattr, since nn.Module's typing expects submodules
            setattr(module, "calculate_attention_scores", partial(calculate_attention_scores, module))  # noqa: B010
            setattr(module, "calculate_z_scores", partial(calculate_z_scores, module))  # noqa: B010
            n += 1
    return n


def is_grouped_module(module: nn.Module) -> bool:
    return all(name in vars(module) for name in _METHODS)


def is_grouped_attention(model: nn.Module) -> bool:
    """Whether every grouped-query attention module of ``model`` uses the methods above."""
    return all(is_grouped_module(m) for m in model.modules() if _grouped(m))


@contextmanager
def stock_attention(model: HookedTransformer) -> Iterator[None]:
    """Within the block, ``model`` computes attention with TransformerLens's own methods; the
    previous methods are back on exit. For benchmarks that time code as it runs on a stock model."""
    saved = [(m, {k: vars(m)[k] for k in _METHODS if k in vars(m)}) for m in model.modules() if _grouped(m)]
    try:
        for m, methods in saved:
            for k in methods:
                delattr(m, k)
        yield
    finally:
        for m, methods in saved:
            for k, f in methods.items():
                setattr(m, k, f)
