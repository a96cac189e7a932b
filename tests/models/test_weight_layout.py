"""linear_layout: TransformerLens's weights stored as its forward pass reads them; results bitwise
unchanged, no per-forward weight copies, and stock_layout gives TransformerLens's own layout back."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from saets_utils.config import ModelConfig
from saets_utils.models.loading import load_model
from saets_utils.models.tiny import tiny_gemma2_model, tiny_model
from saets_utils.models.weight_layout import is_linear_layout, linear_layout, stock_layout


def _outputs(model, tokens):
    """Full-sequence logits and three KV-cache decoding steps' logits."""
    with torch.no_grad():
        full = model(tokens)
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0])
        steps = [model(tokens[:, :5], past_kv_cache=cache)[:, -1]]
        for i in range(5, 8):
            steps.append(model(tokens[:, i : i + 1], past_kv_cache=cache)[:, -1])
    return full, torch.stack(steps)


def _weight_copies(model, tokens) -> int:
    """How many tensors shaped like a (permuted) projection weight one forward copies."""
    from saets_utils.models.weight_layout import _handled

    shapes = {tuple(p.permute(*perm).shape) for p, perm in _handled(model)}
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(tokens)
    return sum(
        1
        for ev in prof.events()
        if ev.name == "aten::copy_" and ev.input_shapes and tuple(ev.input_shapes[0]) in shapes
    )


@pytest.mark.parametrize(
    "make,dtype",
    [(tiny_model, torch.float32), (tiny_gemma2_model, torch.float32), (tiny_gemma2_model, torch.bfloat16)],
    ids=["tiny-fp32", "gemma2-fp32", "gemma2-bf16"],
)
def test_linear_layout_changes_no_result_and_stock_layout_restores(make, dtype):
    model = make(seed=3, dtype=dtype)
    tokens = torch.randint(3, model.cfg.d_vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    assert not is_linear_layout(model)
    before = _outputs(model, tokens)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    assert linear_layout(model) > 0
    assert is_linear_layout(model) and linear_layout(model) == 0  # idempotent
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameter objects
    after = _outputs(model, tokens)
    for a, b in zip(before, after):
        assert torch.equal(a, b)  # bitwise
    with stock_layout(model):
        assert not is_linear_layout(model)
        assert all(p.is_contiguous() for p in model.parameters())
        for a, b in zip(before, _outputs(model, tokens)):
            assert torch.equal(a, b)
    assert is_linear_layout(model)


def test_linear_layout_removes_transformer_lens_weight_copies():
    model = tiny_gemma2_model(seed=4)
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    stock = _weight_copies(model, tokens)
    linear_layout(model)
    assert stock >= 5 * model.cfg.n_layers  # Q, K, V, O, gate, in, out per block, and W_U
    assert _weight_copies(model, tokens) == 0


def test_load_model_lays_weights_out_and_dtype_casts_keep_it():
    model = load_model(ModelConfig(source="tiny", name="tiny"))
    assert is_linear_layout(model)
    model.to(torch.bfloat16)
    assert is_linear_layout(model)
