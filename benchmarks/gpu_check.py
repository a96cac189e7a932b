"""The static decode engine on a GPU, in one run: correctness first, then speed.

    bash benchmarks/gpu_check.sh                # a GPU machine; at most 8 minutes on an H100
    python -m benchmarks.gpu_check --smoke      # the same code on the CPU at tiny shapes, seconds

1. **fp32 tokens**: the tiny Gemma-2 (sliding window exceeded, soft-caps that bite) and the tiny
   LayerNorm model decoded on the device by TransformerLens (``effects.engine: tl``) and by the
   engine as it runs there by default (compiled, CUDA graphs), and eagerly: the same tokens in every
   row, logits within 1e-5 of the largest, captured activations too. Fails the run otherwise.
2. **bf16 activations**: the tiny Gemma-2 in bf16 on fixed tokens; the engine's captured
   activations against the fp32 model's must be within twice TransformerLens's own bf16 error
   (+1e-3), per row as ``|a - a_fp32| / |a_fp32|``. Sampled tokens in bf16 are reported, not
   required (two bf16 orders of summation move tokens whose uniform lies near a bucket edge).
3. **Throughput** on Gemma-2-2B-shaped random weights in bf16 (no hub access needed): one decode of
   ``--rows`` rows x 32 tokens, steered and captured, by TransformerLens and by the engine (eager,
   graphs only, compiled + graphs): tokens/s, host vs device seconds per step, % of bf16 peak; then
   the effects step at the reference settings (14 prompts x 64 samples x 32 tokens, a random
   JumpReLU SAE of width 16384 at layer 12) for ``--vectors`` vectors with each engine, and the
   reference loop (one vector, TransformerLens ``generate`` per prompt) for the ratio; the SAE
   encode in fp32, TF32 and bf16 with its error.

JSON: ``benchmarks/results/<date>/gpu_check[_smoke].json`` (``--json`` elsewhere; also ``$OUT/``
when set, as the device machines collect it). Sections that run out of ``--budget-s`` are skipped
and say so.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from saets_utils.config import SamplingConfig
from saets_utils.models.grouped_attention import grouped_attention
from saets_utils.models.weight_layout import linear_layout
from saets_utils.steering import engine
from saets_utils.steering.engine import EngineOptions, decode_aligned
from saets_utils.steering.generation import generate_aligned, row_uniforms

ROOT = Path(__file__).resolve().parents[1]
# Gemma's tokenisation of the reference's 14 prompts, without BOS (ids here are random stand-ins)
GEMMA_PROMPT_LENGTHS = [0, 0, 0, 2, 2, 2, 2, 2, 5, 4, 4, 2, 4, 3]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prepared(model):
    linear_layout(model)  # as load_model prepares every model
    grouped_attention(model)
    return model


def _biting_gemma2(device: str, dtype: torch.dtype = torch.float32):
    """The tiny Gemma-2 with soft-caps small enough to change its scores and logits."""
    from saets_utils.models.tiny import tiny_gemma2_model

    model = tiny_gemma2_model(seed=0).to(device)
    model.cfg.attn_scores_soft_cap, model.cfg.output_logits_soft_cap = 1.0, 5.0
    model.cfg.device = device
    return _prepared(_to_dtype(model, dtype))


def _to_dtype(model, dtype: torch.dtype):
    if dtype == model.cfg.dtype:
        return model
    model = copy.deepcopy(model)
    model.cfg.dtype = dtype  # one config object for every module: the norms upcast by it
    return model.to(dtype)


def aligned_inputs(prompts: list[list[int]], seeds: list[int], total: int, device: str):
    """generate_aligned's buffers: tokens, which positions the prompts force, each position's uniform."""
    tokens = torch.zeros(len(prompts), total, dtype=torch.long)
    forced = torch.zeros(len(prompts), total, dtype=torch.bool)
    u = torch.zeros(len(prompts), total, dtype=torch.float64)
    for r, (ids, seed) in enumerate(zip(prompts, seeds)):
        tokens[r, : len(ids)] = torch.tensor(ids)
        forced[r, : len(ids)] = True
        u[r, len(ids) :] = row_uniforms([seed], total - len(ids))[0]
    return tokens.to(device), forced.to(device), u.to(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _tl_logits(model, prompts, total, seeds, sampling, hook, delta) -> tuple[Any, torch.Tensor]:
    """TransformerLens's decode (engine tl) and the logits it sampled from at every step."""
    from saets_utils.steering import generation

    seen: list[torch.Tensor] = []
    sample = generation.sample_from_logits
    generation.sample_from_logits = lambda lg, u, s: (seen.append(lg.clone()), sample(lg, u, s))[1]  # type: ignore[assignment]
    try:
        gen = generate_aligned(
            model,
            prompts=prompts,
            total_tokens=total,
            seeds=seeds,
            sampling=sampling,
            hook_name=hook,
            delta=delta,
            capture=True,
        )
    finally:
        generation.sample_from_logits = sample
    return gen, torch.stack(seen)


def _engine_logits(model, prompts, total, seeds, sampling, hook, delta, options):
    dec = engine.StaticDecoder(
        model, len(prompts), total, hook_name=hook, steer=True, capture=True, sampling=sampling, options=options
    )
    dec.load(*aligned_inputs(prompts, seeds, total, str(dec.device)), delta)
    logits = torch.stack(dec.run(keep_logits=True))
    return dec.tokens, dec.acts, logits


def check_fp32(device: str, smoke: bool) -> dict:
    """Engine against TransformerLens in fp32 on the device: tokens, logits, activations."""
    from saets_utils.models.tiny import tiny_model

    rows, total = (8, 20) if smoke else (64, 24)
    g = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, 90, (r % 4,), generator=g).tolist()] for r in range(rows)]
    seeds = list(range(rows))
    out: dict[str, Any] = {"rows": rows, "total_tokens": total}
    tiny = tiny_model(seed=0).to(device)
    tiny.cfg.device = device
    variants = {"device_default": EngineOptions.for_device(device)}
    if variants["device_default"] != EngineOptions():
        variants["eager"] = EngineOptions()
    for name, model in (("tiny_gemma2", _biting_gemma2(device)), ("tiny_layernorm", _prepared(tiny))):
        hook = "blocks.1.hook_resid_post"
        delta = torch.randn(rows, model.cfg.d_model, generator=g).to(device) * 4
        ref, ref_logits = _tl_logits(model, prompts, total, seeds, SamplingConfig(), hook, delta)
        for label, options in variants.items():
            tokens, acts, logits = _engine_logits(model, prompts, total, seeds, SamplingConfig(), hook, delta, options)
            res = {
                "options": str(options),
                "rows_with_equal_tokens": int((tokens == ref.tokens).all(-1).sum()),
                "logits_rel_err": _rel(logits, ref_logits),
                "acts_rel_err": _rel(acts, ref.activations),
            }
            res["passed"] = (
                res["rows_with_equal_tokens"] == rows and max(res["logits_rel_err"], res["acts_rel_err"]) <= 1e-5
            )
            out[f"{name}/{label}"] = res
    out["passed"] = all(v["passed"] for v in out.values() if isinstance(v, dict))
    return out


def check_bf16(device: str, smoke: bool) -> dict:
    """Captured activations in bf16 on fixed tokens, against the fp32 model's."""
    rows, total = (8, 20) if smoke else (64, 24)
    g = torch.Generator().manual_seed(1)
    fp32 = _biting_gemma2(device)
    bf16 = _to_dtype(fp32, torch.bfloat16)
    hook = "blocks.1.hook_resid_post"
    delta = torch.randn(rows, fp32.cfg.d_model, generator=g).to(device) * 4
    # every position but the last forced: the three decoders see the same tokens
    prompts = [[1, *torch.randint(3, 90, (total - 2,), generator=g).tolist()] for _ in range(rows)]
    seeds = list(range(rows))
    kw = dict(prompts=prompts, total_tokens=total, seeds=seeds, sampling=SamplingConfig(), hook_name=hook, capture=True)
    ref = generate_aligned(fp32, delta=delta, **kw).activations
    tl = generate_aligned(bf16, delta=delta, **kw).activations
    ours = decode_aligned(
        bf16,
        *aligned_inputs(prompts, seeds, total, device),
        sampling=SamplingConfig(),
        hook_name=hook,
        delta=delta,
        capture=True,
    )[1]
    assert ref is not None and tl is not None and ours is not None

    def row_err(a: torch.Tensor) -> float:
        return ((a.float() - ref.float()).flatten(1).norm(dim=-1) / ref.float().flatten(1).norm(dim=-1)).max().item()

    # sampled tokens in bf16 from short prompts: reported only
    short = [[1, 5 + r % 7] for r in range(rows)]
    kw2 = dict(prompts=short, total_tokens=total, seeds=seeds, sampling=SamplingConfig(), hook_name=hook)
    t_tl = generate_aligned(bf16, delta=delta, **kw2).tokens
    t_ours = generate_aligned(bf16, delta=delta, engine="static", **kw2).tokens
    res = {
        "rows": rows,
        "tl_bf16_row_rel_err": row_err(tl),
        "engine_bf16_row_rel_err": row_err(ours),
        "tolerance": "engine <= 2 x TransformerLens's own bf16 error + 1e-3 (max over rows of |a - a_fp32| / |a_fp32|)",
        "sampled_rows_with_equal_tokens_bf16": int((t_tl == t_ours).all(-1).sum()),
    }
    res["passed"] = res["engine_bf16_row_rel_err"] <= 2 * res["tl_bf16_row_rel_err"] + 1e-3
    return res


# --- throughput ------------------------------------------------------------------------------------


def gemma_shaped(device: str, smoke: bool, dtype: torch.dtype):
    """Gemma-2-2B's architecture (TransformerLens's own config table, no hub) with random weights;
    ``smoke``: 2 layers and narrow widths, same options."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    from saets_utils.models.tiny import tiny_tokenizer

    cfg = dict(convert_hf_model_config("google/gemma-2-2b"))
    if smoke:
        cfg.update(n_layers=2, d_model=64, d_head=16, n_heads=4, n_key_value_heads=2, d_mlp=128, d_vocab=512)
        cfg.update(attn_types=["local", "global"], window_size=8)
    cfg.update(dtype=dtype, device=device, seed=0)
    hcfg = HookedTransformerConfig(
        **{k: v for k, v in cfg.items() if k in HookedTransformerConfig.__dataclass_fields__}
    )
    with torch.device(device):  # weights made on the device (2.6B parameters)
        model = HookedTransformer(hcfg, tokenizer=tiny_tokenizer(), move_to_device=False, default_padding_side="right")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return _prepared(model)


def flops_per_token(cfg, attended: float) -> float:
    """Forward FLOPs of one position: projections, MLP, attention over ``attended`` keys, unembedding."""
    d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads, cfg.d_head
    mlp = (3 if cfg.gated_mlp else 2) * d * cfg.d_mlp
    per_layer = 2 * (d * h * dh + 2 * d * kv * dh + h * dh * d + mlp) + 4 * h * dh * attended
    return cfg.n_layers * per_layer + 2 * d * cfg.d_vocab


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, float, Any]:
    """(host seconds until ``fn`` returns, wall seconds until the device is done, result)."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    host = time.perf_counter() - t0
    _sync(device)
    return host, time.perf_counter() - t0, out


def decode_throughput(model, device: str, rows: int, total: int, peak: float | None) -> dict:
    g = torch.Generator().manual_seed(2)
    lens = GEMMA_PROMPT_LENGTHS
    prompts = [
        [2, *torch.randint(3, model.cfg.d_vocab, (lens[r % len(lens)],), generator=g).tolist()] for r in range(rows)
    ]
    seeds = list(range(rows))
    hook = "blocks.12.hook_resid_post" if model.cfg.n_layers > 12 else "blocks.1.hook_resid_post"
    delta = (torch.randn(rows, model.cfg.d_model, generator=g) * 20).to(device)
    sampling = SamplingConfig()
    flops = rows * sum(flops_per_token(model.cfg, t + 1) for t in range(total - 1))
    inputs = aligned_inputs(prompts, seeds, total, device)
    runs: dict[str, Callable[[], Any]] = {
        "tl": lambda: generate_aligned(
            model,
            prompts=prompts,
            total_tokens=total,
            seeds=seeds,
            sampling=sampling,
            hook_name=hook,
            delta=delta,
            capture=True,
        ),
    }
    variants = {"engine_eager": EngineOptions()}
    if device.startswith("cuda"):
        variants["engine_graphs"] = EngineOptions(graphs=True, pos_bucket=64)
        variants["engine_compiled_graphs"] = EngineOptions.for_device(device)
    for name, options in variants.items():
        runs[name] = lambda options=options: decode_aligned(
            model, *inputs, sampling=sampling, hook_name=hook, delta=delta, capture=True, options=options
        )
    out: dict[str, Any] = {"rows": rows, "total_tokens": total, "gflop_per_call": flops / 1e9}
    tokens: dict[str, torch.Tensor] = {}
    for name, fn in runs.items():
        first = _timed(fn, device)[1]  # compiles and captures
        host, wall, res = _timed(fn, device)
        tokens[name] = res.tokens if hasattr(res, "tokens") else res[0]
        steps = total - 1
        out[name] = {
            "first_call_s": first,
            "wall_s": wall,
            "host_s": host,
            "step_ms_device": 1e3 * wall / steps,
            "step_ms_host": 1e3 * host / steps,
            "tokens_per_s": rows * steps / wall,
            "tflops": flops / wall / 1e12,
            "pct_of_bf16_peak": None if peak is None else 100 * flops / wall / 1e12 / peak,
        }
        engine._DECODERS.clear()
    for name in runs:
        if name != "tl":
            out[name]["speedup_vs_tl"] = out["tl"]["wall_s"] / out[name]["wall_s"]
            out[name]["rows_with_tl_tokens"] = int((tokens[name] == tokens["tl"]).all(-1).sum())
    return out


class StandInJumpReLU(torch.nn.Module):
    """sae_lens's JumpReLU encoder math (``relu(x W_enc + b_enc)`` where above ``threshold``), for a
    GPU machine without sae_lens."""

    def __init__(self, d_in: int, d_sae: int, device: str, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d_sae, d_in, generator=g)
        self.W_dec = torch.nn.Parameter((w / w.norm(dim=-1, keepdim=True)).to(device), requires_grad=False)
        self.W_enc = torch.nn.Parameter(self.W_dec.T.contiguous(), requires_grad=False)
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, device=device), requires_grad=False)
        self.threshold = torch.nn.Parameter(torch.full((d_sae,), 0.5, device=device), requires_grad=False)
        self.cfg = type("Cfg", (), {"d_sae": d_sae, "d_in": d_in})()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_enc + self.b_enc
        return torch.relu(pre) * (pre > self.threshold)


def effects_throughput(model, device: str, smoke: bool, vectors: int) -> dict:
    """The effects step (rollouts, capture, SAE encode) per vector with each engine, and the reference loop."""
    from dataclasses import replace

    from saets_utils.effects.measure import RolloutSpec, measure_effects
    from saets_utils.effects.reference import reference_effects, transformer_lens_rollouts

    g = torch.Generator().manual_seed(3)
    lens, samples, total = (GEMMA_PROMPT_LENGTHS[:4], 2, 8) if smoke else (GEMMA_PROMPT_LENGTHS, 64, 32)
    prompts = tuple((2, *torch.randint(3, model.cfg.d_vocab, (n,), generator=g).tolist()) for n in lens)
    spec = RolloutSpec(prompts=prompts, samples_per_prompt=samples, total_tokens=total, sampling=SamplingConfig())
    layer = 12 if model.cfg.n_layers > 12 else 1
    hook = f"blocks.{layer}.hook_resid_post"
    sae = StandInJumpReLU(model.cfg.d_model, 512 if smoke else 16384, device)
    ids = list(range(vectors))
    kw = dict(
        sae=sae,
        hook_name=hook,
        vectors=sae.W_dec[ids],
        vector_ids=ids,
        scales=torch.full((vectors,), 40.0),
        baseline_mean=torch.zeros(sae.cfg.d_sae),
        seed=0,
    )
    out: dict[str, Any] = {
        "vectors": vectors,
        "prompts": len(prompts),
        "samples_per_prompt": samples,
        "total_tokens": total,
    }
    blocks = {}
    for name in ("tl", "static"):
        run = lambda name=name: measure_effects(model, spec=replace(spec, engine=name), **kw)
        first = _timed(run, device)[1]
        _, wall, blocks[name] = _timed(run, device)
        out[name] = {"first_call_s": first, "s_per_vector": wall / vectors, "vectors_per_s": vectors / wall}
    engine._DECODERS.clear()
    out["static"]["speedup_vs_tl"] = out["tl"]["s_per_vector"] / out["static"]["s_per_vector"]
    out["static"]["effects_max_abs_diff_vs_tl"] = (blocks["static"].effects - blocks["tl"].effects).abs().max().item()
    draw = transformer_lens_rollouts(model, hook, spec.sampling)
    ref = lambda: reference_effects(
        model,
        sae,
        hook,
        spec,
        vector=sae.W_dec[0],
        vector_id=0,
        scale=40.0,
        baseline_mean=kw["baseline_mean"],
        seed=0,
        rollouts=draw,
    )
    _, wall, _ = _timed(ref, device)
    out["reference_loop"] = {"s_per_vector": wall}
    for name in ("tl", "static"):
        out[name]["ratio_to_reference_loop"] = wall / out[name]["s_per_vector"]
    return out


def sae_encode(device: str, smoke: bool, d_model: int) -> dict:
    """The SAE encode of one block's activations in fp32, TF32 and bf16 (seconds, error vs fp32)."""
    rows = 256 if smoke else 2048 * 32
    sae = StandInJumpReLU(d_model, 512 if smoke else 16384, device)
    x = torch.randn(rows, d_model, device=device) * 3
    out: dict[str, Any] = {"positions": rows}
    ref = None
    for name in ("fp32", "tf32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        enc = (
            (lambda: sae.encode(x)) if name != "bf16" else (lambda: sae.to(torch.bfloat16).encode(x.bfloat16()).float())
        )
        enc()
        _, wall, codes = _timed(enc, device)
        if name == "bf16":
            sae.float()
        ref = codes if ref is None else ref
        out[name] = {"s": wall, "rel_err_vs_fp32": _rel(codes, ref)}
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (tests the script, seconds)")
    ap.add_argument("--device", default=None, help="default: cuda where available, else cpu")
    ap.add_argument("--rows", type=int, default=2048, help="rows of the decode timing (01 calls with up to 2048)")
    ap.add_argument("--vectors", type=int, default=8, help="vectors in the timed effects block")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: by GPU name)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would start after this")
    ap.add_argument("--json", type=Path, default=None, help="where to write the result")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    smoke = a.smoke
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    result: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "smoke": smoke,
        "date": datetime.date.today().isoformat(),
        "peak_bf16_tflops": peak,
        "sections": {},
    }
    start = time.perf_counter()
    dtype = torch.float32 if smoke and device == "cpu" else torch.bfloat16
    big: dict[str, Any] = {}

    def model() -> Any:
        if "model" not in big:
            big["model"] = gemma_shaped(device, smoke, dtype)
        return big["model"]

    sections: dict[str, Callable[[], dict]] = {
        "correctness_fp32": lambda: check_fp32(device, smoke),
        "activations_bf16": lambda: check_bf16(device, smoke),
        "decode_throughput": lambda: decode_throughput(
            model(), device, 64 if smoke else a.rows, 8 if smoke else 32, peak
        ),
        "effects_throughput": lambda: effects_throughput(model(), device, smoke, 2 if smoke else a.vectors),
        "sae_encode": lambda: sae_encode(device, smoke, model().cfg.d_model),
    }
    path = a.json or ROOT / "benchmarks" / "results" / result["date"] / f"gpu_check{'_smoke' if smoke else ''}.json"

    def save() -> None:  # after every section: a run stopped by its time limit keeps what it measured
        checks = [result["sections"].get(k, {}).get("passed") for k in ("correctness_fp32", "activations_bf16")]
        result["passed"] = all(c is True for c in checks)
        result["elapsed_s"] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], path.name).write_text(path.read_text())

    with torch.no_grad():
        for key, fn in sections.items():
            if time.perf_counter() - start > a.budget_s:
                result["sections"][key] = {"skipped": f"over the {a.budget_s:.0f} s budget"}
                continue
            t0 = time.perf_counter()
            try:
                result["sections"][key] = fn()
            except Exception as e:  # the other sections still run; the error is in the JSON
                result["sections"][key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            result["sections"][key]["seconds"] = time.perf_counter() - t0
            print(key, json.dumps(result["sections"][key], default=str)[:1500], flush=True)
            save()
    print(f"passed: {result['passed']}; {result['elapsed_s']:.0f} s; {path}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
