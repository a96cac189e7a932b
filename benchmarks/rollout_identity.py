#!/usr/bin/env python
"""Are 01's rollouts unchanged by the faster decoding? Tokens, old way against new way.

For blocks of the params' vectors at the scales 01's calibration gives them, the steered rollouts
of ``measure_effects`` (rows (prompt, vector, sample), each row's seed as 01 seeds it) are drawn

- **new**: as ``measure_effects`` draws them now, one ``generate_aligned`` call for prompts of every
  length, on the model as ``load_model`` prepares it (grouped-query attention without repeating the
  KV cache);
- **old**: as it drew them before, one ``generate`` call per group of equally long prompts, on
  TransformerLens's own attention (``stock_attention``).

Both compute the same numbers in another order (float rounding), so a sampled token can only move
where its uniform lies within that rounding of a bucket edge. Reported: rows whose tokens differ,
and the largest difference of the captured activations on the rows that agree (relative to their
largest magnitude).

    OMP_NUM_THREADS=2 python benchmarks/rollout_identity.py --sae-dir <demo SAE folder> --blocks 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import effects_throughput as bench  # noqa: E402
import torch  # noqa: E402

from saets_utils.config import load_config  # noqa: E402
from saets_utils.effects.calibration import calibrate, resid_at_hook, scale_hint, steered_losses  # noqa: E402
from saets_utils.models.grouped_attention import stock_attention  # noqa: E402
from saets_utils.steering.generation import generate, generate_aligned  # noqa: E402
from saets_utils.steering.hooks import steering_delta  # noqa: E402


def old_rollouts(s, prompts: list[tuple[int, ...]], seeds: list[int], delta: torch.Tensor):
    """``generate`` per group of equally long prompts on TransformerLens's attention, rows put back in order."""
    tokens = torch.zeros(len(prompts), s.spec.total_tokens, dtype=torch.long)
    acts = torch.zeros(len(prompts), s.spec.total_tokens, s.model.cfg.d_model)
    with stock_attention(s.model):
        for length in sorted({len(p) for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            g = generate(
                s.model,
                torch.tensor([prompts[i] for i in idx]),
                s.spec.total_tokens - length,
                [seeds[i] for i in idx],
                s.spec.sampling,
                s.hook,
                delta[idx],
                capture=True,
            )
            tokens[idx], acts[idx] = g.tokens.cpu(), g.activations.float().cpu()
    return tokens, acts


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/demo.yaml")
    ap.add_argument("--sae-dir", default=None, help="a trained SAE folder (as effects_throughput.py)")
    ap.add_argument("--blocks", type=int, default=2, help="blocks of vectors_per_batch vectors, from the first")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    k = load_config(args.params).effects.vectors_per_batch
    bargs = bench.parse_args(
        ["--params", args.params, "--ref-vectors", "1", "--fast-vectors", str(args.blocks * k)]
        + (["--sae-dir", args.sae_dir] if args.sae_dir else [])
        + (["--threads", str(args.threads)] if args.threads else [])
    )
    s = bench.smollm_setup(bargs)
    sp = s.spec
    resid = resid_at_hook(s.model, s.hook, s.loss_tokens)
    unsteered = float(steered_losses(s.model, s.hook, s.loss_tokens, resid, torch.zeros(1, s.model.cfg.d_model))[0])
    hint = scale_hint(s.model, s.hook, s.loss_tokens, resid, s.vectors[:4], s.grid, s.target, unsteered)
    rows_total = differing = 0
    worst = 0.0
    t_new = t_old = 0.0
    for b in range(args.blocks):
        ids = list(range(b * k, min((b + 1) * k, s.vectors.shape[0])))
        vecs = s.vectors[ids]
        cal = calibrate(s.model, s.hook, s.loss_tokens, resid, vecs, s.calibration, s.grid, s.target, unsteered, hint)
        scales = cal.scales.nan_to_num(0.0)
        rows = [
            (p, j, smp) for p in range(len(sp.prompts)) for j in range(len(ids)) for smp in range(sp.samples_per_prompt)
        ]
        prompts = [sp.prompts[p] for p, _, _ in rows]
        seeds = [sp.steered_seed(s.seed, int(s.vector_ids[ids[j]]), p, smp) for p, j, smp in rows]
        delta = steering_delta(vecs, scales)[[j for _, j, _ in rows]]
        t0 = time.perf_counter()
        new = generate_aligned(s.model, prompts, sp.total_tokens, seeds, sp.sampling, s.hook, delta, capture=True)
        t1 = time.perf_counter()
        old_tokens, old_acts = old_rollouts(s, prompts, seeds, delta)
        t_new, t_old = t_new + t1 - t0, t_old + time.perf_counter() - t1
        diff = (new.tokens.cpu() != old_tokens).any(1)
        same = ~diff
        new_acts = new.activations.float().cpu()
        rel = float((new_acts[same] - old_acts[same]).abs().max() / old_acts[same].abs().max()) if same.any() else 0.0
        worst = max(worst, rel)
        rows_total += len(rows)
        differing += int(diff.sum())
        print(
            f"block {b}: {int(diff.sum())} of {len(rows)} rows differ; activations on the others: max rel diff {rel:.2e}"
        )
    out = {
        "params": args.params,
        "blocks": args.blocks,
        "rows": rows_total,
        "tokens": rows_total * sp.total_tokens,
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
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
