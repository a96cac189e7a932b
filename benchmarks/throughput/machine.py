"""What the machine gives the model, apart from either path: a raw batched forward, the CUDA warm-up,
the stock TransformerLens setup of a model, and ``--profile``'s torch.profiler summary."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.throughput.setup import Setup
from benchmarks.timing import Phases
from saets_utils.effects.calibration import steered_losses
from saets_utils.effects.measure import encode_positions
from saets_utils.models.grouped_attention import stock_attention
from saets_utils.models.weight_layout import stock_layout
from saets_utils.steering.generation import generate_aligned
from saets_utils.steering.hooks import steering_hook


@contextmanager
def stock_transformer_lens(model) -> Iterator[None]:
    """Within the block, ``model`` runs as TransformerLens itself sets it up: its weight layout (a
    copy of every projection weight per forward) and its grouped-query attention (the KV cache
    repeated per query head)."""
    with stock_layout(model), stock_attention(model):
        yield


@torch.no_grad()
def raw_forward_tokens_per_s(s: Setup, rows: int, seq: int, reps: int) -> float:
    """Tokens/s of a plain batched forward ``model(tokens [rows, seq])`` (logits, no hooks, no cache):
    what the machine gives this model at this batch shape, dtype and thread count."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, s.model.cfg.d_vocab, (rows, seq), generator=g).to(s.device)
    p = Phases(s.device)
    s.model(tokens[:, :2])  # warm-up
    with p.phase("raw"):
        for _ in range(reps):
            s.model(tokens)
    return rows * seq * reps / p.wall["raw"]


def _aligned(s: Setup, prompts: list, total: int, delta: torch.Tensor):
    return generate_aligned(
        model=s.model,
        prompts=prompts,
        total_tokens=total,
        seeds=list(range(len(prompts))),
        sampling=s.spec.sampling,
        hook_name=s.hook,
        delta=delta,
        capture=True,
    )


@torch.no_grad()
def warm(s: Setup) -> None:
    """A tiny run of each path's kernels (2 rows, 2 new tokens), results discarded: CUDA/cuBLAS
    initialisation and first-call costs stay out of the timings."""
    v = s.vectors[0]
    with steering_hook(s.model, s.hook, 20.0 * v):
        s.model.generate(
            torch.tensor([s.spec.prompts[-1]] * 2, device=s.device),
            max_new_tokens=2,
            top_k=s.spec.sampling.top_k,
            top_p=s.spec.sampling.top_p,
            stop_at_eos=False,
            use_past_kv_cache=True,
            verbose=False,
        )
    prompts = [s.spec.prompts[0], s.spec.prompts[-1]]
    g = _aligned(s, prompts, max(map(len, prompts)) + 2, (20.0 * v)[None].repeat(2, 1))
    encode_positions(s.sae, g.activations, s.spec.include_first_position)


@torch.no_grad()
def profile_block(s: Setup, rows: list[int], resid: torch.Tensor, steps: int = 4) -> list[str]:
    """torch.profiler's top operators over one calibration evaluation of vectors ``rows`` and a short
    ``generate_aligned`` call (one row per sample of those vectors, cycling through the prompts, until
    ``steps`` tokens after the longest: profiling a whole block records millions of events); on CUDA
    also the host syncs that torch.cuda's sync debug mode counts in that call."""
    cuda = s.device.startswith("cuda")
    n = len(rows) * s.spec.samples_per_prompt
    prompts = [s.spec.prompts[i % len(s.spec.prompts)] for i in range(n)]
    total = min(s.spec.total_tokens, max(map(len, prompts)) + steps)
    delta = (20.0 * s.vectors[rows[0]])[None].repeat(n, 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with record_function("calibration evaluation"):
            steered_losses(s.model, s.hook, s.loss_tokens, resid, s.vectors[rows] * 20.0)
        with record_function("generate_aligned"):
            _aligned(s, prompts, total, delta)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    lines = [
        f"--profile: one calibration evaluation of {len(rows)} vectors + generate_aligned({n} rows, {total} tokens); "
        f"by {key}"
    ]
    lines += prof.key_averages().table(sort_by=key, row_limit=15).splitlines()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _aligned(s, prompts, total, delta)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        msgs = [str(w.message).splitlines()[0] for w in caught]
        lines.append(f"host syncs inside one generate_aligned call ({total} tokens, {n} rows): {len(msgs)}")
        lines += [f"    {msgs.count(m)} x {m[:160]}" for m in sorted(set(msgs))[:5]]
    return lines
