"""Batch sizes from the device's free memory.

On a GPU, 01's forwards batch as many rows as fit comfortably: calibration's logits are
``[rows, seq, vocab]`` in float32 (twice: logits and log-probabilities), generation keeps a KV cache
per row. On a CPU the configured defaults stand (there, larger batches do not run faster).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def bytes_per_row(model: HookedTransformer, seq: int, logit_positions: int | None = None) -> int:
    """Rough peak bytes one batch row of ``seq`` tokens needs: logits plus their float32 copies at
    ``logit_positions`` positions (default all, as a loss needs; 01's aligned decode feeds one
    position per step, so 1), a KV cache and a block's transient activations."""
    c = model.cfg
    act = torch.finfo(c.dtype).bits // 8
    kv_heads = getattr(c, "n_key_value_heads", None) or c.n_heads
    logits = (seq if logit_positions is None else logit_positions) * c.d_vocab * (act + 4 * 2)
    kv = 2 * c.n_layers * kv_heads * c.d_head * seq * act
    acts = 12 * seq * max(c.d_model, c.d_mlp or 0) * act
    return logits + kv + acts


def rows_for_memory(
    model: HookedTransformer,
    seq: int,
    default: int,
    *,
    logit_positions: int | None = None,
    fraction: float = 0.4,
    cap: int = 16384,
    held_per_row: int = 0,
) -> int:
    """Rows per forward: on CUDA as many as ``fraction`` of the free memory holds (at most ``cap``;
    :func:`bytes_per_row`, plus ``held_per_row`` bytes a backward keeps); elsewhere ``default``."""
    device = torch.device(model.cfg.device or "cpu")
    if device.type != "cuda":
        return default
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(free * fraction) // max(bytes_per_row(model, seq, logit_positions) + held_per_row, 1)
    return max(1, min(cap, fit))


def loss_rows(model: HookedTransformer, seq: int) -> int:
    """Rows per loss forward of 01's calibration (chunks of ``seq`` tokens, logits at every position)."""
    return rows_for_memory(model, seq, default=64)


def gradient_rows(model: HookedTransformer, seq: int) -> int:
    """Rows per loss forward and backward (:func:`~saets_utils.effects.calibration.loss_gradient`):
    a loss forward's bytes plus what autograd keeps for the backward, every layer's activations
    (counted as a block's transient ones, :func:`bytes_per_row`, once per layer)."""
    c = model.cfg
    per_layer = 12 * seq * max(c.d_model, c.d_mlp or 0) * (torch.finfo(c.dtype).bits // 8)
    return rows_for_memory(model, seq, default=64, held_per_row=c.n_layers * per_layer)


def rollout_rows(model: HookedTransformer, total_tokens: int) -> int:
    """Rows per call of 01's rollouts: the aligned decode feeds one position per step, so one
    position's logits per row."""
    return rows_for_memory(model, total_tokens, default=2048, logit_positions=1)
