#!/usr/bin/env python
"""Throughput of notebook 01's effects measurement: the reference loop vs our batched path.

One run, one model, one SAE, one set of effect settings, two ways of measuring the same vectors:

(a) reference: one vector at a time, as the SAE-TS reference code does it. Scale search sweeps the
    grid upwards with a FULL forward of the model on the loss chunks at every scale (steering hook
    at every position, ``model(tokens, return_type="loss")``), stops once the loss exceeds the
    target and interpolates linearly. Then one TransformerLens ``model.generate`` call per prompt
    (prompt repeated ``samples_per_prompt`` times, KV cache, no stop at EOS) with the steering hook,
    and the rollouts re-run through the unsteered model up to the hook and SAE-encoded.
(b) ours: ``calibrate`` (the params' method: the secant search by default, ``--calibration sweep``
    for the grid sweep) + ``measure_effects`` on blocks of ``vectors_per_batch`` vectors, exactly
    as ``effects.runner.compute_block`` calls them (without writing a shard). The secant search's
    starting scale (the sweep's median over the first 4 vectors, once per worker) is setup.

(a') the reference loop again on a stock TransformerLens model (``--stock-ref-vectors``):
    TransformerLens 3 copies every weight into ``F.linear``'s layout on every forward and repeats
    the key/value cache for grouped-query attention, which our loader avoids
    (``saets_utils.models.weight_layout``, ``saets_utils.models.grouped_attention``). (a) and (b)
    run on our model, so their ratio measures the algorithms; (a') shows what the reference code
    costs on a stock install.

Before timing, one block of (b) and one vector of (a) run untimed (``--no-warmup`` skips this): a
path's first call at its shapes pays one-time costs that a run of 01 pays once per worker.

It also times a raw batched forward of the same model (same dtype, threads and batch shape as
one generation call) and reports our effects step's rollout tokens/s as a fraction of it.
``--profile`` adds a torch.profiler summary of one more block and, on CUDA, counts the host syncs
inside one ``generate`` call (torch.cuda sync debug mode).

Per-run setup that both paths share and that does not scale with the number of vectors (loss
chunks, the activations at the hook on them, the unsteered loss, the unsteered baseline) is timed
separately and NOT counted in vectors/s. The baseline itself is not measured (a zero baseline is
used by both paths; it is subtracted from effects and costs the same for both).

Usage (CPU, the embedded SmolLM2; see benchmarks/README.md for the SAE options):
    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/effects_throughput.py --ref-vectors 2 --fast-vectors 32
GPU, a Gemma-2-2B-shaped model with random weights at the reference settings:
    python benchmarks/effects_throughput.py --gemma-shaped --device cuda --ref-vectors 3 --fast-vectors 64
CPU smoke test of the Gemma-shaped code path (2 layers, small vocab, tiny settings):
    python benchmarks/effects_throughput.py --gemma-shaped --tiny-check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from saets_utils.config import CalibrationConfig, EffectsConfig, LossTarget, SamplingConfig, load_config  # noqa: E402
from saets_utils.effects import calibration as cal_mod  # noqa: E402
from saets_utils.effects import measure as eff_mod  # noqa: E402
from saets_utils.effects import reference as ref_mod  # noqa: E402
from saets_utils.effects.calibration import (  # noqa: E402
    calibrate,
    hook_layer,
    resid_at_hook,
    scale_hint,
    steered_losses,
)
from saets_utils.effects.measure import RolloutSpec, measure_effects  # noqa: E402
from saets_utils.effects.memory import rows_for_memory  # noqa: E402
from saets_utils.effects.reference import reference_effects, transformer_lens_rollouts  # noqa: E402
from saets_utils.models.grouped_attention import grouped_attention, stock_attention  # noqa: E402
from saets_utils.models.weight_layout import linear_layout, stock_layout  # noqa: E402
from saets_utils.steering import generation as steer_mod  # noqa: E402
from saets_utils.steering.hooks import steering_hook  # noqa: E402

# --------------------------------------------------------------------------------------------
# timing and work accounting
# --------------------------------------------------------------------------------------------


class Profile:
    """Wall and process-CPU seconds per named phase, plus token counters for FLOP estimates.

    Counters: ``layer_tokens`` (token x transformer-block passes), ``unembed_tokens`` (tokens put
    through the unembedding), ``sae_tokens`` (positions SAE-encoded), ``grid_points`` (steered loss
    evaluations per vector, scale 0 included where it costs a forward).
    """

    def __init__(self, device: str):
        self.device = device
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.count: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sync()
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.sync()
            self.wall[name] += time.perf_counter() - w
            self.cpu[name] += time.process_time() - c


@dataclass
class ModelShape:
    """What a forward costs: parameters per block, unembedding and SAE encoder sizes."""

    n_layers: int
    block_params: float
    unembed_params: int
    sae_enc_params: int
    hook_layer: int

    @classmethod
    def of(cls, model, sae, hook_name: str) -> ModelShape:
        per_block = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
        return cls(
            model.cfg.n_layers,
            sum(per_block) / len(per_block),
            model.W_U.numel(),
            sae.W_enc.numel(),
            hook_layer(hook_name),
        )

    @property
    def n_params(self) -> float:
        """Non-embedding parameters that a full forward multiplies by (blocks + unembedding)."""
        return self.n_layers * self.block_params + self.unembed_params

    def flops(self, p: Profile) -> float:
        """2 x (parameters used) x (tokens through them), per segment actually run."""
        return 2.0 * (
            p.count["layer_tokens"] * self.block_params
            + p.count["unembed_tokens"] * self.unembed_params
            + p.count["sae_tokens"] * self.sae_enc_params
        )


# --------------------------------------------------------------------------------------------
# what a run measures
# --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    model: object
    sae: object
    hook: str
    spec: RolloutSpec
    loss_tokens: torch.Tensor
    vector_ids: torch.Tensor
    vectors: torch.Tensor
    grid: list[float]
    target: LossTarget
    seed: int
    vectors_per_batch: int
    device: str
    label: dict = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


def _sae_cached(run) -> bool:
    if run.sae.source != "train":
        return True
    from saets_utils.models.sae_training import sae_cache_path

    return (sae_cache_path(run) / "cfg.json").is_file()


def smollm_setup(args) -> Setup:
    """The params file's model, SAE and effect settings; if its SAE is not cached (training takes
    minutes), the SAE settings of ``--fallback-sae-params`` with the params file's effect settings."""
    from saets_utils.effects.runner import rollout_spec
    from saets_utils.effects.vector_sources import build_vectors
    from saets_utils.models.loading import bos_id, load_texts, tokenize_chunks
    from saets_utils.models.sae_loading import load_sae_from
    from saets_utils.session import load_model_and_sae

    run = load_config(args.params)
    source = f"{args.params} (model, SAE and effect settings)"
    if args.sae_dir or args.random_sae_at:
        if args.sae_dir:
            cfg = json.loads((Path(args.sae_dir) / "cfg.json").read_text())
            sae_over = {
                "source": "local",
                "path": str(Path(args.sae_dir).resolve()),
                "hook_name": cfg["metadata"]["hook_name"],
            }
            source = f"effect settings of {args.params}; SAE loaded from --sae-dir {args.sae_dir}"
        else:
            sae_over = {"source": "tiny", "hook_name": args.random_sae_at}
            source = (
                f"effect settings of {args.params}; RANDOM TopK SAE (d_sae {run.sae.train.d_sae}, k "
                f"{run.sae.train.k}) at --random-sae-at {args.random_sae_at} (throughput only)"
            )
        run = load_config(args.params, {"sae": sae_over})
    elif not _sae_cached(run) and not args.allow_train:
        eff = run.effects.model_dump(mode="json")  # every field, so nothing of the fallback's effects survives
        fb_overrides = {"effects": eff, "model": run.model.model_dump(mode="json"), "seed": run.seed}
        run = load_config(args.fallback_sae_params, fb_overrides)
        source = (
            f"SAE of {args.fallback_sae_params} ({run.sae.hook_name}, d_sae {run.sae.train.d_sae}) with the "
            f"model and effect settings of {args.params} (its SAE is not cached; --allow-train trains it)"
        )
        if not _sae_cached(run):
            from saets_utils.models import assets

            found = [
                f"{p.parent} ({json.loads(p.read_text())['metadata'].get('hook_name')})"
                for p in sorted((assets.cache_dir() / "saes").glob("*/cfg.json"))
            ]
            raise SystemExit(
                f"neither {args.params}'s nor {args.fallback_sae_params}'s SAE is cached; run with "
                f"--allow-train (minutes), --sae-dir DIR (a saved sae_lens SAE; cached: {found}) or "
                "--random-sae-at HOOK"
            )
    device = args.device or run.resolved_device()
    torch.manual_seed(run.seed)
    if args.random_sae_at:  # the model as load_model_and_sae loads it, a random SAE of the params' shape
        from saets_utils.models.loading import load_model, validate_against_model
        from saets_utils.models.tiny import tiny_sae

        model = load_model(run.model, device)
        validate_against_model(run, model)
        sae = tiny_sae(
            d_in=model.cfg.d_model,
            d_sae=run.sae.train.d_sae,
            k=run.sae.train.k,
            seed=run.seed,
            hook_name=args.random_sae_at,
        ).to(device)
    else:
        model, sae = load_model_and_sae(run, device)
    if args.dtype and args.dtype != run.model.dtype:  # cast after loading: the SAE cache key includes the dtype
        from saets_utils.models.loading import torch_dtype

        model.to(torch_dtype(args.dtype))
    e = run.effects
    if args.max_prompts:
        run = run.model_copy(update={"effects": e.model_copy(update={"prompts": e.prompts[: args.max_prompts]})})
        e = run.effects
    bos = bos_id(model, run.model)
    spec = rollout_spec(run, model, bos)
    # as prepare_plan: chunks start at document starts
    loss_tokens = tokenize_chunks(
        model, load_texts(run.text), e.loss_chunk_tokens, e.loss_chunks, bos, seed=run.seed + 1, align_docs=True
    ).to(device)
    ids, vecs = build_vectors(run, sae, model.cfg.d_model, lambda c: load_sae_from(c, run, "cpu"))
    need = max(args.fast_vectors, args.ref_vectors)
    if len(ids) < need:
        raise SystemExit(f"the params select only {len(ids)} vectors; asked for {need}")
    label = {
        "model": f"{run.model.name} ({run.model.source}, {args.dtype or run.model.dtype})",
        "params": source,
        "sae": f"{'random TopK' if args.random_sae_at else run.sae.key} (d_sae {sae.cfg.d_sae})",
        "start token id": bos,
    }
    return Setup(
        model,
        sae,
        run.sae.hook_name,
        spec,
        loss_tokens,
        ids[:need],
        vecs[:need].to(device),
        e.scale_grid.values(),
        e.loss_target,
        run.seed,
        args.vectors_per_batch or e.vectors_per_batch,
        device,
        label,
        e.calibration,
    )


# Gemma tokenisation of the reference prompts (lengths without BOS; ids here are random stand-ins)
GEMMA_PROMPT_LENGTHS = {
    "": 0,
    "I think": 2,
    "Breaking news": 2,
    "Last night": 2,
    "For sale": 2,
    "The weather": 2,
    "Dear Sir/Madam": 5,
    "Preheat the oven": 4,
    "It's interesting that": 4,
    "Assistant:": 2,
    "I went up to": 4,
    "New study suggests": 3,
}


def gemma_setup(args) -> Setup:
    """A HookedTransformer with Gemma-2-2B's config and random weights, a random JumpReLU SAE of
    width 16384 at ``blocks.12.hook_resid_post``, random token chunks, the reference settings."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 matmuls are slow on CPUs without bf16 units: the CPU smoke test defaults to float32
    args.dtype = args.dtype or ("float32" if args.tiny_check and device == "cpu" else "bfloat16")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        from transformer_lens.loading_from_pretrained import convert_hf_model_config

        cfg_dict = convert_hf_model_config("google/gemma-2-2b")  # hard-coded in TransformerLens, no hub
    except Exception:  # pragma: no cover - older/newer TransformerLens
        cfg_dict = {
            "d_model": 2304,
            "d_head": 256,
            "n_heads": 8,
            "d_mlp": 9216,
            "n_layers": 26,
            "n_ctx": 8192,
            "eps": 1e-06,
            "d_vocab": 256000,
            "act_fn": "gelu_pytorch_tanh",
            "initializer_range": 0.02,
            "normalization_type": "RMS",
            "rotary_base": 10000.0,
            "positional_embedding_type": "rotary",
            "use_attn_scale": True,
            "n_key_value_heads": 4,
            "window_size": 4096,
            "use_local_attn": True,
            "attn_types": ["local", "global"] * 13,
            "attn_scores_soft_cap": 50.0,
            "output_logits_soft_cap": 30.0,
            "gated_mlp": True,
            "final_rms": True,
            "use_normalization_before_and_after": True,
            "original_architecture": "Gemma2ForCausalLM",
        }
    e = EffectsConfig()  # the reference settings
    layer, d_sae = 12, 16384
    prompts, samples, total, chunks, chunk_tokens = (
        e.prompts,
        e.samples_per_prompt,
        e.total_tokens,
        e.loss_chunks,
        e.loss_chunk_tokens,
    )
    if args.tiny_check:  # exercise the code path (same architecture, narrow widths) on a CPU in seconds
        cfg_dict.update(
            n_layers=2,
            d_model=256,
            d_head=64,
            n_heads=4,
            n_key_value_heads=2,
            d_mlp=1024,
            d_vocab=2048,
            attn_types=["local", "global"],
        )
        layer, d_sae, prompts, samples, total, chunks, chunk_tokens = 0, 1024, e.prompts[2:5], 2, 8, 2, 16
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    cfg_dict.update(
        dtype=dtype,
        device=device,
        tokenizer_name=None,
        default_prepend_bos=False,
        model_name="gemma-2-2b-shaped-random",
    )
    cfg = HookedTransformerConfig(
        **{k: v for k, v in cfg_dict.items() if k in HookedTransformerConfig.__dataclass_fields__}
    )
    # TransformerLens needs a tokenizer to build attention masks when a KV cache is passed (our
    # generate); a character-level stand-in with pad id 0 and right padding, as Gemma's tokenizer.
    from saets_utils.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False, default_padding_side="right")
    assert model.cfg.d_vocab == cfg_dict["d_vocab"] and model.tokenizer.pad_token_id == 0
    model.to(device).eval()
    linear_layout(model)  # as saets_utils.models.loading.load_model prepares every model
    grouped_attention(model)
    for p in model.parameters():
        p.requires_grad_(False)
    hook = f"blocks.{layer}.hook_resid_post"
    d_model = cfg.d_model
    g = torch.Generator().manual_seed(1)
    sae = _jumprelu_sae(d_model, d_sae, device)
    w_dec = torch.randn(d_sae, d_model, generator=g)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(0.5)
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    bos = 2  # Gemma's <bos>
    vocab = cfg.d_vocab
    prompt_ids = tuple(
        (bos, *torch.randint(3, vocab, (GEMMA_PROMPT_LENGTHS.get(p, 3),), generator=g).tolist()) for p in prompts
    )
    spec = RolloutSpec(
        prompts=prompt_ids,
        samples_per_prompt=samples,
        total_tokens=total,
        sampling=SamplingConfig(),
        include_first_position=True,
    )
    loss_tokens = torch.randint(3, vocab, (chunks, chunk_tokens), generator=g)
    loss_tokens[:, 0] = bos
    need = max(args.fast_vectors, args.ref_vectors)
    label = {
        "model": f"Gemma-2-2B-shaped, random weights ({cfg.n_layers} layers, d_model {d_model}, "
        f"vocab {vocab}, {args.dtype})" + (" [TINY CHECK]" if args.tiny_check else ""),
        "params": "reference settings (EffectsConfig defaults; 14 prompts x 64 samples x 32 tokens, 64 x 32 loss chunks)",
        "sae": f"random JumpReLU d_sae {d_sae}, float32",
        "start token id": bos,
    }
    vectors = w_dec[:need].to(device)
    loss_tokens = loss_tokens.to(device)
    target, note = gemma_target(model, hook, loss_tokens, vectors, args.gemma_target_scale)
    label["loss target"] = note
    return Setup(
        model,
        sae,
        hook,
        spec,
        loss_tokens,
        torch.arange(need),
        vectors,
        e.scale_grid.values(),
        target,
        0,
        args.vectors_per_batch or e.vectors_per_batch,
        device,
        label,
        e.calibration,
    )


class _StandInJumpReLU(torch.nn.Module):
    """sae_lens's JumpReLU encoder math (``relu(x W_enc + b_enc)`` where above ``threshold``), for a
    GPU machine without sae_lens installed."""

    def __init__(self, d_in: int, d_sae: int, device: str):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae, device=device))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in, device=device))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, device=device))
        self.threshold = torch.nn.Parameter(torch.zeros(d_sae, device=device))
        self.cfg = type("Cfg", (), {"d_sae": d_sae, "d_in": d_in})()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_enc + self.b_enc
        return torch.relu(pre) * (pre > self.threshold)


def _jumprelu_sae(d_model: int, d_sae: int, device: str):
    """sae_lens's JumpReLU SAE, or the stand-in where sae_lens is not installed."""
    try:
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    except ImportError:
        print("sae_lens not importable here: a stand-in JumpReLU encoder with the same math is used", flush=True)
        return _StandInJumpReLU(d_model, d_sae, device)
    return JumpReLUSAE(JumpReLUSAEConfig(d_in=d_model, d_sae=d_sae, device=device, apply_b_dec_to_input=False))


@torch.no_grad()
def gemma_target(model, hook: str, loss_tokens: torch.Tensor, vectors: torch.Tensor, scale: float):
    """A relative loss target that random-weight vectors cross near ``scale``, so the scale search
    costs about as many grid points as on a trained model (a random model's loss barely reacts to
    steering, and a fixed +0.5 would make every vector sweep the whole grid)."""
    if scale <= 0:
        return LossTarget(kind="relative", value=0.5), "relative +0.5 (as the paper)"
    resid = resid_at_hook(model, hook, loss_tokens)
    base = float(
        steered_losses(model, hook, loss_tokens, resid, torch.zeros(1, vectors.shape[1], device=vectors.device))[0]
    )
    rise = steered_losses(model, hook, loss_tokens, resid, vectors[:4] * scale) - base
    value = float(rise.median())
    if not value > 1e-3:
        return LossTarget(kind="relative", value=0.5), (
            f"relative +0.5 (the random model's loss does not rise with "
            f"steering: {value:+.4f} at scale {scale:g}; full-grid sweeps)"
        )
    return LossTarget(kind="relative", value=value), (
        f"relative {value:+.4f} = median loss rise of 4 vectors at "
        f"scale {scale:g} (--gemma-target-scale), so crossings land near it"
    )


# --------------------------------------------------------------------------------------------
# (a) the reference loop, one vector at a time
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def ref_unsteered_loss(s: Setup) -> float:
    return float(s.model(s.loss_tokens, return_type="loss"))


@torch.no_grad()
def ref_calibrate(s: Setup, v: torch.Tensor, target: float, prof: Profile, shape: ModelShape) -> tuple[float, str]:
    """Sweep the grid upwards with a full forward at each scale; stop once loss > target."""
    losses: list[float] = []
    grid = sorted(s.grid)
    t = s.loss_tokens.numel()
    with prof.phase("ref.calibration"):
        for scale in grid:
            with steering_hook(s.model, s.hook, scale * v):
                loss = float(s.model(s.loss_tokens, return_type="loss"))
            prof.count["layer_tokens"] += t * shape.n_layers
            prof.count["unembed_tokens"] += t
            prof.count["grid_points"] += 1
            losses.append(loss)
            if loss > target:
                break
    if losses[-1] <= target:
        return grid[len(losses) - 1], "not_reached"
    j = len(losses) - 1
    if j == 0:
        return float("nan"), "above_at_zero"
    s0, s1, l0, l1 = grid[j - 1], grid[j], losses[j - 1], losses[j]
    return s0 + (target - l0) * (s1 - s0) / (l1 - l0), "ok"


@torch.no_grad()
def ref_effect(s: Setup, v: torch.Tensor, scale: float, prof: Profile, shape: ModelShape) -> torch.Tensor:
    """The package's reference loop (``saets_utils.effects.reference``) with the reference's own
    sampler: one TransformerLens generate call per prompt under the steering hook, then the rollouts
    re-run to the hook and SAE-encoded; each phase timed and counted."""
    sample = transformer_lens_rollouts(s.model, s.hook, s.spec.sampling)

    def rollouts(prompt: torch.Tensor, new_tokens: int, seeds: list[int], delta: torch.Tensor) -> torch.Tensor:
        with prof.phase("ref.generate"):
            out = sample(prompt, new_tokens, seeds, delta)
        prof.count["layer_tokens"] += out.shape[0] * (out.shape[1] - 1) * shape.n_layers
        prof.count["unembed_tokens"] += out.shape[0] * (out.shape[1] - 1)
        return out

    with instrumented_reference(prof, shape):
        return reference_effects(
            s.model, s.sae, s.hook, s.spec, v, 0, scale, torch.zeros(s.sae.cfg.d_sae), s.seed, rollouts
        )


def ref_vector(
    s: Setup, v: torch.Tensor, target: float, prof: Profile, shape: ModelShape
) -> tuple[float, str, torch.Tensor]:
    """One vector through the reference loop: the sweep, then (if it found a scale) the effect."""
    sc, st = ref_calibrate(s, v, target, prof, shape)
    eff = ref_effect(s, v, sc, prof, shape) if math.isfinite(sc) else torch.full((s.sae.cfg.d_sae,), float("nan"))
    return sc, st, eff


@contextmanager
def instrumented_reference(prof: Profile, shape: ModelShape) -> Iterator[None]:
    """Time and count the reference loop's re-run to the hook and its SAE encoding (patched on
    ``saets_utils.effects.reference``, restored on exit)."""
    orig_resid, orig_enc = ref_mod.resid_at_hook, ref_mod.encode_positions

    def resid(model, hook_name, tokens, batch_size=64):
        with prof.phase("ref.rerun_to_hook"):
            out = orig_resid(model, hook_name, tokens, batch_size)
        prof.count["layer_tokens"] += tokens.numel() * (shape.hook_layer + 1)
        return out

    def enc(sae, acts, include_first_position):
        with prof.phase("ref.sae_encode"):
            out = orig_enc(sae, acts, include_first_position)
        prof.count["sae_tokens"] += out.shape[0] * out.shape[1]
        return out

    ref_mod.resid_at_hook, ref_mod.encode_positions = resid, enc
    try:
        yield
    finally:
        ref_mod.resid_at_hook, ref_mod.encode_positions = orig_resid, orig_enc


# --------------------------------------------------------------------------------------------
# (b) our path, as compute_block runs it; thin timing wrappers around the package functions
# --------------------------------------------------------------------------------------------


@contextmanager
def instrumented(prof: Profile, shape: ModelShape, fine: bool) -> Iterator[None]:
    """Time and count the package's inner calls (patched on the module objects, restored on exit)."""
    orig_sl, orig_gen, orig_enc = cal_mod.steered_losses, eff_mod.generate_aligned, eff_mod.encode_positions
    orig_sample, orig_unif = steer_mod.sample_from_logits, steer_mod.row_uniforms

    def sl(model, hook_name, tokens, resid, deltas, max_rows=64):
        prof.count["grid_points"] += deltas.shape[0]
        prof.count["chunk_evals"] += deltas.shape[0] * tokens.shape[0]
        t = tokens.numel() * deltas.shape[0]
        prof.count["layer_tokens"] += t * (shape.n_layers - shape.hook_layer - 1)
        prof.count["unembed_tokens"] += t
        return orig_sl(model, hook_name, tokens, resid, deltas, max_rows)

    def gen(model, prompts, total_tokens, seeds, sampling, hook_name=None, delta=None, capture=False):
        rows = len(prompts)
        prof.count["gen_calls"] += 1
        prof.count["gen_rows"] += rows
        prof.count["rollout_tokens"] += rows * total_tokens
        prof.count["layer_tokens"] += rows * (total_tokens - 1) * shape.n_layers + rows * (shape.hook_layer + 1)
        prof.count["unembed_tokens"] += rows * (total_tokens - 1)
        with prof.phase("fast.generate(+capture)"):
            return orig_gen(model, prompts, total_tokens, seeds, sampling, hook_name, delta, capture)

    def enc(sae, acts, include_first_position):
        with prof.phase("fast.sae_encode"):
            out = orig_enc(sae, acts, include_first_position)
        prof.count["sae_tokens"] += out.shape[0] * out.shape[1]
        return out

    def sample(logits, u, sampling):
        with prof.phase("fast.generate.sampling"):
            return orig_sample(logits, u, sampling)

    def unif(seeds, n, device="cpu"):
        with prof.phase("fast.generate.row_uniforms"):
            return orig_unif(seeds, n, device)

    cal_mod.steered_losses, eff_mod.generate_aligned, eff_mod.encode_positions = sl, gen, enc
    if fine:
        steer_mod.sample_from_logits, steer_mod.row_uniforms = sample, unif
    try:
        yield
    finally:
        cal_mod.steered_losses, eff_mod.generate_aligned, eff_mod.encode_positions = orig_sl, orig_gen, orig_enc
        steer_mod.sample_from_logits, steer_mod.row_uniforms = orig_sample, orig_unif


@torch.no_grad()
def fast_block(
    s: Setup,
    rows: list[int],
    resid: torch.Tensor,
    unsteered: float,
    baseline: torch.Tensor,
    prof: Profile,
    hint=None,
):
    """``compute_block`` without the shard: calibrate, then measure the vectors that got a scale."""
    vecs = s.vectors[rows]
    ids = s.vector_ids[rows]
    with prof.phase("fast.calibration"):
        cal_rows = rows_for_memory(s.model, s.loss_tokens.shape[1], default=64)
        cal = calibrate(
            s.model, s.hook, s.loss_tokens, resid, vecs, s.calibration, s.grid, s.target, unsteered, hint, cal_rows
        )
    ok = torch.isfinite(cal.scales)
    effects = torch.full((len(rows), baseline.shape[0]), float("nan"))
    if ok.any():
        with prof.phase("fast.measure_effects"):
            blk = measure_effects(
                s.model,
                s.sae,
                s.hook,
                s.spec,
                vecs[ok],
                ids[ok].tolist(),
                cal.scales[ok].to(vecs.device),
                baseline.to(vecs.device),
                s.seed,
                max_rows=rows_for_memory(s.model, s.spec.total_tokens, default=2048, logit_positions=8),
            )
        effects[ok] = blk.effects.float().cpu()
    return cal, effects


@contextmanager
def stock_transformer_lens(model) -> Iterator[None]:
    """Within the block, ``model`` runs as TransformerLens itself sets it up: its weight layout and
    its grouped-query attention."""
    with stock_layout(model), stock_attention(model):
        yield


@torch.no_grad()
def raw_forward_tokens_per_s(s: Setup, rows: int, seq: int, reps: int) -> float:
    """Tokens/s of a plain batched forward ``model(tokens [rows, seq])`` (logits, no hooks, no cache):
    what the machine gives this model at this batch shape, dtype and thread count."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, s.model.cfg.d_vocab, (rows, seq), generator=g).to(s.device)
    prof = Profile(s.device)
    s.model(tokens[:, :2])  # warm-up
    with prof.phase("raw"):
        for _ in range(reps):
            s.model(tokens)
    return rows * seq * reps / prof.wall["raw"]


def profile_block(s: Setup, rows: list[int], resid, unsteered: float, baseline, hint, steps: int = 4) -> list[str]:
    """torch.profiler's top operators over one calibration evaluation and a short ``generate_aligned``
    call (one block's rows for one prompt each, cycling through the prompts, until ``steps`` tokens
    after the longest: profiling a whole block records millions of events), and on CUDA the host
    syncs counted by torch.cuda's sync debug mode in that call."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    cuda = s.device.startswith("cuda")
    n = len(rows) * s.spec.samples_per_prompt
    prompts = [s.spec.prompts[i % len(s.spec.prompts)] for i in range(n)]
    total = min(s.spec.total_tokens, max(map(len, prompts)) + steps)
    delta = (20.0 * s.vectors[rows[0]])[None].repeat(n, 1)
    vecs = s.vectors[rows] * 20.0
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        steered_losses(s.model, s.hook, s.loss_tokens, resid, vecs)
        steer_mod.generate_aligned(
            s.model, prompts, total, list(range(n)), s.spec.sampling, s.hook, delta, capture=True
        )
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
                steer_mod.generate_aligned(
                    s.model, prompts, total, list(range(n)), s.spec.sampling, s.hook, delta, capture=True
                )
        finally:
            torch.cuda.set_sync_debug_mode(0)
        msgs = [str(w.message).splitlines()[0] for w in caught]
        lines.append(f"host syncs inside one generate_aligned call ({total} tokens, {n} rows): {len(msgs)}")
        for m in sorted(set(msgs))[:5]:
            lines.append(f"    {msgs.count(m)} x {m[:160]}")
    return lines


@torch.no_grad()
def warm(s: Setup) -> None:
    """A tiny run of each path's kernels (2 rows, 2 new tokens), results discarded."""
    prompt = torch.tensor([s.spec.prompts[-1]] * 2, device=s.device)
    v = s.vectors[0]
    with steering_hook(s.model, s.hook, 20.0 * v):
        s.model.generate(
            prompt,
            max_new_tokens=2,
            top_k=s.spec.sampling.top_k,
            top_p=s.spec.sampling.top_p,
            stop_at_eos=False,
            use_past_kv_cache=True,
            verbose=False,
        )
    prompts = [s.spec.prompts[0], s.spec.prompts[-1]]
    total = max(map(len, prompts)) + 2
    g = steer_mod.generate_aligned(
        s.model, prompts, total, [0, 1], s.spec.sampling, s.hook, (20.0 * v)[None].repeat(2, 1), capture=True
    )
    eff_mod.encode_positions(s.sae, g.activations, s.spec.include_first_position)


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/demo.yaml", help="run whose model, SAE and effect settings to use")
    ap.add_argument(
        "--fallback-sae-params",
        default="params/test.yaml",
        help="SAE settings to use when --params's SAE is not cached (effect settings stay --params's)",
    )
    ap.add_argument("--sae-dir", default=None, help="use this saved sae_lens SAE folder (its hook) instead")
    ap.add_argument(
        "--random-sae-at",
        default=None,
        metavar="HOOK",
        help="use a seeded random TopK SAE of the params' shape at HOOK instead (throughput only)",
    )
    ap.add_argument("--allow-train", action="store_true", help="train --params's SAE if not cached (minutes)")
    ap.add_argument("--ref-vectors", type=int, default=2, help="vectors measured by the reference loop (a)")
    ap.add_argument(
        "--stock-ref-vectors",
        type=int,
        default=1,
        help="vectors measured by the reference loop on a stock TransformerLens model (a')",
    )
    ap.add_argument(
        "--ref-calibration-vectors",
        type=int,
        default=0,
        help="also time the reference's sweep alone on the first N vectors, on our model and on the stock one "
        "(N = --fast-vectors: the calibration ratio over the same vectors as ours)",
    )
    ap.add_argument(
        "--stock-fast-block",
        action="store_true",
        help="also time our first block on a stock TransformerLens model (b'), for the share of our model changes",
    )
    ap.add_argument("--fast-vectors", type=int, default=32, help="vectors measured by our path (b)")
    ap.add_argument("--vectors-per-batch", type=int, default=None, help="block size of (b) (default: params)")
    ap.add_argument("--device", default=None, help="cpu / cuda[:N] (default: params' device, or cuda if available)")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: params; bfloat16 with --gemma-shaped)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts (smoke tests)")
    ap.add_argument(
        "--gemma-shaped",
        action="store_true",
        help="Gemma-2-2B config with random weights (bf16), random JumpReLU SAE 16k, reference settings",
    )
    ap.add_argument(
        "--gemma-target-scale",
        type=float,
        default=100.0,
        help="with --gemma-shaped: pick the relative loss target that random vectors reach near this "
        "scale (0: the paper's +0.5, which random weights may never reach)",
    )
    ap.add_argument("--tiny-check", action="store_true", help="with --gemma-shaped: 2 layers, tiny settings, CPU ok")
    ap.add_argument(
        "--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s of the device (H100/H200 bf16)"
    )
    ap.add_argument("--no-fine-profile", action="store_true", help="skip per-step sampling timers inside generate")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed first block of (b) and first vector of (a) (one-time costs then count)",
    )
    ap.add_argument(
        "--calibration", choices=["secant", "sweep"], default=None, help="(b)'s scale search (default: the params')"
    )
    ap.add_argument("--raw-reps", type=int, default=3, help="repetitions of the raw batched forward timed")
    ap.add_argument(
        "--profile", action="store_true", help="torch.profiler summary of one more block; on CUDA count host syncs"
    )
    return ap.parse_args(argv)


def _rate(n: int, secs: float) -> float:
    return n / secs if secs > 0 else float("nan")


def _so_far(prof: Profile, kind: str) -> tuple[float, float]:
    """Seconds spent so far by path ``kind`` ("ref" or "fast"): in all, and in calibration."""
    cal = prof.wall.get(f"{kind}.calibration", 0.0)
    if kind == "fast":
        return cal + prof.wall.get("fast.measure_effects", 0.0), cal
    return sum(v for n, v in prof.wall.items() if n.startswith("ref.")), cal


@contextmanager
def _record(prof: Profile, kind: str, n: int, into: list) -> Iterator[None]:
    """Append ``[s/vector, calibration s/vector, n]`` of the ``n`` vectors the block measures to
    ``into`` (per-vector samples for the ratios' intervals across runs)."""
    t0, c0 = _so_far(prof, kind)
    yield
    t1, c1 = _so_far(prof, kind)
    into.append([(t1 - t0) / n, (c1 - c0) / n, n])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny_check and not args.gemma_shaped:
        raise SystemExit("--tiny-check goes with --gemma-shaped")
    t_start = time.perf_counter()
    if args.tiny_check:
        args.ref_vectors, args.fast_vectors = min(args.ref_vectors, 1), min(args.fast_vectors, 2)
        args.vectors_per_batch = args.vectors_per_batch or 2
        args.ref_calibration_vectors = args.fast_vectors if args.ref_calibration_vectors else 0
    if args.ref_calibration_vectors not in (0, args.fast_vectors):
        raise SystemExit(
            f"--ref-calibration-vectors must be 0 or --fast-vectors ({args.fast_vectors}): the calibration ratio "
            "compares the same vectors"
        )
    s = gemma_setup(args) if args.gemma_shaped else smollm_setup(args)
    if args.calibration:
        s.calibration = s.calibration.model_copy(update={"method": args.calibration})
    t_load = time.perf_counter() - t_start
    shape = ModelShape.of(s.model, s.sae, s.hook)
    setup = Profile(s.device)
    ref = Profile(s.device)
    fast = Profile(s.device)
    sp = s.spec

    # one-time per run / worker, not counted per vector
    with setup.phase("fast: loss-chunk activations at the hook + unsteered loss"):
        resid = resid_at_hook(s.model, s.hook, s.loss_tokens)
        unsteered_fast = float(
            steered_losses(s.model, s.hook, s.loss_tokens, resid, torch.zeros(1, s.model.cfg.d_model, device=s.device))[
                0
            ]
        )
    with setup.phase("ref: unsteered loss (full forward)"):
        unsteered_ref = ref_unsteered_loss(s)
    if s.device.startswith("cuda"):  # CUDA/cuBLAS initialisation and first-call overheads, outside the timings
        with setup.phase("gpu warm-up (both generate paths, SAE encode)"):
            warm(s)
    hint = None
    if s.calibration.method == "secant":
        with setup.phase("fast: secant starting scale (sweep of 4 vectors, once per worker)"):
            hint = scale_hint(s.model, s.hook, s.loss_tokens, resid, s.vectors[:4], s.grid, s.target, unsteered_fast)
    target_ref = unsteered_ref + s.target.value if s.target.kind == "relative" else s.target.value
    baseline = torch.zeros(s.sae.cfg.d_sae)
    k = s.vectors_per_batch
    if args.warmup and not args.tiny_check:
        # The first call of each path at its shapes pays one-time costs (allocator growth, kernel
        # selection; measured 1.6x slower on the CPU) that a run of 01 pays once per worker.
        scratch = Profile(s.device)
        with setup.phase("warm-up: one untimed block of (b)"):
            fast_block(s, list(range(min(k, args.fast_vectors))), resid, unsteered_fast, baseline, scratch, hint)
        with setup.phase("warm-up: one untimed vector of (a)"):
            torch.manual_seed(s.seed)
            ref_vector(s, s.vectors[0], target_ref, scratch, shape)

    # interleave reference vectors and fast blocks, so machine-load drift hits both alike
    blocks = [list(range(i, min(i + k, args.fast_vectors))) for i in range(0, args.fast_vectors, k)]
    ref_rows = list(range(args.ref_vectors))
    stock = Profile(s.device)  # (a'): the reference loop on a stock TransformerLens model
    ref_scales, ref_status, ref_effects = [], [], []
    # per vector: [s, calibration s] of (a), (a') and (b)'s blocks; s of the reference's sweep alone
    each: dict[str, list] = {"ref": [], "fast": [], "stock_ref": [], "ref_calibration": [], "stock_ref_calibration": []}
    fast_scales = torch.full((args.fast_vectors,), float("nan"))
    fast_status: list[str] = [""] * args.fast_vectors
    fast_effects = torch.full((args.fast_vectors, s.sae.cfg.d_sae), float("nan"))
    torch.manual_seed(s.seed)  # TransformerLens samples from the global generator
    for i in range(max(len(blocks), len(ref_rows))):
        if i < len(ref_rows):
            r = ref_rows[i]
            t0 = time.perf_counter()
            with _record(ref, "ref", 1, each["ref"]):
                sc, st, eff = ref_vector(s, s.vectors[r], target_ref, ref, shape)
            eff = eff - baseline
            ref_scales.append(sc)
            ref_status.append(st)
            ref_effects.append(eff)
            print(
                f"  (a) vector {int(s.vector_ids[r])}: scale {sc:.2f} ({st}) in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
        if i < len(blocks):
            rows = blocks[i]
            t0 = time.perf_counter()
            with (
                instrumented(fast, shape, fine=not args.no_fine_profile and not s.device.startswith("cuda")),
                _record(fast, "fast", len(rows), each["fast"]),
            ):
                c, eff = fast_block(s, rows, resid, unsteered_fast, baseline, fast, hint)
            fast_scales[rows] = c.scales.float().cpu()
            for j, r in enumerate(rows):
                fast_status[r] = c.status[j]
            fast_effects[rows] = eff
            print(f"  (b) block of {len(rows)} vectors in {time.perf_counter() - t0:.1f} s", flush=True)

    ref_wall = sum(v for n, v in ref.wall.items() if n.startswith("ref."))
    ref_cpu = sum(v for n, v in ref.cpu.items() if n.startswith("ref."))
    fast_wall = fast.wall["fast.calibration"] + fast.wall["fast.measure_effects"]
    fast_cpu = fast.cpu["fast.calibration"] + fast.cpu["fast.measure_effects"]
    ref_vps, fast_vps = _rate(args.ref_vectors, ref_wall), _rate(args.fast_vectors, fast_wall)
    ratio = fast_vps / ref_vps
    ratio_cpu = _rate(args.fast_vectors, fast_cpu) / _rate(args.ref_vectors, ref_cpu)
    cal_ratio = (ref.wall["ref.calibration"] / args.ref_vectors) / (fast.wall["fast.calibration"] / args.fast_vectors)
    rollout_ratio = ((ref_wall - ref.wall["ref.calibration"]) / args.ref_vectors) / (
        fast.wall["fast.measure_effects"] / args.fast_vectors
    )
    # The stock-layout runs come last: interleaved with the timed blocks, their per-forward weight
    # copies slowed our next block by a quarter (2.68 vs 2.07 s/vector on the demo).
    # The machine's raw forward throughput at the batch shape of our average generate call:
    gen_rows = max(1, round(fast.count["gen_rows"] / max(fast.count["gen_calls"], 1)))
    raw_tps = raw_forward_tokens_per_s(s, gen_rows, sp.total_tokens, args.raw_reps)
    stock_fast = Profile(s.device)  # (b'): our first block again, on a stock TransformerLens model
    if args.stock_fast_block:
        t0 = time.perf_counter()
        with stock_transformer_lens(s.model):
            fast_block(s, blocks[0], resid, unsteered_fast, baseline, stock_fast, hint)
        print(f"  (b') block of {len(blocks[0])} vectors on stock TransformerLens in {time.perf_counter() - t0:.1f} s")
    torch.manual_seed(s.seed)
    for i in range(args.stock_ref_vectors):
        t0 = time.perf_counter()
        with stock_transformer_lens(s.model), _record(stock, "ref", 1, each["stock_ref"]):
            ref_vector(s, s.vectors[i], target_ref, stock, shape)
        print(
            f"  (a') vector {int(s.vector_ids[i])} on stock TransformerLens in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    # The reference's sweep alone on the vectors (b) calibrated, on our model (a) and on the stock one (a'):
    # its cost varies by vector (grid points up to the crossing), so the calibration ratio compares
    # the same vectors.
    cal_only: dict[str, float] = {}
    cal_runs = (("ref_calibration", contextlib.nullcontext), ("stock_ref_calibration", stock_transformer_lens))
    for kind, ctx in cal_runs if args.ref_calibration_vectors else ():
        scratch = Profile(s.device)
        with ctx(s.model):
            for i in range(args.ref_calibration_vectors):
                t0 = time.perf_counter()
                ref_calibrate(s, s.vectors[i], target_ref, scratch, shape)
                each[kind].append(time.perf_counter() - t0)
        cal_only[kind] = sum(each[kind]) / len(each[kind])
        print(f"  {kind}: {len(each[kind])} vectors, {cal_only[kind]:.3f} s/vector", flush=True)
    stock_wall = sum(v for n, v in stock.wall.items() if n.startswith("ref."))
    stock_ratio = fast_vps / _rate(args.stock_ref_vectors, stock_wall) if stock_wall else float("nan")
    stock_cal_ratio = (
        (stock.wall["ref.calibration"] / args.stock_ref_vectors) / (fast.wall["fast.calibration"] / args.fast_vectors)
        if stock_wall
        else float("nan")
    )
    eff_tps = fast.count["rollout_tokens"] / max(fast.wall["fast.measure_effects"], 1e-9)
    all_tps = fast.count["rollout_tokens"] / max(fast_wall, 1e-9)
    chunk_evals = fast.count["chunk_evals"] / s.loss_tokens.shape[0] / args.fast_vectors
    profile_lines = profile_block(s, blocks[0], resid, unsteered_fast, baseline, hint) if args.profile else []

    common = ref_rows
    rs = torch.tensor(ref_scales, dtype=torch.float64)
    fs = fast_scales[common].double()
    both = torch.isfinite(rs) & torch.isfinite(fs)
    max_scale_diff = float((rs[both] - fs[both]).abs().max()) if both.any() else float("nan")
    cos = []
    for j, r in enumerate(common):
        a, b = ref_effects[j], fast_effects[r]
        if torch.isfinite(a).all() and torch.isfinite(b).all():
            cos.append(float(torch.nn.functional.cosine_similarity(a[None], b[None])[0]))

    lines = []
    out = lines.append
    out("")
    out("=" * 78)
    out("effects throughput: (a) reference one-vector loop vs (b) calibrate_scales + measure_effects")
    out("=" * 78)
    for key, val in s.label.items():
        out(f"{key:>16}: {val}")
    out(f"{'hook':>16}: {s.hook} (layer {shape.hook_layer} of {shape.n_layers})")
    out(f"{'prompts':>16}: {len(sp.prompts)} (token lengths {[len(p) for p in sp.prompts]})")
    out(
        f"{'samples/prompt':>16}: {sp.samples_per_prompt}  -> {len(sp.prompts) * sp.samples_per_prompt} rollouts/vector"
    )
    out(
        f"{'total tokens':>16}: {sp.total_tokens} (prompt included); include_first_position={sp.include_first_position}"
    )
    out(f"{'sampling':>16}: top_k {sp.sampling.top_k}, top_p {sp.sampling.top_p}, T {sp.sampling.temperature}")
    out(f"{'scale grid':>16}: {s.grid[0]:g}..{s.grid[-1]:g} step {s.grid[1] - s.grid[0]:g} ({len(s.grid)} points)")
    out(
        f"{'loss chunks':>16}: {s.loss_tokens.shape[0]} x {s.loss_tokens.shape[1]} tokens; target {s.target.kind} "
        f"{s.target.value:+g} -> {target_ref:.4f} (unsteered: full fwd {unsteered_ref:.5f}, from hook {unsteered_fast:.5f})"
    )
    out(f"{'block size (b)':>16}: {k} vectors -> {k * sp.samples_per_prompt} generation rows per prompt")
    out(
        f"{'device':>16}: {s.device}; torch {torch.__version__}; threads {torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}); cpus {os.cpu_count()}; "
        f"{platform.processor() or platform.machine()}"
    )
    if s.device.startswith("cuda"):
        out(f"{'gpu':>16}: {torch.cuda.get_device_name()}")
    with suppress(OSError):
        out(f"{'load average':>16}: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (at the end of the run)")
    out(
        f"{'non-emb params':>16}: {shape.n_params / 1e6:.1f} M (blocks {shape.n_layers} x "
        f"{shape.block_params / 1e6:.2f} M + unembed {shape.unembed_params / 1e6:.1f} M); SAE enc "
        f"{shape.sae_enc_params / 1e6:.1f} M"
    )
    out("-" * 78)
    out(
        f"one-time setup (not per vector): model+SAE load {t_load:.1f} s; "
        + "; ".join(f"{n} {setup.wall[n]:.2f} s" for n in setup.wall)
    )
    out("-" * 78)
    out(
        f"(a) reference: {args.ref_vectors} vectors in {ref_wall:.1f} s wall ({ref_cpu:.1f} s CPU) "
        f"-> {ref_vps:.4f} vectors/s ({ref_wall / max(args.ref_vectors, 1):.2f} s/vector)"
    )
    for n in ("ref.calibration", "ref.generate", "ref.rerun_to_hook", "ref.sae_encode"):
        out(
            f"      {n:<34} {ref.wall[n] / max(args.ref_vectors, 1):8.3f} s/vector  ({100 * ref.wall[n] / ref_wall:5.1f}%)"
        )
    out(f"      grid points (full forwards) per vector: {ref.count['grid_points'] / max(args.ref_vectors, 1):.2f}")
    out(
        f"(b) ours:      {args.fast_vectors} vectors in {fast_wall:.1f} s wall ({fast_cpu:.1f} s CPU) "
        f"-> {fast_vps:.4f} vectors/s ({fast_wall / max(args.fast_vectors, 1):.3f} s/vector)"
    )
    fast_names = [
        "fast.calibration",
        "fast.measure_effects",
        "fast.generate(+capture)",
        "fast.generate.sampling",
        "fast.generate.row_uniforms",
        "fast.sae_encode",
    ]
    for n in fast_names:
        if n in fast.wall:
            out(
                f"      {n:<34} {fast.wall[n] / args.fast_vectors:8.3f} s/vector  ({100 * fast.wall[n] / fast_wall:5.1f}%)"
            )
    other = fast.wall["fast.measure_effects"] - fast.wall["fast.generate(+capture)"] - fast.wall["fast.sae_encode"]
    out(
        f"      {'fast.measure_effects other':<34} {other / args.fast_vectors:8.3f} s/vector  "
        f"({100 * other / fast_wall:5.1f}%)  (seeds, FeatureSums, host copies)"
    )
    out(
        f"      calibration ({s.calibration.method}): loss evaluations on all {s.loss_tokens.shape[0]} chunks "
        f"per vector {chunk_evals:.2f} (coarse ones pro rata), from the layer after the hook"
    )
    out("-" * 78)
    out(f"SPEED-UP (b)/(a): {ratio:.1f}x vectors/s by wall clock ({ratio_cpu:.1f}x by process CPU time); target >= 40x")
    out(f"  calibration only: {cal_ratio:.1f}x (target >= 10x); rollouts+encode only: {rollout_ratio:.1f}x")
    if args.stock_fast_block:
        sf = stock_fast.wall["fast.calibration"] + stock_fast.wall.get("fast.measure_effects", 0.0)
        nb = len(blocks[0])
        out(
            f"  (b') our first block on a stock TransformerLens model: {sf / nb:.3f} s/vector "
            f"(calibration {stock_fast.wall['fast.calibration'] / nb:.3f}); our model changes make (b) "
            f"{sf / nb / (fast_wall / args.fast_vectors):.2f}x faster, (a) "
            f"{(stock_wall / max(args.stock_ref_vectors, 1)) / (ref_wall / args.ref_vectors):.2f}x"
        )
    fast_cal = fast.wall["fast.calibration"] / args.fast_vectors
    for kind, label in (("ref_calibration", "(a)"), ("stock_ref_calibration", "(a')")):
        if kind in cal_only:
            out(
                f"  calibration alone on vectors 0-{args.ref_calibration_vectors - 1}: the reference's sweep {label} "
                f"{cal_only[kind]:.3f} s/vector vs ours {fast_cal:.3f} over vectors 0-{args.fast_vectors - 1} "
                f"-> {cal_only[kind] / fast_cal:.1f}x"
            )
    if stock_wall:
        out(
            f"  (a') the reference loop on a stock TransformerLens model (a weight copy per forward, the KV cache "
            f"repeated per query head, as the reference code runs on TransformerLens 3): {stock_wall / args.stock_ref_vectors:.2f} s/vector over "
            f"{args.stock_ref_vectors} -> (b)/(a') {stock_ratio:.1f}x overall, calibration {stock_cal_ratio:.1f}x"
        )
    out(
        f"  effects step (rollouts, capture, encode): {eff_tps:,.0f} rollout tokens/s = "
        f"{100 * eff_tps / raw_tps:.0f}% of a raw batched forward ({raw_tps:,.0f} tokens/s at [{gen_rows}, "
        f"{sp.total_tokens}], same dtype and threads; target >= 80%); with calibration {all_tps:,.0f} tokens/s "
        f"= {100 * all_tps / raw_tps:.0f}%"
    )
    out(
        f"scales of the same {len(common)} vectors, (a) vs (b): ref {[round(x, 3) for x in ref_scales]} "
        f"({ref_status}) vs ours {[round(float(x), 3) for x in fast_scales[common]]} ({[fast_status[r] for r in common]})"
    )
    out(f"  max |scale_a - scale_b| = {max_scale_diff:.3g}")
    out(
        f"  cosine(effect_a, effect_b) per vector (different sampling RNG, {len(sp.prompts) * sp.samples_per_prompt} "
        f"rollouts each, so only roughly similar): {[round(c, 3) for c in cos]}"
    )
    out(
        f"  (b) scale statuses over all {args.fast_vectors}: "
        f"{ {st: fast_status.count(st) for st in sorted(set(fast_status))} }"
    )
    ref_fl, fast_fl = shape.flops(ref), shape.flops(fast)
    peak = args.peak_tflops * 1e12
    out(
        f"model FLOPs (2 x params used x tokens): (a) {ref_fl / max(args.ref_vectors, 1) / 1e12:.3f} TFLOP/vector at "
        f"{ref_fl / ref_wall / 1e12:.3f} TFLOP/s = {100 * ref_fl / ref_wall / peak:.2f}% of {args.peak_tflops:g}; "
        f"(b) {fast_fl / args.fast_vectors / 1e12:.3f} TFLOP/vector at {fast_fl / fast_wall / 1e12:.3f} TFLOP/s "
        f"= {100 * fast_fl / fast_wall / peak:.2f}% of peak"
    )
    lines += profile_lines
    out(f"total benchmark wall time: {time.perf_counter() - t_start:.0f} s")
    out("=" * 78)
    print("\n".join(lines), flush=True)

    result = {
        "settings": {
            **{k2: str(v) for k2, v in s.label.items()},
            "hook": s.hook,
            "prompts": len(sp.prompts),
            "samples_per_prompt": sp.samples_per_prompt,
            "total_tokens": sp.total_tokens,
            "grid": s.grid,
            "loss_chunks": list(s.loss_tokens.shape),
            "target": s.target.model_dump(),
            "vectors_per_batch": k,
            "device": s.device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "argv": sys.argv[1:] if argv is None else argv,
        },
        "ref": {
            "vectors": args.ref_vectors,
            "wall_s": ref_wall,
            "cpu_s": ref_cpu,
            "vectors_per_s": ref_vps,
            "phases_wall_s": dict(ref.wall),
            "counts": dict(ref.count),
            "flops": ref_fl,
        },
        "fast": {
            "vectors": args.fast_vectors,
            "wall_s": fast_wall,
            "cpu_s": fast_cpu,
            "vectors_per_s": fast_vps,
            "phases_wall_s": dict(fast.wall),
            "counts": dict(fast.count),
            "flops": fast_fl,
        },
        "setup_wall_s": dict(setup.wall),
        "load_s": t_load,
        "ratio_wall": ratio,
        "ratio_cpu": ratio_cpu,
        "ratio_calibration": cal_ratio,
        "ratio_rollouts": rollout_ratio,
        "stock_ref": {"vectors": args.stock_ref_vectors, "wall_s": stock_wall, "phases_wall_s": dict(stock.wall)},
        "ratio_wall_vs_stock_ref": stock_ratio,
        "ratio_calibration_vs_stock_ref": stock_cal_ratio,
        "stock_fast": {
            "vectors": len(blocks[0]) if args.stock_fast_block else 0,
            "phases_wall_s": dict(stock_fast.wall),
        },
        "per_vector_s": each,
        "calibration_alone_s_per_vector": cal_only,
        "calibration_method": s.calibration.method,
        "calibration_chunk_evals_per_vector": chunk_evals,
        "raw_forward_tokens_per_s": raw_tps,
        "raw_forward_batch": [gen_rows, sp.total_tokens],
        "effects_tokens_per_s": eff_tps,
        "effects_fraction_of_raw": eff_tps / raw_tps,
        "max_abs_scale_diff": max_scale_diff,
        "ref_scales": ref_scales,
        "fast_scales_same_vectors": fast_scales[common].tolist(),
        "effect_cosines": cos,
        "report": "\n".join(lines),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
