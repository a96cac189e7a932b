"""The numbers of a throughput run: ratios of the two paths measured side by side, the printed
report, and the JSON result (``--json``; ``python -m benchmarks.ratio_interval`` pools its
``per_vector_s`` over runs)."""

from __future__ import annotations

import os
import platform
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.throughput import our_path, reference_loop
from benchmarks.throughput.our_path import WorkerContext
from benchmarks.throughput.setup import Setup
from benchmarks.throughput.work import ModelShape
from benchmarks.timing import Phases, rate


@dataclass
class Measured:
    """Everything one run timed and computed. ``per_vector`` holds, per vector of (a) and (a') and per
    block of (b), ``[s/vector, calibration s/vector, vectors]``, and the seconds per vector of the
    reference's sweep alone (``ref_calibration``, ``stock_ref_calibration``)."""

    s: Setup
    shape: ModelShape
    ctx: WorkerContext
    unsteered_ref: float
    target_ref: float
    load_s: float
    once: Phases
    ref: Phases
    fast: Phases
    stock: Phases
    stock_fast: Phases
    n_ref: int
    n_fast: int
    n_stock: int
    n_stock_fast: int
    ref_calibration_vectors: int
    peak_tflops: float
    per_vector: dict[str, list] = field(
        default_factory=lambda: {
            k: [] for k in ("ref", "fast", "stock_ref", "ref_calibration", "stock_ref_calibration")
        }
    )
    calibration_alone: dict[str, float] = field(default_factory=dict)
    ref_scales: list[float] = field(default_factory=list)
    ref_status: list[str] = field(default_factory=list)
    ref_effects: list[torch.Tensor] = field(default_factory=list)
    fast_scales: torch.Tensor | None = None
    fast_status: list[str] = field(default_factory=list)
    fast_effects: torch.Tensor | None = None
    raw_tps: float = float("nan")
    raw_batch: tuple[int, int] = (0, 0)
    profile_lines: list[str] = field(default_factory=list)


def ratios(m: Measured) -> dict[str, Any]:
    """Seconds, rates and ratios of the paths; (b)/(a) > 1 means ours is faster."""
    ref_s, fast_s = m.ref.seconds(*reference_loop.PHASES), m.fast.seconds(*our_path.PHASES)
    ref_cal, fast_cal = m.ref.seconds("ref.calibration"), m.fast.seconds("fast.calibration")
    fast_eff = m.fast.seconds("fast.measure_effects")
    ref_vps, fast_vps = rate(m.n_ref, ref_s), rate(m.n_fast, fast_s)
    stock_s = m.stock.seconds(*reference_loop.PHASES)
    nan = float("nan")
    out = {
        "ref_wall": ref_s,
        "ref_cpu": m.ref.cpu_seconds(*reference_loop.PHASES),
        "fast_wall": fast_s,
        "fast_cpu": m.fast.cpu_seconds(*our_path.PHASES),
        "ref_vps": ref_vps,
        "fast_vps": fast_vps,
        "stock_wall": stock_s,
        "fast_cal_per_vector": fast_cal / m.n_fast,
    }
    out["ratio_wall"] = fast_vps / ref_vps
    out["ratio_cpu"] = rate(m.n_fast, out["fast_cpu"]) / rate(m.n_ref, out["ref_cpu"])
    out["ratio_calibration"] = (ref_cal / m.n_ref) / (fast_cal / m.n_fast)
    out["ratio_rollouts"] = ((ref_s - ref_cal) / m.n_ref) / (fast_eff / m.n_fast)
    out["ratio_wall_vs_stock_ref"] = fast_vps / rate(m.n_stock, stock_s) if stock_s else nan
    out["ratio_calibration_vs_stock_ref"] = (
        (m.stock.seconds("ref.calibration") / m.n_stock) / (fast_cal / m.n_fast) if stock_s else nan
    )
    out["effects_tps"] = m.fast.count["rollout_tokens"] / max(fast_eff, 1e-9)
    out["all_tps"] = m.fast.count["rollout_tokens"] / max(fast_s, 1e-9)
    out["chunk_evals"] = m.fast.count["chunk_evals"] / m.s.loss_tokens.shape[0] / m.n_fast
    out["ref_flops"], out["fast_flops"] = m.shape.flops(m.ref.count), m.shape.flops(m.fast.count)
    return out


def agreement(m: Measured) -> dict[str, Any]:
    """The scales both paths find for the vectors (a) measured, and the cosines of their effects
    (only roughly 1: the paths sample with different RNGs)."""
    assert m.fast_scales is not None and m.fast_effects is not None
    common = list(range(m.n_ref))
    rs = torch.tensor(m.ref_scales, dtype=torch.float64)
    fs = m.fast_scales[common].double()
    both = torch.isfinite(rs) & torch.isfinite(fs)
    cos = []
    for j, r in enumerate(common):
        a, b = m.ref_effects[j], m.fast_effects[r]
        if torch.isfinite(a).all() and torch.isfinite(b).all():
            cos.append(float(torch.nn.functional.cosine_similarity(a[None], b[None])[0]))
    return {
        "common": common,
        "max_abs_scale_diff": float((rs[both] - fs[both]).abs().max()) if both.any() else float("nan"),
        "fast_scales_same_vectors": fs.tolist(),
        "effect_cosines": cos,
    }


def _settings_lines(m: Measured) -> list[str]:
    s, sp, shape = m.s, m.s.spec, m.shape
    lines = [f"{key:>16}: {val}" for key, val in s.label.items()]
    lines += [
        f"{'hook':>16}: {s.hook} (layer {shape.hook_layer} of {shape.n_layers})",
        f"{'prompts':>16}: {len(sp.prompts)} (token lengths {[len(p) for p in sp.prompts]})",
        f"{'samples/prompt':>16}: {sp.samples_per_prompt}  -> {len(sp.prompts) * sp.samples_per_prompt} rollouts/vector",
        f"{'total tokens':>16}: {sp.total_tokens} (prompt included); include_first_position={sp.include_first_position}",
        f"{'sampling':>16}: top_k {sp.sampling.top_k}, top_p {sp.sampling.top_p}, T {sp.sampling.temperature}",
        f"{'scale grid':>16}: {s.grid[0]:g}..{s.grid[-1]:g} step {s.grid[1] - s.grid[0]:g} ({len(s.grid)} points)",
        f"{'loss chunks':>16}: {s.loss_tokens.shape[0]} x {s.loss_tokens.shape[1]} tokens; target {s.target.kind} "
        f"{s.target.value:+g} -> {m.target_ref:.4f} (unsteered: full fwd {m.unsteered_ref:.5f}, from hook "
        f"{m.ctx.unsteered_loss:.5f})",
        f"{'block size (b)':>16}: {s.vectors_per_batch} vectors -> {s.vectors_per_batch * sp.samples_per_prompt} "
        "generation rows per prompt",
        f"{'device':>16}: {s.device}; torch {torch.__version__}; threads {torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}); cpus {os.cpu_count()}; "
        f"{platform.processor() or platform.machine()}",
    ]
    if s.device.startswith("cuda"):
        lines.append(f"{'gpu':>16}: {torch.cuda.get_device_name()}")
    with suppress(OSError):
        lines.append(f"{'load average':>16}: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (at the end of the run)")
    lines.append(
        f"{'non-emb params':>16}: {shape.n_params / 1e6:.1f} M (blocks {shape.n_layers} x "
        f"{shape.block_params / 1e6:.2f} M + unembed {shape.unembed_params / 1e6:.1f} M); SAE enc "
        f"{shape.sae_enc_params / 1e6:.1f} M"
    )
    return lines


def _phase_lines(m: Measured, r: dict[str, Any]) -> list[str]:
    ref, fast, n_ref, n_fast = m.ref, m.fast, max(m.n_ref, 1), m.n_fast
    rerun = ref.seconds("ref.effect") - ref.seconds("ref.generate")
    ref_rows = [
        ("calibration (full-forward sweep)", ref.seconds("ref.calibration")),
        ("generate (TransformerLens)", ref.seconds("ref.generate")),
        ("re-run to hook + SAE encode", rerun),
    ]
    lines = [
        f"(a) reference: {m.n_ref} vectors in {r['ref_wall']:.1f} s wall ({r['ref_cpu']:.1f} s CPU) "
        f"-> {r['ref_vps']:.4f} vectors/s ({r['ref_wall'] / n_ref:.2f} s/vector)"
    ]
    lines += [f"      {n:<34} {t / n_ref:8.3f} s/vector  ({100 * t / r['ref_wall']:5.1f}%)" for n, t in ref_rows]
    lines.append(f"      grid points (full forwards) per vector: {ref.count['grid_points'] / n_ref:.2f}")
    lines.append(
        f"(b) ours:      {m.n_fast} vectors in {r['fast_wall']:.1f} s wall ({r['fast_cpu']:.1f} s CPU) "
        f"-> {r['fast_vps']:.4f} vectors/s ({r['fast_wall'] / n_fast:.3f} s/vector)"
    )
    for name, label in (("fast.calibration", "calibration"), ("fast.measure_effects", "measure_effects")):
        t = fast.seconds(name)
        lines.append(f"      {label:<34} {t / n_fast:8.3f} s/vector  ({100 * t / r['fast_wall']:5.1f}%)")
    lines.append(
        f"      calibration ({m.s.calibration.method}): loss evaluations on all {m.s.loss_tokens.shape[0]} chunks "
        f"per vector {r['chunk_evals']:.2f} (coarse ones pro rata), from the layer after the hook"
    )
    lines.append(
        f"      measure_effects: {fast.count['gen_calls']:.0f} generate_aligned calls of "
        f"{fast.count['gen_rows'] / max(fast.count['gen_calls'], 1):.0f} rows on average"
    )
    return lines


def _ratio_lines(m: Measured, r: dict[str, Any]) -> list[str]:
    lines = [
        f"SPEED-UP (b)/(a): {r['ratio_wall']:.1f}x vectors/s by wall clock ({r['ratio_cpu']:.1f}x by process CPU "
        "time); target >= 40x",
        f"  calibration only: {r['ratio_calibration']:.1f}x (target >= 10x); rollouts+encode only: "
        f"{r['ratio_rollouts']:.1f}x",
    ]
    if m.n_stock_fast:
        sf = m.stock_fast.seconds(*our_path.PHASES) / m.n_stock_fast
        sf_cal = m.stock_fast.seconds("fast.calibration") / m.n_stock_fast
        lines.append(
            f"  (b') our first block on a stock TransformerLens model: {sf:.3f} s/vector (calibration {sf_cal:.3f}); "
            f"our model changes make (b) {sf / (r['fast_wall'] / m.n_fast):.2f}x faster, (a) "
            f"{(r['stock_wall'] / max(m.n_stock, 1)) / (r['ref_wall'] / m.n_ref):.2f}x"
        )
    for kind, label in (("ref_calibration", "(a)"), ("stock_ref_calibration", "(a')")):
        if kind in m.calibration_alone:
            t = m.calibration_alone[kind]
            lines.append(
                f"  calibration alone on vectors 0-{m.ref_calibration_vectors - 1}: the reference's sweep {label} "
                f"{t:.3f} s/vector vs ours {r['fast_cal_per_vector']:.3f} over vectors 0-{m.n_fast - 1} "
                f"-> {t / r['fast_cal_per_vector']:.1f}x"
            )
    if r["stock_wall"]:
        lines.append(
            "  (a') the reference loop on a stock TransformerLens model (a weight copy per forward, the KV cache "
            "repeated per query head, as the reference code runs on TransformerLens 3): "
            f"{r['stock_wall'] / m.n_stock:.2f} s/vector over {m.n_stock} -> (b)/(a') "
            f"{r['ratio_wall_vs_stock_ref']:.1f}x overall, calibration {r['ratio_calibration_vs_stock_ref']:.1f}x"
        )
    rows, seq = m.raw_batch
    lines.append(
        f"  effects step (rollouts, capture, encode): {r['effects_tps']:,.0f} rollout tokens/s = "
        f"{100 * r['effects_tps'] / m.raw_tps:.0f}% of a raw batched forward ({m.raw_tps:,.0f} tokens/s at "
        f"[{rows}, {seq}], same dtype and threads; target >= 80%); with calibration {r['all_tps']:,.0f} tokens/s "
        f"= {100 * r['all_tps'] / m.raw_tps:.0f}%"
    )
    return lines


def _agreement_lines(m: Measured, a: dict[str, Any], r: dict[str, Any]) -> list[str]:
    sp, peak = m.s.spec, m.peak_tflops * 1e12
    fast_status = m.fast_status
    return [
        f"scales of the same {len(a['common'])} vectors, (a) vs (b): ref {[round(x, 3) for x in m.ref_scales]} "
        f"({m.ref_status}) vs ours {[round(x, 3) for x in a['fast_scales_same_vectors']]} "
        f"({[fast_status[i] for i in a['common']]})",
        f"  max |scale_a - scale_b| = {a['max_abs_scale_diff']:.3g}",
        f"  cosine(effect_a, effect_b) per vector (different sampling RNG, {len(sp.prompts) * sp.samples_per_prompt} "
        f"rollouts each, so only roughly similar): {[round(c, 3) for c in a['effect_cosines']]}",
        f"  (b) scale statuses over all {m.n_fast}: { {st: fast_status.count(st) for st in sorted(set(fast_status))} }",
        f"model FLOPs (2 x params used x tokens): (a) {r['ref_flops'] / max(m.n_ref, 1) / 1e12:.3f} TFLOP/vector at "
        f"{r['ref_flops'] / r['ref_wall'] / 1e12:.3f} TFLOP/s = {100 * r['ref_flops'] / r['ref_wall'] / peak:.2f}% of "
        f"{m.peak_tflops:g}; (b) {r['fast_flops'] / m.n_fast / 1e12:.3f} TFLOP/vector at "
        f"{r['fast_flops'] / r['fast_wall'] / 1e12:.3f} TFLOP/s = {100 * r['fast_flops'] / r['fast_wall'] / peak:.2f}% "
        "of peak",
    ]


def report(m: Measured, total_s: float) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """The printed lines, the ratios and the scale/effect agreement of a run."""
    r, a = ratios(m), agreement(m)
    rule = "-" * 78
    lines = ["", "=" * 78, "effects throughput: (a) reference one-vector loop vs (b) calibrate + measure_effects"]
    lines += ["=" * 78, *_settings_lines(m), rule]
    lines.append(
        f"one-time setup (not per vector): model+SAE load {m.load_s:.1f} s; "
        + "; ".join(f"{n} {t:.2f} s" for n, t in m.once.wall.items())
    )
    lines += [rule, *_phase_lines(m, r), rule, *_ratio_lines(m, r), *_agreement_lines(m, a, r), *m.profile_lines]
    lines += [f"total benchmark wall time: {total_s:.0f} s", "=" * 78]
    return lines, r, a


def result(m: Measured, lines: list[str], r: dict[str, Any], a: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """The JSON result (the keys of the committed results under benchmarks/results/)."""
    s, sp = m.s, m.s.spec
    return {
        "settings": {
            **{k: str(v) for k, v in s.label.items()},
            "hook": s.hook,
            "prompts": len(sp.prompts),
            "samples_per_prompt": sp.samples_per_prompt,
            "total_tokens": sp.total_tokens,
            "grid": s.grid,
            "loss_chunks": list(s.loss_tokens.shape),
            "target": s.target.model_dump(),
            "vectors_per_batch": s.vectors_per_batch,
            "device": s.device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "argv": argv,
        },
        "ref": _path(m.n_ref, r["ref_wall"], r["ref_cpu"], r["ref_vps"], m.ref, r["ref_flops"]),
        "fast": _path(m.n_fast, r["fast_wall"], r["fast_cpu"], r["fast_vps"], m.fast, r["fast_flops"]),
        "setup_wall_s": dict(m.once.wall),
        "load_s": m.load_s,
        **{k: r[k] for k in ("ratio_wall", "ratio_cpu", "ratio_calibration", "ratio_rollouts")},
        "stock_ref": {"vectors": m.n_stock, "wall_s": r["stock_wall"], "phases_wall_s": dict(m.stock.wall)},
        "ratio_wall_vs_stock_ref": r["ratio_wall_vs_stock_ref"],
        "ratio_calibration_vs_stock_ref": r["ratio_calibration_vs_stock_ref"],
        "stock_fast": {"vectors": m.n_stock_fast, "phases_wall_s": dict(m.stock_fast.wall)},
        "per_vector_s": m.per_vector,
        "calibration_alone_s_per_vector": m.calibration_alone,
        "calibration_method": s.calibration.method,
        "calibration_chunk_evals_per_vector": r["chunk_evals"],
        "raw_forward_tokens_per_s": m.raw_tps,
        "raw_forward_batch": list(m.raw_batch),
        "effects_tokens_per_s": r["effects_tps"],
        "effects_fraction_of_raw": r["effects_tps"] / m.raw_tps,
        "max_abs_scale_diff": a["max_abs_scale_diff"],
        "ref_scales": m.ref_scales,
        "fast_scales_same_vectors": a["fast_scales_same_vectors"],
        "effect_cosines": a["effect_cosines"],
        "report": "\n".join(lines),
    }


def _path(n: int, wall: float, cpu: float, vps: float, p: Phases, flops: float) -> dict[str, Any]:
    return {
        "vectors": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "vectors_per_s": vps,
        "phases_wall_s": dict(p.wall),
        "counts": dict(p.count),
        "flops": flops,
    }
