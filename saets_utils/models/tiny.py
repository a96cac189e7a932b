"""Tiny, seeded, offline stand-ins (model, tokenizer, SAE) for unit tests and quick experiments.

They exercise the same code paths as the real model: a HookedTransformer with a real HF tokenizer
(byte-level, built in memory and reloaded from a folder, as TransformerLens needs) and a sae_lens SAE.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

TINY_VOCAB = [chr(c) for c in range(32, 127)] + ["\n"]


def tiny_tokenizer(folder: str | Path | None = None):
    """A character-level ``PreTrainedTokenizerFast`` (ids 0,1 = <eot>, <bos>), reloaded from disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<eot>": 0, "<bos>": 1, **{ch: i + 2 for i, ch in enumerate(TINY_VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eot>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eot>", unk_token="<eot>", pad_token="<eot>"
    )
    folder = Path(folder or tempfile.mkdtemp(prefix="saets-tiny-tok-"))
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_model(
    seed: int = 0, d_model: int = 32, n_layers: int = 3, dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """A seeded random HookedTransformer (``n_layers`` blocks, ``d_model`` wide) with the tiny tokenizer."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok = tiny_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=8,
        n_heads=d_model // 8,
        d_mlp=4 * d_model,
        d_vocab=len(tok),
        n_ctx=128,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        tokenizer_name=None,
        dtype=dtype,
        default_prepend_bos=False,
        positional_embedding_type="rotary",
    )
    model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_sae(
    *, d_in: int = 32, d_sae: int = 64, k: int = 4, seed: int = 0, hook_name: str = "blocks.1.hook_resid_post"
) -> SAE:
    """A seeded random TopK sae_lens SAE with unit-norm decoder rows."""
    from sae_lens import TopKSAE, TopKSAEConfig

    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T * 0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.01)
        sae.b_dec.zero_()
    sae.cfg.metadata.hook_name = hook_name
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def tiny_gemma2_model(
    *,
    seed: int = 0,
    d_model: int = 64,
    n_layers: int = 4,
    dtype: torch.dtype = torch.float32,
    sink_norm: float = 200.0,
    unembed_std: float = 0.5,
) -> HookedTransformer:
    """A seeded random HookedTransformer with Gemma-2's architecture options (RMSNorm before and
    after each sublayer, grouped-query attention, attention and logit soft-capping, alternating
    local/global attention, gated GELU MLP, rotary positions) and the tiny tokenizer.

    The local window (8 tokens) is shorter than the sequences, so local and global layers differ.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok = tiny_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=16,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=2 * d_model,
        d_vocab=len(tok),
        n_ctx=256,
        eps=1e-6,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        final_rms=True,
        use_normalization_before_and_after=True,
        positional_embedding_type="rotary",
        rotary_base=10000.0,
        use_attn_scale=True,
        use_local_attn=True,
        window_size=8,
        attn_types=["local", "global"] * (n_layers // 2) + ["local"] * (n_layers % 2),
        attn_scores_soft_cap=50.0,
        output_logits_soft_cap=30.0,
        gated_mlp=True,
        seed=seed,
        tokenizer_name=None,
        dtype=dtype,
        default_prepend_bos=False,
        original_architecture="Gemma2ForCausalLM",
    )
    model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    _shape_like_an_lm(model, sink_norm, unembed_std, seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# Rough English character frequencies: the unembedding bias of the tiny Gemma-shaped model.
_CHAR_FREQ = dict(
    zip(
        " etaoinshrdlucmwfgypb,.vk",
        [180, 100, 75, 65, 62, 57, 57, 53, 50, 50, 35, 33, 23, 22, 20, 18, 18, 16, 16, 15, 12, 10, 10, 8, 6],
    )
)


@torch.no_grad()
def _shape_like_an_lm(model: HookedTransformer, sink_norm: float, unembed_std: float, seed: int) -> None:
    """Give random weights the two traits scale calibration needs: an unsteered loss below the
    reference's absolute target (4 nats; uniform over the tiny vocab would be 4.6) and a loss that
    rises when steered. Every token's embedding carries a large shared direction that the
    unembedding ignores (like a real LM's massive activations), the unembedding bias holds English
    character frequencies, and the other directions read out with ``unembed_std``: steering away
    from the shared direction randomises the logits."""
    g = torch.Generator().manual_seed(seed + 1)
    d = model.cfg.d_model
    sink = torch.randn(d, generator=g)
    sink = sink / sink.norm()
    vocab = model.tokenizer.get_vocab()  # type: ignore[union-attr]
    freq = torch.full((model.cfg.d_vocab,), 1.0)
    for ch, f in _CHAR_FREQ.items():
        freq[vocab[ch]] = float(f)
    w_u = torch.randn(d, model.cfg.d_vocab, generator=g) * unembed_std
    w_u -= torch.outer(sink, sink @ w_u)
    model.W_U.copy_(w_u.to(model.W_U.dtype))
    model.b_U.copy_((freq / freq.sum()).log().to(model.b_U.dtype))
    model.W_E.add_((sink_norm * sink).to(model.W_E.dtype))


def write_gemma_scope_npz(
    path: str | Path, d_in: int, d_sae: int, *, seed: int = 0, acts: torch.Tensor | None = None, density: float = 0.02
) -> Path:
    """Write a seeded random JumpReLU SAE as a Gemma Scope ``params.npz`` (``W_enc [d_in, d_sae]``,
    ``W_dec [d_sae, d_in]`` with unit rows, ``b_enc``, ``b_dec``, ``threshold``).

    With ``acts [n, d_in]`` (activations at the hook), ``b_enc`` centres each feature's
    pre-activation there and its threshold is the ``1 - density`` quantile, so about ``density`` of
    positions fire each feature.
    """
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    w_enc = w_dec.T.clone()
    b_enc = torch.zeros(d_sae)
    if acts is not None:  # centre each feature's pre-activation, so every feature can fire
        pre = acts.float() @ w_enc
        b_enc = -pre.mean(0)
        threshold = (pre + b_enc).quantile(1 - density, dim=0).clamp(min=1e-6)
    else:
        threshold = torch.full((d_sae,), 0.1)
    params = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": torch.zeros(d_in), "threshold": threshold}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v.numpy().astype(np.float32) for k, v in params.items()})
    return path


def write_reference_ci_assets(
    folder: str | Path, texts: list[str], d_sae: int = 16384, d_sae_vectors: int = 512
) -> Path:
    """The local stand-ins of ``params/gemma-ci.yaml`` in ``folder``: ``loss_text.txt`` (``texts``,
    one document per paragraph), ``sae_16k/params.npz`` (a random JumpReLU SAE at
    ``blocks.12.hook_resid_post`` of :func:`tiny_gemma2_model`, as wide as the reference SAE so the
    task files' Gemma Scope feature ids stay valid) and ``sae_vectors/params.npz`` (the SAE whose
    decoder rows 01 measures, standing in for the 65k SAE). Thresholds from the model's activations."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "loss_text.txt").write_text("\n\n".join(t.strip() for t in texts) + "\n", encoding="utf-8")
    model = tiny_gemma2_model(seed=0)
    ids = [1, *model.tokenizer.encode(" ".join(texts)[:2000], add_special_tokens=False)]  # type: ignore[union-attr]
    rows = torch.tensor([ids[i : i + 32] for i in range(0, len(ids) - 32, 32)])
    hook = "blocks.2.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(rows, names_filter=hook, stop_at_layer=3)
    acts = cache[hook].flatten(0, 1)
    d = model.cfg.d_model
    write_gemma_scope_npz(folder / "sae_16k" / "params.npz", d, d_sae, seed=1, acts=acts)
    write_gemma_scope_npz(folder / "sae_vectors" / "params.npz", d, d_sae_vectors, seed=2, acts=acts)
    return folder
