"""Are 01's rollouts unchanged by the faster decoding? Tokens, old way against new way.

For blocks of the params' vectors at the scales 01's calibration gives them, the steered rollouts
of ``measure_effects`` (rows (prompt, vector, sample), each row's seed as 01 seeds it) are drawn

- **new**: as ``measure_effects`` draws them now, one ``generate_aligned`` call for prompts of every
  length, on the model as ``load_model`` prepares it (grouped-query attention without repeating the
  KV cache), with the engine 01 uses (``effects.engine``; ``auto``: the static engine on the CPU);
- **old**: as it drew them before, one ``generate`` call per group of equally long prompts, on
  TransformerLens's own attention (``stock_attention``); or with ``--against aligned``, as 01 drew
  them before ``effects.engine: auto``: ``generate_aligned`` on TransformerLens (``engine="tl"``).

Both compute the same numbers in another order (float rounding), so a sampled token can only move
where its uniform lies within that rounding of a bucket edge. Reported: rows whose tokens differ,
and the largest difference of the captured activations on the rows that agree (relative to their
largest magnitude).

    OMP_NUM_THREADS=2 python -m benchmarks.rollout_identity --sae-dir <demo SAE folder> --blocks 2
    python -m benchmarks.rollout_identity --smoke     # the tiny model and SAE, seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.output import write_json
from benchmarks.throughput.our_path import calibrate_block, worker_context
from benchmarks.throughput.setup import SMOKE_OVERRIDES, Setup, params_setup
from benchmarks.timing import Phases
from saets_utils.config import load_config
from saets_utils.models.grouped_attention import stock_attention
from saets_utils.steering.generation import generate, generate_aligned
from saets_utils.steering.hooks import steering_delta


def old_rollouts(s: Setup, prompts: list[tuple[int, ...]], seeds: list[int], delta: torch.Tensor):
    """``generate`` per group of equally long prompts on TransformerLens's attention, rows put back in order."""
    tokens = torch.zeros(len(prompts), s.spec.total_tokens, dtype=torch.long)
    acts = torch.zeros(len(prompts), s.spec.total_tokens, s.model.cfg.d_model)
    with stock_attention(s.model):
        for length in sorted({len(p) for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            g = generate(
                model=s.model,
                prompt_tokens=torch.tensor([prompts[i] for i in idx]),
                new_tokens=s.spec.total_tokens - length,
                seeds=[seeds[i] for i in idx],
                sampling=s.spec.sampling,
                hook_name=s.hook,
                delta=delta[idx],
                capture=True,
            )
            tokens[idx], acts[idx] = g.tokens.cpu(), g.activations.float().cpu()
    return tokens, acts


def aligned_rollouts(s: Setup, prompts: list[tuple[int, ...]], seeds: list[int], delta: torch.Tensor):
    """``generate_aligned`` on TransformerLens (``engine="tl"``): 01's decoding before the static engine."""
    g = generate_aligned(
        model=s.model,
        prompts=prompts,
        total_tokens=s.spec.total_tokens,
        seeds=seeds,
        sampling=s.spec.sampling,
        hook_name=s.hook,
        delta=delta,
        capture=True,
        engine="tl",
    )
    assert g.activations is not None
    return g.tokens.cpu(), g.activations.float().cpu()


def block_rows(s: Setup, ids: list[int], scales: torch.Tensor) -> tuple[list, list[int], torch.Tensor]:
    """``measure_effects``'s rows (prompt, vector, sample) for vectors ``ids`` at ``scales``: each
    row's prompt, seed and steering delta."""
    sp = s.spec
    rows = [(p, j, n) for p in range(len(sp.prompts)) for j in range(len(ids)) for n in range(sp.samples_per_prompt)]
    prompts = [sp.prompts[p] for p, _, _ in rows]
    seeds = [sp.steered_seed(s.seed, int(s.vector_ids[ids[j]]), p, n) for p, j, n in rows]
    delta = steering_delta(s.vectors[ids], scales)[[j for _, j, _ in rows]]
    return prompts, seeds, delta


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--sae-dir", default=None, help="a trained SAE folder (as effects_throughput)")
    ap.add_argument("--blocks", type=int, default=2, help="blocks of vectors_per_batch vectors, from the first")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="the tiny model and SAE (seconds)")
    ap.add_argument(
        "--against",
        choices=("generate", "aligned"),
        default="generate",
        help="the old decoding: per-length generate on TransformerLens's attention, or generate_aligned on TransformerLens",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    k = (
        SMOKE_OVERRIDES["effects"]["vectors_per_batch"]
        if args.smoke
        else load_config(args.params).effects.vectors_per_batch
    )
    s = params_setup(params=args.params, vectors=args.blocks * k, smoke=args.smoke, sae_dir=args.sae_dir)
    sp = s.spec
    ctx = worker_context(s, Phases(s.device))
    rows_total = differing = 0
    worst = t_new = t_old = 0.0
    for b in range(args.blocks):
        ids = list(range(b * k, min((b + 1) * k, s.vectors.shape[0])))
        cal = calibrate_block(s, ids, ctx)
        prompts, seeds, delta = block_rows(s, ids, cal.scales.nan_to_num(0.0))
        t0 = time.perf_counter()
        new = generate_aligned(
            model=s.model,
            prompts=prompts,
            total_tokens=sp.total_tokens,
            seeds=seeds,
            sampling=sp.sampling,
            hook_name=s.hook,
            delta=delta,
            capture=True,
            engine=sp.engine,
        )
        t1 = time.perf_counter()
        old = old_rollouts if args.against == "generate" else aligned_rollouts
        old_tokens, old_acts = old(s, prompts, seeds, delta)
        t_new, t_old = t_new + t1 - t0, t_old + time.perf_counter() - t1
        diff = (new.tokens.cpu() != old_tokens).any(1)
        same = ~diff
        new_acts = new.activations.float().cpu()
        rel = float((new_acts[same] - old_acts[same]).abs().max() / old_acts[same].abs().max()) if same.any() else 0.0
        worst = max(worst, rel)
        rows_total += len(prompts)
        differing += int(diff.sum())
        print(
            f"block {b}: {int(diff.sum())} of {len(prompts)} rows differ; activations on the others: max rel diff {rel:.2e}"
        )
    out = {
        "params": "--smoke" if args.smoke else args.params,
        "blocks": args.blocks,
        "rows": rows_total,
        "tokens": rows_total * sp.total_tokens,
        "engine": sp.engine,
        "against": args.against,
        "differing_rows": differing,
        "max_rel_activation_diff": worst,
        "seconds_new": t_new,
        "seconds_old": t_old,
        "threads": torch.get_num_threads(),
    }
    print(
        f"rollouts: {differing} of {rows_total} rows ({rows_total * sp.total_tokens} tokens) differ between the new and the "
        f"old decoding; activations within {worst:.1e} (relative); new {t_new:.1f} s, old {t_old:.1f} s "
        f"({t_old / t_new:.2f}x)"
    )
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
