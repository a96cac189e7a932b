"""Throughput of notebook 01's effects measurement: the reference loop vs our batched path.

One run, one model, one SAE, one set of effect settings, two ways of measuring the same vectors:

(a) reference: one vector at a time, as the SAE-TS reference code does it: a scale sweep of full
    forwards, then one TransformerLens ``generate`` call per prompt, the rollouts re-run to the hook
    and SAE-encoded (``benchmarks.throughput.reference_loop``, which calls
    ``saets_utils.effects.reference``).
(b) ours: ``calibrate`` + ``measure_effects`` on blocks of ``vectors_per_batch`` vectors, as 01 calls
    them, without writing a shard (``benchmarks.throughput.our_path``).
(a') the reference loop again on a stock TransformerLens model (``--stock-ref-vectors``), and (b')
    our first block on it (``--stock-fast-block``): what our weight layout and grouped-query
    attention save.

(a) and (b) alternate, so machine-load drift hits both alike; the stock runs come after them. Before
timing, one block of (b) and one vector of (a) run untimed (``--no-warmup`` skips this). Per-run
setup (loss-chunk activations at the hook, the unsteered loss, the secant's start) is timed
separately and not counted in vectors/s. It also times a raw batched forward of the same model at
the shape of our average generate call. ``--profile`` adds torch.profiler's top operators.

    python -m benchmarks.effects_throughput --smoke          # the tiny model, every option, seconds
    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m benchmarks.effects_throughput --ref-vectors 2 --fast-vectors 32
    python -m benchmarks.effects_throughput --gemma-shaped --device cuda --ref-vectors 3 --fast-vectors 64
    python -m benchmarks.effects_throughput --gemma-shaped --smoke   # that code path on a CPU (2 layers)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from benchmarks.output import write_json
from benchmarks.throughput import our_path, reference_loop
from benchmarks.throughput.gemma import gemma_setup
from benchmarks.throughput.machine import (
    profile_block,
    raw_forward_tokens_per_s,
    stock_transformer_lens,
    warm,
)
from benchmarks.throughput.our_path import our_block, worker_context
from benchmarks.throughput.reference_loop import reference_sweep, reference_vector, unsteered_loss
from benchmarks.throughput.report import Measured, report, result
from benchmarks.throughput.setup import Setup, params_setup
from benchmarks.throughput.work import ModelShape
from benchmarks.timing import Phases
from saets_utils.effects.calibration import loss_target_value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--params", default="params/demo.yaml", help="run whose model, SAE and effect settings to use")
    add(
        "--fallback-sae-params",
        default="params/test.yaml",
        help="SAE settings to use when --params's SAE is not cached (effect settings stay --params's)",
    )
    add("--sae-dir", default=None, help="use this saved sae_lens SAE folder (its hook) instead")
    add("--random-sae-at", default=None, metavar="HOOK", help="a seeded random TopK SAE of the params' shape at HOOK")
    add("--allow-train", action="store_true", help="train --params's SAE if not cached (minutes)")
    add("--ref-vectors", type=int, default=2, help="vectors measured by the reference loop (a)")
    add("--stock-ref-vectors", type=int, default=1, help="vectors of the reference loop on a stock model (a')")
    add(
        "--ref-calibration-vectors",
        type=int,
        default=0,
        help="also time the reference's sweep alone on the first N vectors, on our model and on the stock one "
        "(N = --fast-vectors: the calibration ratio over the same vectors as ours)",
    )
    add("--stock-fast-block", action="store_true", help="also time our first block on a stock model (b')")
    add("--fast-vectors", type=int, default=32, help="vectors measured by our path (b)")
    add("--vectors-per-batch", type=int, default=None, help="block size of (b) (default: params)")
    add("--device", default=None, help="cpu / cuda[:N] (default: params' device, or cuda if available)")
    add("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype (default: params)")
    add("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add("--max-prompts", type=int, default=None, help="use only the first N prompts")
    add("--gemma-shaped", action="store_true", help="Gemma-2-2B config with random weights, reference settings")
    add(
        "--gemma-target-scale",
        type=float,
        default=100.0,
        help="with --gemma-shaped: the relative loss target random vectors reach near this scale (0: +0.5)",
    )
    add("--smoke", action="store_true", help="the tiny model (or --gemma-shaped at 2 layers), every option, seconds")
    add("--tiny-check", dest="smoke", action="store_true", help="the same as --smoke")
    add("--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s of the device (H100/H200 bf16)")
    add("--json", default=None, help="also write the results to this JSON file")
    add(
        "--no-warmup", dest="warmup", action="store_false", help="skip the untimed first block of (b) and vector of (a)"
    )
    add("--calibration", choices=["secant", "sweep"], default=None, help="(b)'s scale search (default: the params')")
    add("--raw-reps", type=int, default=3, help="repetitions of the raw batched forward timed")
    add("--profile", action="store_true", help="torch.profiler summary of one more block; on CUDA count host syncs")
    args = ap.parse_args(argv)
    if args.smoke:  # every option at the smallest sizes
        args.ref_vectors, args.fast_vectors = min(args.ref_vectors, 1), min(args.fast_vectors, 4)
        args.stock_ref_vectors = min(args.stock_ref_vectors, 1)
        args.vectors_per_batch = args.vectors_per_batch or 2
        args.ref_calibration_vectors, args.stock_fast_block, args.profile = args.fast_vectors, True, True
        args.raw_reps = 1
    if args.ref_calibration_vectors not in (0, args.fast_vectors):
        raise SystemExit(
            f"--ref-calibration-vectors must be 0 or --fast-vectors ({args.fast_vectors}): the calibration ratio "
            "compares the same vectors"
        )
    return args


def make_setup(args: argparse.Namespace) -> Setup:
    n = max(args.fast_vectors, args.ref_vectors)
    if args.gemma_shaped:
        s = gemma_setup(
            vectors=n,
            tiny=args.smoke,
            device=args.device,
            dtype=args.dtype,
            target_scale=args.gemma_target_scale,
            max_prompts=args.max_prompts,
            vectors_per_batch=args.vectors_per_batch,
        )
    else:
        s = params_setup(
            params=args.params,
            vectors=n,
            smoke=args.smoke,
            sae_dir=args.sae_dir,
            random_sae_at=args.random_sae_at,
            allow_train=args.allow_train,
            fallback_sae_params=args.fallback_sae_params,
            device=args.device,
            dtype=args.dtype,
            max_prompts=args.max_prompts,
            vectors_per_batch=args.vectors_per_batch,
        )
    if args.calibration:
        s.calibration = s.calibration.model_copy(update={"method": args.calibration})
    return s


@contextlib.contextmanager
def _per_vector(p: Phases, phases: tuple[str, str], n: int, into: list):
    """Append ``[s/vector, calibration s/vector, n]`` of the ``n`` vectors timed inside the block."""
    t0, c0 = p.seconds(*phases), p.seconds(phases[0])
    yield
    into.append([(p.seconds(*phases) - t0) / n, (p.seconds(phases[0]) - c0) / n, n])


def run_interleaved(m: Measured, blocks: list[list[int]], warmup: bool) -> None:
    """(a) one vector, then (b) one block, and so on; after an untimed vector and block if ``warmup``
    (a path's first call at its shapes pays one-time costs: measured 1.6x slower on the CPU)."""
    s, shape = m.s, m.shape
    if warmup:
        scratch = Phases(s.device)
        with m.once.phase("warm-up: one untimed block of (b)"):
            our_block(s, blocks[0], m.ctx, scratch, shape)
        with m.once.phase("warm-up: one untimed vector of (a)"):
            torch.manual_seed(s.seed)
            reference_vector(s, s.vectors[0], m.target_ref, scratch, shape)
    m.fast_scales = torch.full((m.n_fast,), float("nan"))
    m.fast_status = [""] * m.n_fast
    m.fast_effects = torch.full((m.n_fast, s.sae.cfg.d_sae), float("nan"))
    torch.manual_seed(s.seed)  # TransformerLens samples from the global generator
    for i in range(max(len(blocks), m.n_ref)):
        if i < m.n_ref:
            t0 = time.perf_counter()
            with _per_vector(m.ref, reference_loop.PHASES, 1, m.per_vector["ref"]):
                scale, status, effect = reference_vector(s, s.vectors[i], m.target_ref, m.ref, shape)
            m.ref_scales.append(scale)
            m.ref_status.append(status)
            m.ref_effects.append(effect)
            vid = int(s.vector_ids[i])
            print(f"  (a) vector {vid}: scale {scale:.2f} ({status}) in {time.perf_counter() - t0:.1f} s", flush=True)
        if i < len(blocks):
            rows = blocks[i]
            t0 = time.perf_counter()
            with _per_vector(m.fast, our_path.PHASES, len(rows), m.per_vector["fast"]):
                cal, effects = our_block(s, rows, m.ctx, m.fast, shape)
            m.fast_scales[rows] = cal.scales.float().cpu()
            for j, r in enumerate(rows):
                m.fast_status[r] = cal.status[j]
            m.fast_effects[rows] = effects
            print(f"  (b) block of {len(rows)} vectors in {time.perf_counter() - t0:.1f} s", flush=True)


def run_after(m: Measured, blocks: list[list[int]], raw_reps: int, profile: bool) -> None:
    """What runs after the interleaved timings: the raw forward, the stock model's runs (interleaved,
    their per-forward weight copies slowed our next block by a quarter), the reference's sweep alone
    on our vectors, and the profile."""
    s, shape = m.s, m.shape
    rows = max(1, round(m.fast.count["gen_rows"] / max(m.fast.count["gen_calls"], 1)))
    m.raw_batch = (rows, s.spec.total_tokens)
    m.raw_tps = raw_forward_tokens_per_s(s, rows, s.spec.total_tokens, raw_reps)
    if m.n_stock_fast:
        t0 = time.perf_counter()
        with stock_transformer_lens(s.model):
            our_block(s, blocks[0], m.ctx, m.stock_fast, shape)
        print(f"  (b') block of {m.n_stock_fast} vectors on stock TransformerLens in {time.perf_counter() - t0:.1f} s")
    torch.manual_seed(s.seed)
    for i in range(m.n_stock):
        t0 = time.perf_counter()
        with stock_transformer_lens(s.model), _per_vector(m.stock, reference_loop.PHASES, 1, m.per_vector["stock_ref"]):
            reference_vector(s, s.vectors[i], m.target_ref, m.stock, shape)
        print(f"  (a') vector {int(s.vector_ids[i])} on stock TransformerLens in {time.perf_counter() - t0:.1f} s")
    # The sweep's cost varies by vector (grid points up to the crossing): compare on the same vectors.
    for kind, ctx in (("ref_calibration", contextlib.nullcontext), ("stock_ref_calibration", stock_transformer_lens)):
        if not m.ref_calibration_vectors:
            break
        scratch = Phases(s.device)
        with ctx(s.model):
            for i in range(m.ref_calibration_vectors):
                t0 = time.perf_counter()
                reference_sweep(s, s.vectors[i], m.target_ref, scratch, shape)
                m.per_vector[kind].append(time.perf_counter() - t0)
        m.calibration_alone[kind] = sum(m.per_vector[kind]) / len(m.per_vector[kind])
        print(f"  {kind}: {m.ref_calibration_vectors} vectors, {m.calibration_alone[kind]:.3f} s/vector", flush=True)
    if profile:
        m.profile_lines = profile_block(s, blocks[0], m.ctx.resid)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    s = make_setup(args)
    load_s = time.perf_counter() - t_start
    once = Phases(s.device)
    ctx = worker_context(s, once)
    with once.phase("ref: unsteered loss (full forward)"):
        unsteered_ref = unsteered_loss(s)
    if s.device.startswith("cuda"):  # CUDA/cuBLAS initialisation and first-call costs, outside the timings
        with once.phase("gpu warm-up (both generate paths, SAE encode)"):
            warm(s)
    k = s.vectors_per_batch
    blocks = [list(range(i, min(i + k, args.fast_vectors))) for i in range(0, args.fast_vectors, k)]
    m = Measured(
        s=s,
        shape=ModelShape.of(s.model, s.sae, s.hook),
        ctx=ctx,
        unsteered_ref=unsteered_ref,
        target_ref=loss_target_value(s.target, unsteered_ref),
        load_s=load_s,
        once=once,
        ref=Phases(s.device),
        fast=Phases(s.device),
        stock=Phases(s.device),
        stock_fast=Phases(s.device),
        n_ref=args.ref_vectors,
        n_fast=args.fast_vectors,
        n_stock=args.stock_ref_vectors,
        n_stock_fast=len(blocks[0]) if args.stock_fast_block else 0,
        ref_calibration_vectors=args.ref_calibration_vectors,
        peak_tflops=args.peak_tflops,
    )
    run_interleaved(m, blocks, args.warmup)
    run_after(m, blocks, args.raw_reps, args.profile)
    lines, r, a = report(m, time.perf_counter() - t_start)
    print("\n".join(lines), flush=True)
    out = result(m, lines, r, a, sys.argv[1:] if argv is None else list(argv))
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
