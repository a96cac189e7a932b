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
    d_in: int = 32, d_sae: int = 64, k: int = 4, seed: int = 0, hook_name: str = "blocks.1.hook_resid_post"
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
