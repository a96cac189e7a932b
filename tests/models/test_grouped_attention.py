"""grouped_attention: grouped-query attention without repeating the key/value cache; the same
outputs and hook values as TransformerLens's (to float rounding), and stock_attention undoes it."""

import pickle

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from saets_utils.config import ModelConfig
from saets_utils.models.grouped_attention import (
    calculate_attention_scores,
    grouped_attention,
    is_grouped_attention,
    stock_attention,
)
from saets_utils.models.loading import load_model
from saets_utils.models.tiny import tiny_gemma2_model, tiny_model

HOOKS = ("blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z")


def _outputs(model, tokens):
    """Full-sequence logits, three KV-cache decoding steps' logits and three attention hooks."""
    with torch.no_grad():
        full, cache = model.run_with_cache(tokens, names_filter=list(HOOKS))
        kv = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0])
        steps = [model(tokens[:, :5], past_kv_cache=kv)[:, -1]]
        for i in range(5, 8):
            steps.append(model(tokens[:, i : i + 1], past_kv_cache=kv)[:, -1])
    return [full, torch.stack(steps), *(cache[h] for h in HOOKS)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_grouped_attention_matches_transformer_lens_and_stock_attention_restores(dtype, tol):
    model = tiny_gemma2_model(seed=3, dtype=dtype)  # 4 query heads on 2 key/value heads, soft caps
    tokens = torch.randint(3, model.cfg.d_vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    assert not is_grouped_attention(model)
    before = _outputs(model, tokens)
    assert grouped_attention(model) == model.cfg.n_layers
    assert is_grouped_attention(model) and grouped_attention(model) == 0  # idempotent
    after = _outputs(model, tokens)
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b.float(), a.float(), atol=tol, rtol=tol)
    assert not torch.equal(before[0], _outputs(tiny_gemma2_model(seed=4, dtype=dtype), tokens)[0])  # tol is tight
    with stock_attention(model):
        assert not is_grouped_attention(model)
        for a, b in zip(before, _outputs(model, tokens), strict=True):
            assert torch.equal(a, b)  # TransformerLens's own methods: bitwise its results
    assert is_grouped_attention(model)


def test_grouped_attention_does_not_repeat_the_key_value_cache():
    model = tiny_gemma2_model(seed=5)
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(1))

    def repeats() -> int:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(tokens)
        return sum(1 for ev in prof.events() if ev.name == "aten::repeat_interleave")

    assert repeats() >= 2 * model.cfg.n_layers  # keys and values, every layer
    grouped_attention(model)
    assert repeats() == 0


def test_a_pickled_model_keeps_grouped_attention():
    model = tiny_gemma2_model(seed=6)
    grouped_attention(model)
    again = pickle.loads(pickle.dumps(model))
    assert is_grouped_attention(again)
    assert all(
        m.calculate_attention_scores.func is calculate_attention_scores
        for m in again.modules()
        if "calculate_attention_scores" in vars(m)
    )


def test_models_without_grouped_query_attention_are_left_alone():
    model = tiny_model(seed=0)
    assert grouped_attention(model) == 0 and is_grouped_attention(model)


def test_load_model_uses_grouped_attention():
    assert is_grouped_attention(load_model(ModelConfig(source="tiny_gemma2", name="tiny_gemma2")))
