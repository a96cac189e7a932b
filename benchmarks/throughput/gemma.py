"""A Gemma-2-2B-shaped run with random weights, for timing the GPU path without the real weights.

The model is built from ``convert_hf_model_config("google/gemma-2-2b")`` (hard-coded in
TransformerLens, no hub) directly on the device; the SAE is a random JumpReLU SAE of width 16384
at ``blocks.12.hook_resid_post``; prompts are random token ids at the lengths Gemma's tokenizer
gives the reference prompts; the effect settings are the reference's (``EffectsConfig`` defaults).
``tiny`` (``--smoke`` / ``--tiny-check``) shrinks it to 2 layers and narrow widths, same
architecture, so the code path runs on a CPU in seconds.
"""

from __future__ import annotations

import torch

from benchmarks.throughput.setup import Setup
from saets_utils.config import EffectsConfig, LossTarget, SamplingConfig
from saets_utils.effects.calibration import resid_at_hook, steered_losses
from saets_utils.effects.measure import RolloutSpec
from saets_utils.models.grouped_attention import grouped_attention
from saets_utils.models.weight_layout import linear_layout

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
GEMMA_BOS = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _model(cfg_dict: dict, device: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saets_utils.models.tiny import tiny_tokenizer

    cfg = HookedTransformerConfig(
        **{k: v for k, v in cfg_dict.items() if k in HookedTransformerConfig.__dataclass_fields__}
    )
    # TransformerLens needs a tokenizer to build attention masks when a KV cache is passed (our
    # generate); a character-level stand-in with pad id 0 and right padding, as Gemma's tokenizer.
    torch.manual_seed(0)
    with torch.device(device):
        model = HookedTransformer(cfg, tokenizer=tiny_tokenizer(), move_to_device=False, default_padding_side="right")
    assert model.cfg.d_vocab == cfg_dict["d_vocab"] and model.tokenizer.pad_token_id == 0
    model.to(device).eval()
    linear_layout(model)  # as saets_utils.models.loading.load_model prepares every model
    grouped_attention(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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


def _sae(w_dec: torch.Tensor, device: str):
    """A JumpReLU SAE with decoder rows ``w_dec [d_sae, d_model]``, encoder their transpose, threshold 0.5."""
    d_sae, d_model = w_dec.shape
    try:
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_model, d_sae=d_sae, device=device, apply_b_dec_to_input=False))
    except ImportError:
        print("sae_lens not importable here: a stand-in JumpReLU encoder with the same math is used", flush=True)
        sae = _StandInJumpReLU(d_model, d_sae, device)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(0.5)
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def gemma_setup(
    *,
    vectors: int,
    tiny: bool,
    device: str | None,
    dtype: str | None,
    target_scale: float,
    max_prompts: int | None = None,
    vectors_per_batch: int | None = None,
) -> Setup:
    """The first ``vectors`` decoder rows of the random SAE as steering vectors, at the reference
    settings (``tiny``: 2 layers, narrow widths, 3 prompts x 2 samples x 8 tokens, 2 x 16 loss chunks)."""
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 matmuls are slow on CPUs without bf16 units: the CPU smoke test defaults to float32
    dtype = dtype or ("float32" if tiny and device == "cpu" else "bfloat16")
    cfg_dict = dict(convert_hf_model_config("google/gemma-2-2b"))
    e = EffectsConfig()  # the reference settings
    layer, d_sae = 12, 16384
    prompts, samples, total = e.prompts, e.samples_per_prompt, e.total_tokens
    chunks, chunk_tokens = e.loss_chunks, e.loss_chunk_tokens
    if tiny:  # the same architecture at narrow widths
        cfg_dict.update(n_layers=2, d_model=256, d_head=64, n_heads=4, n_key_value_heads=2, d_mlp=1024, d_vocab=2048)
        cfg_dict["attn_types"] = ["local", "global"]
        layer, d_sae, prompts, samples, total, chunks, chunk_tokens = 0, 1024, e.prompts[2:5], 2, 8, 2, 16
    prompts = prompts[:max_prompts] if max_prompts else prompts
    cfg_dict.update(
        dtype=DTYPES[dtype],
        device=device,
        tokenizer_name=None,
        default_prepend_bos=False,
        model_name="gemma-2-2b-shaped-random",
    )
    model = _model(cfg_dict, device)
    hook = f"blocks.{layer}.hook_resid_post"
    g = torch.Generator().manual_seed(1)
    w_dec = torch.randn(d_sae, model.cfg.d_model, generator=g)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    sae = _sae(w_dec, device)
    vocab = model.cfg.d_vocab
    prompt_ids = tuple(
        (GEMMA_BOS, *torch.randint(3, vocab, (GEMMA_PROMPT_LENGTHS.get(p, 3),), generator=g).tolist()) for p in prompts
    )
    spec = RolloutSpec(
        prompts=prompt_ids,
        samples_per_prompt=samples,
        total_tokens=total,
        sampling=SamplingConfig(),
        include_first_position=True,
    )
    loss_tokens = torch.randint(3, vocab, (chunks, chunk_tokens), generator=g)
    loss_tokens[:, 0] = GEMMA_BOS
    loss_tokens = loss_tokens.to(device)
    vecs = w_dec[:vectors].to(device)
    target, note = gemma_target(model, hook, loss_tokens, vecs, target_scale)
    label = {
        "model": f"Gemma-2-2B-shaped, random weights ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
        f"vocab {vocab}, {dtype})" + (" [TINY CHECK]" if tiny else ""),
        "params": "reference settings (EffectsConfig defaults; 14 prompts x 64 samples x 32 tokens, 64 x 32 loss chunks)",
        "sae": f"random JumpReLU d_sae {d_sae}, float32",
        "start token id": GEMMA_BOS,
        "loss target": note,
    }
    return Setup(
        model=model,
        sae=sae,
        hook=hook,
        spec=spec,
        loss_tokens=loss_tokens,
        vector_ids=torch.arange(vectors),
        vectors=vecs,
        grid=e.scale_grid.values(),
        target=target,
        seed=0,
        vectors_per_batch=vectors_per_batch or e.vectors_per_batch,
        device=device,
        label=label,
        calibration=e.calibration,
    )


@torch.no_grad()
def gemma_target(
    model, hook: str, loss_tokens: torch.Tensor, vectors: torch.Tensor, scale: float
) -> tuple[LossTarget, str]:
    """A relative loss target that random-weight vectors cross near ``scale``, so the scale search
    costs about as many grid points as on a trained model (a random model's loss barely reacts to
    steering, and a fixed +0.5 would make every vector sweep the whole grid)."""
    if scale <= 0:
        return LossTarget(kind="relative", value=0.5), "relative +0.5 (as the paper)"
    resid = resid_at_hook(model, hook, loss_tokens)
    zero = torch.zeros(1, vectors.shape[1], device=vectors.device)
    base = float(steered_losses(model, hook, loss_tokens, resid, zero)[0])
    value = float((steered_losses(model, hook, loss_tokens, resid, vectors[:4] * scale) - base).median())
    if not value > 1e-3:
        return LossTarget(kind="relative", value=0.5), (
            f"relative +0.5 (the random model's loss does not rise with steering: {value:+.4f} at scale "
            f"{scale:g}; full-grid sweeps)"
        )
    return LossTarget(kind="relative", value=value), (
        f"relative {value:+.4f} = median loss rise of 4 vectors at scale {scale:g} (--gemma-target-scale), "
        "so crossings land near it"
    )
