"""Steering through a hook and seeded generation on the tiny model: the hook adds exactly
``scale * v`` everywhere and nothing else, leaves no trace after the block, and generation is the
same with or without KV cache, batched or one row at a time."""

from __future__ import annotations

import pytest
import torch

from helpers import HOOK
from saets_utils.config import SamplingConfig
from saets_utils.models.grouped_attention import grouped_attention
from saets_utils.models.tiny import tiny_gemma2_model
from saets_utils.steering.generation import generate, generate_aligned, row_seed, row_uniforms, sample_from_logits
from saets_utils.steering.hooks import steering_delta, steering_hook

NEXT = "blocks.2.hook_resid_pre"  # what the layers after the hook actually receive
SAMPLING = SamplingConfig(top_k=50, top_p=0.3)
WIDE_SAMPLING = SamplingConfig(top_k=40, top_p=0.9)  # many candidate tokens: a sharper test of seeding


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    v = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def tokens(tiny_model):
    """``[3, 10]`` chunks that start with BOS (id 1), as every sequence does in the project."""
    g = torch.Generator().manual_seed(0)
    body = torch.randint(2, tiny_model.cfg.d_vocab, (3, 9), generator=g)
    return torch.cat([torch.ones(3, 1, dtype=torch.long), body], 1)


def assert_no_hooks(model) -> None:
    assert not model.hook_dict[HOOK].fwd_hooks
    assert not model.hook_dict[HOOK]._forward_hooks


# --- the hook ---------------------------------------------------------------------------------


def test_steering_delta_shapes_and_values():
    v = unit(3, 8, 0)
    d = steering_delta(v, [0.0, 2.0, -1.5])
    assert d.shape == (3, 8)
    torch.testing.assert_close(d, v * torch.tensor([0.0, 2.0, -1.5])[:, None])
    torch.testing.assert_close(steering_delta(v[0], 3.0), 3.0 * v[0])
    torch.testing.assert_close(steering_delta(v, torch.tensor(2.0)), 2.0 * v)


def test_hook_adds_scale_times_v_at_every_position(tiny_model, tokens):
    v = unit(1, tiny_model.cfg.d_model, 1)[0]
    delta = steering_delta(v, 7.0)
    _, clean = tiny_model.run_with_cache(tokens, names_filter=[HOOK])
    captured: list[torch.Tensor] = []
    with steering_hook(tiny_model, HOOK, delta, capture=captured):
        logits, steered = tiny_model.run_with_cache(tokens, names_filter=[NEXT])
    # downstream the residual stream is the clean one plus delta, at every position of every row
    diff = steered[NEXT] - clean[HOOK]
    torch.testing.assert_close(diff, delta.expand_as(diff), atol=1e-5, rtol=0)
    # the capture holds the activations before steering (those of the unsteered model)
    assert len(captured) == 1
    torch.testing.assert_close(captured[0], clean[HOOK], atol=0, rtol=0)
    # and the logits are those of running the later layers by hand on clean + delta
    manual = tiny_model(clean[HOOK] + delta, start_at_layer=2)
    torch.testing.assert_close(logits, manual, atol=1e-5, rtol=1e-5)
    assert (logits - tiny_model(tokens)).abs().max() > 1e-2  # the steering did something
    assert_no_hooks(tiny_model)


@pytest.mark.parametrize("delta", ["scale0", "zeros", "none"])
def test_zero_steering_changes_nothing(tiny_model, tokens, delta):
    d = {"scale0": steering_delta(unit(2, 32, 2), 0.0)[0], "zeros": torch.zeros(3, 32), "none": None}[delta]
    clean = tiny_model(tokens)
    with steering_hook(tiny_model, HOOK, d):
        hooked = tiny_model(tokens)
    assert torch.equal(hooked, clean)


def test_per_row_deltas_steer_each_row_by_its_own_delta(tiny_model, tokens):
    deltas = steering_delta(unit(3, 32, 3), [4.0, 0.0, -6.0])
    with steering_hook(tiny_model, HOOK, deltas):
        batched = tiny_model(tokens)
    for i in range(3):
        with steering_hook(tiny_model, HOOK, deltas[i]):
            alone = tiny_model(tokens[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    # row 1 has a zero delta: it is the clean model's output, unaffected by its neighbours' vectors
    torch.testing.assert_close(batched[1], tiny_model(tokens[1:2])[0], atol=1e-5, rtol=1e-5)
    assert (batched[0] - tiny_model(tokens[0:1])[0]).abs().max() > 1e-2


def test_hook_removed_after_normal_exit_and_after_exception(tiny_model, tokens):
    clean = tiny_model(tokens)
    delta = steering_delta(unit(1, 32, 4)[0], 10.0)
    with steering_hook(tiny_model, HOOK, delta):
        assert tiny_model.hook_dict[HOOK].fwd_hooks  # active inside the block
        assert not torch.equal(tiny_model(tokens), clean)
    assert_no_hooks(tiny_model)
    assert torch.equal(tiny_model(tokens), clean)

    with pytest.raises(RuntimeError, match="boom"), steering_hook(tiny_model, HOOK, delta, capture=[]):
        tiny_model(tokens)
        raise RuntimeError("boom")
    assert_no_hooks(tiny_model)
    assert torch.equal(tiny_model(tokens), clean)


# --- sampling ---------------------------------------------------------------------------------


def nucleus(logits: torch.Tensor, top_k: int, top_p: float) -> list[set[int]]:
    """Per row, the smallest set of most probable tokens (within the top k) whose mass reaches top_p."""
    out = []
    for row in logits:
        p, ids = row.float().topk(top_k).values.softmax(-1), row.float().topk(top_k).indices
        keep, mass = [], 0.0
        for pi, i in zip(p.tolist(), ids.tolist()):
            if mass >= top_p:
                break
            keep.append(i)
            mass += pi
        out.append(set(keep))
    return out


@pytest.fixture(scope="module")
def logits():
    return torch.randn(4, 97, generator=torch.Generator().manual_seed(5)) * 2.0


@pytest.mark.parametrize("top_k, top_p", [(50, 0.3), (5, 1.0), (97, 0.9), (3, 0.5)])
def test_samples_stay_in_top_k_and_nucleus_and_cover_it(logits, top_k, top_p):
    cfg = SamplingConfig(top_k=top_k, top_p=top_p)
    allowed = nucleus(logits, top_k, top_p)
    n = 2000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # a grid of uniforms over [0, 1)
    drawn = sample_from_logits(logits.repeat_interleave(n, 0), u.repeat(logits.shape[0]), cfg).view(-1, n)
    for r in range(logits.shape[0]):
        got = set(drawn[r].tolist())
        assert got <= allowed[r], f"row {r}: tokens {got - allowed[r]} outside the nucleus"
        assert got <= set(logits[r].topk(top_k).indices.tolist())
        assert got == allowed[r]  # inverse-CDF sampling reaches every token of the nucleus
        # frequencies over the uniform grid are the renormalised nucleus probabilities
        ids = torch.tensor(sorted(allowed[r]))
        p = logits[r, ids].softmax(-1)
        freq = torch.tensor([(drawn[r] == i).sum().item() / n for i in ids.tolist()])
        torch.testing.assert_close(freq, p, atol=2.0 / n, rtol=0)


def test_default_sampling_is_the_references_top_k_50_without_nucleus(logits):
    """The reference passed top_k=50, top_p=0.3 to TransformerLens, which applies top-p only when
    top-k is unset: what ran was top-k 50 at temperature 1. That is our default."""
    cfg = SamplingConfig()
    assert (cfg.top_k, cfg.top_p, cfg.temperature) == (50, None, 1.0)
    wide = torch.randn(3, 400, generator=torch.Generator().manual_seed(9))  # flat: top-50 keeps much mass out
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    drawn = sample_from_logits(wide.repeat_interleave(n, 0), u.repeat(3), cfg).view(3, n)
    for r in range(3):
        top = wide[r].topk(50).indices
        assert set(drawn[r].tolist()) == set(top.tolist())  # all 50 reachable, nothing else
        p = wide[r, top].double().softmax(-1)  # renormalised over the top 50, no nucleus cut
        freq = torch.stack([(drawn[r] == i).double().mean() for i in top])
        torch.testing.assert_close(freq, p, atol=2.0 / n, rtol=0)
    # with a nucleus set, far fewer tokens are reachable: the option is a real deviation
    nuc = sample_from_logits(wide.repeat_interleave(n, 0), u.repeat(3), SamplingConfig(top_p=0.3)).view(3, n)
    assert all(len(set(nuc[r].tolist())) < 50 for r in range(3))


def test_tiny_top_p_is_greedy_and_none_is_greedy(logits):
    u = torch.rand(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for uu in (u, torch.zeros(4, dtype=torch.float64), torch.full((4,), 0.999, dtype=torch.float64)):
        assert torch.equal(sample_from_logits(logits, uu, SamplingConfig(top_k=50, top_p=1e-6)), logits.argmax(-1))
    assert torch.equal(sample_from_logits(logits, u, None), logits.argmax(-1))
    # u = 0 picks the most probable token whatever the filtering
    u0 = torch.zeros(4, dtype=torch.float64)
    assert torch.equal(sample_from_logits(logits, u0, SamplingConfig()), logits.argmax(-1))


def test_sampling_is_deterministic_for_given_uniforms(logits):
    u = row_uniforms([11, 12, 13, 14], 1)[:, 0]
    a = sample_from_logits(logits, u, WIDE_SAMPLING)
    b = sample_from_logits(logits.clone(), u.clone(), WIDE_SAMPLING)
    assert torch.equal(a, b)
    many = row_uniforms(list(range(200)), 1)[:, 0]
    drawn = sample_from_logits(logits[:1].expand(200, -1), many, WIDE_SAMPLING)
    assert len(set(drawn.tolist())) > 1  # the uniforms do drive the choice


@pytest.mark.parametrize("u", [1.0 - 1e-9, 1.0 - 2**-25, 1.0 - 2**-24, 1.0 - 2**-53])
def test_uniform_next_to_one_stays_in_nucleus(logits, u):
    # legal draws from [0, 1) that round to 1 in float32: must not step past the kept prefix
    cfg = SamplingConfig(top_k=50, top_p=0.3)
    drawn = sample_from_logits(logits, torch.full((4,), u, dtype=torch.float64), cfg)
    allowed = nucleus(logits, 50, 0.3)
    assert all(int(t) in allowed[r] for r, t in enumerate(drawn))


def test_row_uniforms_and_seeds_depend_only_on_the_row():
    a = row_uniforms([1, 2, 3], 5)
    b = row_uniforms([3, 1], 5)
    assert a.shape == (3, 5) and ((a >= 0) & (a < 1)).all()
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])
    seeds = {row_seed(0, v, p, s) for v in range(5) for p in range(3) for s in range(4)}
    assert len(seeds) == 60 and all(0 <= s < 2**63 for s in seeds)
    assert row_seed(0, 1, 2) == row_seed(0, 1, 2) != row_seed(1, 1, 2)
    assert row_seed(0, 1, 2) != row_seed(0, 2, 1)


def test_cached_uniform_rows_equal_a_fresh_generator_and_stay_unchanged_by_callers():
    n = 7
    fresh = torch.stack(
        [torch.rand(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (5, 9)]
    )
    a = row_uniforms([5, 9], n)
    assert torch.equal(a, fresh)
    a.zero_()  # a caller writing into its rows must not reach the cached ones
    assert torch.equal(row_uniforms([5, 9], n), fresh)
    assert torch.equal(row_uniforms([9], n)[0], fresh[1])  # the same row from the cache, alone
    assert row_uniforms([], n).shape == (0, n)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_sampling_from_bf16_logits_equals_sampling_their_float32_copy(temperature):
    """Top-k runs in the logits' own dtype and only the k kept values are scaled in float: the same
    tokens as upcasting the whole vocabulary first, at any temperature."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, 500, generator=g) * 3).to(torch.bfloat16)
    u = torch.rand(64, generator=g, dtype=torch.float64)
    cfg = SamplingConfig(top_k=50, temperature=temperature)
    ref = logits.float() / temperature  # the old way: a float copy of every logit, then top-k
    top, ids = ref.topk(50, dim=-1)
    cum = top.double().softmax(-1).cumsum(-1)
    expected = ids.gather(-1, torch.minimum((cum <= u[:, None] * cum[:, -1:]).sum(-1), torch.tensor(49))[:, None])[:, 0]
    assert torch.equal(sample_from_logits(logits, u, cfg), expected)
    assert torch.equal(sample_from_logits(logits, u, cfg), sample_from_logits(logits.float(), u, cfg))


# --- generation -------------------------------------------------------------------------------


def prompt(n_rows: int, ids=(1, 42, 17)) -> torch.Tensor:
    return torch.tensor([list(ids)] * n_rows)


def test_generate_validates_arguments(tiny_model):
    with pytest.raises(ValueError, match="one seed per row"):
        generate(tiny_model, prompt(2), 3, [0], sampling=SAMPLING)
    with pytest.raises(ValueError, match="hook_name"):
        generate(tiny_model, prompt(1), 3, [0], sampling=SAMPLING, delta=torch.zeros(32))


@pytest.mark.parametrize("sampling", [None, SAMPLING, WIDE_SAMPLING], ids=["greedy", "sampled", "wide"])
def test_kv_cache_generation_equals_no_cache_under_steering(tiny_model, sampling):
    model = tiny_model
    deltas = steering_delta(unit(6, 32, 6), [0.0, 3.0, 8.0, 1.0, 5.0, 12.0])
    seeds = [row_seed(0, i) for i in range(6)]
    kw = dict(hook_name=HOOK, delta=deltas, capture=True)
    cached = generate(model, prompt(6), 16, seeds, sampling=sampling, use_cache=True, **kw)
    plain = generate(model, prompt(6), 16, seeds, sampling=sampling, use_cache=False, **kw)
    assert cached.tokens.shape == (6, 19)
    assert torch.equal(cached.tokens, plain.tokens)
    torch.testing.assert_close(cached.activations, plain.activations, atol=1e-4, rtol=1e-4)
    assert torch.equal(cached.tokens[:, :3], prompt(6))
    assert_no_hooks(model)


@pytest.mark.parametrize("use_cache", [True, False])
def test_captured_activations_are_the_unsteered_model_on_generated_tokens(tiny_model, use_cache):
    model = tiny_model
    deltas = steering_delta(unit(4, 32, 7), [0.0, 2.0, 5.0, 9.0])
    gen = generate(
        model,
        prompt(4),
        10,
        [row_seed(1, i) for i in range(4)],
        sampling=WIDE_SAMPLING,
        hook_name=HOOK,
        delta=deltas,
        use_cache=use_cache,
        capture=True,
    )
    assert gen.activations is not None and gen.activations.shape == (4, 13, 32)
    _, cache = model.run_with_cache(gen.tokens, names_filter=[HOOK])
    torch.testing.assert_close(gen.activations, cache[HOOK], atol=1e-4, rtol=1e-4)


def test_kv_cache_generation_attends_to_eos_tokens(tiny_model):
    # Rollouts do not stop at EOS, so an EOS token may sit mid-rollout; here it ends the prompt.
    # Given a KV cache and no mask, TransformerLens would mask tokens equal to pad_token_id (= EOS).
    eos = tiny_model.tokenizer.pad_token_id
    p = torch.tensor([[1, 42, eos]] * 2)
    kw = dict(hook_name=HOOK, delta=steering_delta(unit(1, 32, 10)[0], 3.0), capture=True)
    seeds = [row_seed(4, i) for i in range(2)]
    cached = generate(tiny_model, p, 6, seeds, sampling=None, use_cache=True, **kw)
    plain = generate(tiny_model, p, 6, seeds, sampling=None, use_cache=False, **kw)
    _, cache = tiny_model.run_with_cache(cached.tokens, names_filter=[HOOK])
    torch.testing.assert_close(cached.activations, cache[HOOK], atol=1e-4, rtol=1e-4)
    assert torch.equal(cached.tokens, plain.tokens)


def test_steering_changes_generated_text(tiny_model):
    seeds = [row_seed(2, i) for i in range(4)]
    clean = generate(tiny_model, prompt(4), 10, seeds, sampling=None)
    steered = generate(
        tiny_model, prompt(4), 10, seeds, sampling=None, hook_name=HOOK, delta=steering_delta(unit(1, 32, 8)[0], 12.0)
    )
    zero = generate(tiny_model, prompt(4), 10, seeds, sampling=None, hook_name=HOOK, delta=torch.zeros(32))
    assert torch.equal(zero.tokens, clean.tokens)
    assert not torch.equal(steered.tokens, clean.tokens)


def test_batched_generation_equals_one_row_at_a_time(tiny_model):
    deltas = steering_delta(unit(5, 32, 9), [0.0, 1.0, 3.0, 6.0, 3.0])
    seeds = [row_seed(3, i) for i in range(5)]
    batched = generate(
        tiny_model, prompt(5), 12, seeds, sampling=WIDE_SAMPLING, hook_name=HOOK, delta=deltas, capture=True
    )
    for i in range(5):
        alone = generate(
            tiny_model,
            prompt(1),
            12,
            seeds[i : i + 1],
            sampling=WIDE_SAMPLING,
            hook_name=HOOK,
            delta=deltas[i : i + 1],
            capture=True,
        )
        assert torch.equal(batched.tokens[i : i + 1], alone.tokens), f"row {i} depends on its batch"
        torch.testing.assert_close(batched.activations[i : i + 1], alone.activations, atol=1e-4, rtol=1e-4)
    # same delta, different seeds: different text (the seed is what makes rows differ)
    assert not torch.equal(batched.tokens[2], batched.tokens[4])
    # and the same seed twice gives the same text
    again = generate(tiny_model, prompt(5), 12, seeds, sampling=WIDE_SAMPLING, hook_name=HOOK, delta=deltas)
    assert torch.equal(again.tokens, batched.tokens)


# --- prompts of different lengths in one decode -----------------------------------------------

MIXED = [(1,), (1, 42, 17), (1, 42, 17), (1, 9), (1, 30, 31, 32, 33), (1,)]  # lengths 1, 3, 3, 2, 5, 1


@pytest.mark.parametrize("sampling", [None, WIDE_SAMPLING], ids=["greedy", "wide"])
def test_aligned_generation_equals_generate_of_each_prompt_alone(tiny_model, sampling):
    # Each row's text and captured activations are those of generate on its prompt alone, whatever
    # the other rows' prompt lengths: the prompt is fed one token per step, sampling starts after it
    # with the row's own uniforms.
    n = len(MIXED)
    deltas = steering_delta(unit(n, 32, 11), [0.0, 4.0, 4.0, 7.0, 2.0, 9.0])
    seeds = [row_seed(5, i) for i in range(n)]
    got = generate_aligned(tiny_model, MIXED, 14, seeds, sampling=sampling, hook_name=HOOK, delta=deltas, capture=True)
    assert got.tokens.shape == (n, 14) and got.activations is not None and got.activations.shape == (n, 14, 32)
    for i, ids in enumerate(MIXED):
        alone = generate(
            tiny_model,
            prompt(1, ids),
            14 - len(ids),
            seeds[i : i + 1],
            sampling=sampling,
            hook_name=HOOK,
            delta=deltas[i : i + 1],
            capture=True,
        )
        assert torch.equal(got.tokens[i : i + 1], alone.tokens), f"row {i} (prompt {ids})"
        torch.testing.assert_close(got.activations[i : i + 1], alone.activations, atol=1e-4, rtol=1e-4)
    # rows 1 and 2 share a prompt and a delta but not a seed: the text after the prompt differs
    assert torch.equal(got.tokens[1, :3], got.tokens[2, :3]) and not torch.equal(got.tokens[1], got.tokens[2])
    assert_no_hooks(tiny_model)


def test_aligned_generation_on_gemma2_with_grouped_attention_and_prompts_past_the_window():
    # Gemma-2: grouped-query attention (the copy-free methods), an 8-token sliding window on local
    # layers and soft caps; prompts up to 12 tokens, rollouts of 20, so the window slides mid-prompt.
    model = tiny_gemma2_model(seed=7)
    assert grouped_attention(model) > 0
    g = torch.Generator().manual_seed(3)
    prompts = [(2, *torch.randint(3, model.cfg.d_vocab, (n,), generator=g).tolist()) for n in (0, 11, 4, 9)]
    d = model.cfg.d_model
    deltas = steering_delta(unit(4, d, 13), [0.0, 3.0, 6.0, 2.0])
    seeds = [row_seed(6, i) for i in range(4)]
    got = generate_aligned(
        model, prompts, 20, seeds, sampling=WIDE_SAMPLING, hook_name=HOOK, delta=deltas, capture=True
    )
    for i, ids in enumerate(prompts):
        alone = generate(
            model,
            prompt(1, ids),
            20 - len(ids),
            seeds[i : i + 1],
            sampling=WIDE_SAMPLING,
            hook_name=HOOK,
            delta=deltas[i : i + 1],
            capture=True,
        )
        assert torch.equal(got.tokens[i : i + 1], alone.tokens), f"row {i}"
        torch.testing.assert_close(got.activations[i : i + 1], alone.activations, atol=1e-4, rtol=1e-4)


def test_aligned_generation_captures_the_unsteered_model_and_attends_to_eos(tiny_model):
    eos = tiny_model.tokenizer.pad_token_id
    prompts = [(1, 42, eos), (1,), (1, eos)]
    deltas = steering_delta(unit(3, 32, 12), [3.0, 6.0, 0.0])
    got = generate_aligned(
        tiny_model, prompts, 10, [7, 8, 9], sampling=WIDE_SAMPLING, hook_name=HOOK, delta=deltas, capture=True
    )
    _, cache = tiny_model.run_with_cache(got.tokens, names_filter=[HOOK])
    torch.testing.assert_close(got.activations, cache[HOOK], atol=1e-4, rtol=1e-4)
    for i, ids in enumerate(prompts):
        assert got.tokens[i, : len(ids)].tolist() == list(ids)


def test_aligned_generation_validates_arguments(tiny_model):
    with pytest.raises(ValueError, match="one seed per row"):
        generate_aligned(tiny_model, [(1,), (1, 2)], 5, [0], sampling=SAMPLING)
    with pytest.raises(ValueError, match="hook_name"):
        generate_aligned(tiny_model, [(1,)], 5, [0], sampling=SAMPLING, capture=True)
    with pytest.raises(ValueError, match="1 to 4 tokens"):
        generate_aligned(tiny_model, [(1,), (1, 2, 3, 4, 5)], 5, [0, 1], sampling=SAMPLING)
    with pytest.raises(ValueError, match="1 to 4 tokens"):
        generate_aligned(tiny_model, [()], 5, [0], sampling=SAMPLING)
