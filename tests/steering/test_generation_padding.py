"""Regression: a token equal to the pad id must not be masked during KV-cache generation."""

import torch

from helpers import HOOK
from saets_utils.steering.generation import generate


def test_pad_token_in_sequence_is_attended_with_kv_cache(tiny_model):
    pad = tiny_model.tokenizer.pad_token_id
    prompt = torch.tensor([[1, 40, 41, pad]] * 2)  # ends in the pad id, as a sampled token may
    cached = generate(
        tiny_model, prompt, 6, [0, 1], sampling=None, hook_name=HOOK, delta=None, use_cache=True, capture=True
    )
    full = generate(
        tiny_model, prompt, 6, [0, 1], sampling=None, hook_name=HOOK, delta=None, use_cache=False, capture=True
    )
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.allclose(cached.activations, full.activations, atol=1e-4)
