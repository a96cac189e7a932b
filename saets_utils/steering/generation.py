"""Generate text while steering, with sampling seeded per row.

Each batch row may carry its own steering vector (:mod:`saets_utils.steering.hooks`), so many
vectors are steered in one forward pass. Sampling is seeded per row, so a row's text does not
depend on which other rows share its batch: batched and one-at-a-time runs give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

from saets_utils.config import SamplingConfig
from saets_utils.steering.hooks import hook_layer, steering_hook
from saets_utils.steering.sampling import row_seed, row_uniforms, sample_from_logits

__all__ = ["Generation", "generate", "generate_aligned", "row_seed", "row_uniforms", "sample_from_logits"]


@dataclass
class Generation:
    """Tokens ``[batch, prompt_len + new_tokens]`` and, if captured, the unsteered activations at the
    steering hook for every position ``[batch, prompt_len + new_tokens, d_model]``."""

    tokens: Tensor
    activations: Tensor | None = None


@torch.no_grad()
def generate(
    model: HookedTransformer,
    prompt_tokens: Tensor,
    new_tokens: int,
    seeds: Sequence[int],
    *,
    sampling: SamplingConfig | None,
    hook_name: str | None = None,
    delta: Tensor | None = None,
    use_cache: bool = True,
    capture: bool = False,
    on_step: Callable[[Tensor], None] | None = None,
) -> Generation:
    """Generate ``new_tokens`` after ``prompt_tokens [batch, prompt_len]`` (all rows the same length),
    steering each row by ``delta [batch, d_model]`` (or ``[d_model]``) at ``hook_name``.

    No early stop at EOS. ``seeds`` (one per row) make sampling reproducible row by row. With
    ``capture``, the pre-steering activations at ``hook_name`` are returned for all positions,
    including the last sampled token (one extra forward up to the hook). ``on_step`` is called
    with the tokens so far ``[batch, prompt_len + i + 1]`` after each sampled token (streaming).
    """
    device = model.cfg.device
    tokens = prompt_tokens.to(device)
    batch = tokens.shape[0]
    _check_rows(hook_name, delta, capture, seeds, batch)
    u = row_uniforms(seeds, new_tokens, device)
    captured: list[Tensor] = []
    cache = _new_cache(model, batch) if use_cache else None
    with _steering(model, hook_name, delta, captured if capture else None):
        for i in range(new_tokens):
            if use_cache:
                logits = _cached_forward(model, tokens if i == 0 else tokens[:, -1:], cache)
            else:
                if capture:
                    captured.clear()
                logits = model(tokens)
            nxt = sample_from_logits(logits[:, -1, :], u[:, i], sampling)
            tokens = torch.cat([tokens, nxt[:, None].to(tokens.dtype)], dim=1)
            if on_step is not None:
                on_step(tokens)
        acts = None
        if capture:
            assert hook_name is not None  # _check_rows
            if use_cache:
                _cached_forward(model, tokens[:, -1:], cache, stop_at_layer=hook_layer(hook_name) + 1)
            else:
                captured.clear()
                model(tokens, stop_at_layer=hook_layer(hook_name) + 1)
            acts = torch.cat(captured, dim=1)
    return Generation(tokens=tokens, activations=acts)


@torch.no_grad()
def generate_aligned(
    model: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    total_tokens: int,
    seeds: Sequence[int],
    *,
    sampling: SamplingConfig | None,
    hook_name: str | None = None,
    delta: Tensor | None = None,
    capture: bool = False,
    engine: str = "tl",
) -> Generation:
    """Grow every row's prompt (``prompts``: one token sequence per row, lengths may differ) to
    ``total_tokens`` in one KV-cache decode, steering each row by ``delta [batch, d_model]`` (or
    ``[d_model]``) at ``hook_name``.

    Every step feeds each row its token at the same position: the prompt's own while inside the
    prompt, else the one sampled at the previous step. So prompts of different lengths share one
    batch with no padding (their positions are the same), and a row's ``i``-th new token uses the
    same uniform as in :func:`generate` of its prompt alone: the tokens are :func:`generate`'s, up
    to the float rounding of another batch shape (a sampled token moves only if its uniform lies
    within that rounding of a bucket edge). Prompts are read one token per step, so this suits
    short prompts (as 01's): a long prompt costs one step per token instead of one forward.

    Returns tokens ``[batch, total_tokens]`` and, with ``capture``, the pre-steering activations at
    ``hook_name`` for every position ``[batch, total_tokens, d_model]`` (no host sync in the loop).
    ``engine``: ``tl`` decodes with TransformerLens's forward (the reference), ``static`` with our
    own step over the same weights (:mod:`saets_utils.steering.engine`: same rows, same uniforms).
    """
    batch = len(prompts)
    _check_rows(hook_name, delta, capture, seeds, batch)
    lens = [len(p) for p in prompts]
    if min(lens, default=1) < 1 or max(lens, default=0) >= total_tokens:
        raise ValueError(f"every prompt needs 1 to {total_tokens - 1} tokens (total_tokens={total_tokens}): {lens}")
    device = model.cfg.device
    tokens = torch.zeros(batch, total_tokens, dtype=torch.long)
    forced = torch.zeros(batch, total_tokens, dtype=torch.bool)
    u = torch.zeros(batch, total_tokens, dtype=torch.float64)  # u[r, pos]: the uniform that samples pos
    for r, (ids, seed) in enumerate(zip(prompts, seeds, strict=True)):
        tokens[r, : len(ids)] = torch.as_tensor(ids)
        forced[r, : len(ids)] = True
        u[r, len(ids) :] = row_uniforms([seed], total_tokens - len(ids))[0]
    tokens, forced, u = tokens.to(device), forced.to(device), u.to(device)
    if engine == "static":
        from saets_utils.steering.engine import decode_aligned

        out, acts = decode_aligned(
            model, tokens, forced, u, sampling=sampling, hook_name=hook_name, delta=delta, capture=capture
        )
        return Generation(tokens=out, activations=acts)
    if engine != "tl":
        raise ValueError(f"engine {engine!r}: use 'tl' (TransformerLens) or 'static'")
    captured: list[Tensor] = []
    cache = _new_cache(model, batch)
    with _steering(model, hook_name, delta, captured if capture else None):
        for t in range(total_tokens - 1):
            logits = _cached_forward(model, tokens[:, t : t + 1], cache)
            nxt = sample_from_logits(logits[:, -1, :], u[:, t + 1], sampling)
            tokens[:, t + 1] = torch.where(forced[:, t + 1], tokens[:, t + 1], nxt)
        acts = None
        if capture:
            assert hook_name is not None  # _check_rows
            _cached_forward(model, tokens[:, -1:], cache, stop_at_layer=hook_layer(hook_name) + 1)
            acts = torch.cat(captured, dim=1)
    return Generation(tokens=tokens, activations=acts)


def _check_rows(hook_name: str | None, delta: Tensor | None, capture: bool, seeds: Sequence[int], batch: int) -> None:
    """The arguments both generators share, checked before any forward."""
    if hook_name is None and (delta is not None or capture):
        raise ValueError("hook_name is required to steer or capture")
    if len(seeds) != batch:
        raise ValueError(f"need one seed per row: {len(seeds)} seeds for {batch} rows")


def _new_cache(model: HookedTransformer, batch: int):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)


def _cached_forward(model: HookedTransformer, step_in: Tensor, cache, stop_at_layer: int | None = None) -> Tensor:
    """``model(step_in)`` on the KV cache, with an explicit all-ones mask: otherwise TransformerLens
    treats any sampled token equal to the pad id as padding and masks it from every later position."""
    return model(step_in, past_kv_cache=cache, attention_mask=torch.ones_like(step_in), stop_at_layer=stop_at_layer)


@contextmanager
def _steering(
    model: HookedTransformer, hook_name: str | None, delta: Tensor | None, captured: list[Tensor] | None
) -> Iterator[None]:
    """:func:`~saets_utils.steering.hooks.steering_hook` at ``hook_name``, or nothing without one."""
    if hook_name is None:
        yield
        return
    with steering_hook(model, hook_name, delta, captured):
        yield
