"""Effects on SAE features: scale 0 is no effect, the fast batched path equals the reference
loop, grouping vectors into blocks changes nothing, and position 0 is dropped when asked."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from helpers import BOS, HOOK
from saets_utils.config import SamplingConfig
from saets_utils.effects.measure import (
    BASELINE,
    STEERED,
    FeatureSums,
    HalfSums,
    RolloutSpec,
    encode_positions,
    measure_baseline,
    measure_effects,
    prompt_chunks,
    prompt_token_ids,
)
from saets_utils.effects.reference import reference_effects
from saets_utils.steering.generation import generate, row_seed

SEED = 3
IDS = [5, 11, 17, 40]  # decoder rows used as steering vectors (ids on purpose not 0..n-1)


@pytest.fixture(scope="module")
def spec(tiny_model) -> RolloutSpec:
    # prompts of three lengths, two of them twice (the empty prompt, BOS only, is repeated as in the reference)
    prompts = prompt_token_ids(tiny_model, ["", "I think", "News", "", "Good"], BOS, total_tokens=12)
    return RolloutSpec(
        prompts=prompts, samples_per_prompt=3, total_tokens=12, sampling=SamplingConfig(top_k=40, top_p=0.8)
    )


@pytest.fixture(scope="module")
def vectors(tiny_sae) -> torch.Tensor:
    return tiny_sae.W_dec[IDS].clone()


SCALES = torch.tensor([2.0, 0.0, 5.0, 9.0])


def unsteered_mean_codes(model, sae, spec: RolloutSpec, seeds_for) -> torch.Tensor:
    """Mean SAE code over all positions of unsteered rollouts, seeded by ``seeds_for(p)``, re-run
    through the model without any hook (the slow, obvious way)."""
    sums = FeatureSums.zeros(sae.cfg.d_sae)
    for p, ids in enumerate(spec.prompts):
        seeds = seeds_for(p)
        gen = generate(model, torch.tensor([ids] * len(seeds)), spec.new_tokens(p), seeds, sampling=spec.sampling)
        _, cache = model.run_with_cache(gen.tokens, names_filter=[HOOK])
        sums.add(sae.encode(cache[HOOK]))
    return sums.mean


# --- prompts ----------------------------------------------------------------------------------


def test_prompt_token_ids_prepend_bos_and_reject_prompts_without_room(tiny_model):
    tok = tiny_model.tokenizer
    ids = prompt_token_ids(tiny_model, ["", "I think"], BOS, total_tokens=9)
    assert ids[0] == (BOS,)
    assert ids[1] == (BOS, *tok.encode("I think", add_special_tokens=False)) and len(ids[1]) == 8
    with pytest.raises(ValueError, match="no room"):
        prompt_token_ids(tiny_model, ["", "I think"], BOS, total_tokens=8)  # 8 prompt tokens, 0 left
    with pytest.raises(ValueError, match="total_tokens=1"):
        prompt_token_ids(tiny_model, [""], BOS, total_tokens=1)


def test_rollout_spec_new_tokens_and_prompt_chunks(spec):
    assert [len(p) for p in spec.prompts] == [1, 8, 5, 1, 5]
    assert [spec.new_tokens(p) for p in range(5)] == [11, 4, 7, 11, 7]
    assert prompt_chunks(spec) == [[0, 1, 2, 3, 4]]  # prompts of every length share a batch
    assert prompt_chunks(spec, max_prompts=2) == [[0, 1], [2, 3], [4]]
    assert prompt_chunks(spec, max_prompts=1) == [[p] for p in range(5)]


# --- feature sums -----------------------------------------------------------------------------


def test_feature_sums_mean_and_density():
    s = FeatureSums.zeros(3)
    s.add(torch.tensor([[[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]]]))
    s.add(torch.tensor([[[0.0, 0.0, 4.0]], [[2.0, 0.0, 0.0]]]))
    assert s.n == 4
    torch.testing.assert_close(s.mean, torch.tensor([1.5, 0.0, 1.5]))
    torch.testing.assert_close(s.density, torch.tensor([0.75, 0.0, 0.5]))
    assert torch.equal(FeatureSums.zeros(2).mean, torch.zeros(2))


@pytest.mark.parametrize("samples", [1, 2, 3, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_half_sums_equal_one_feature_sum_per_vector_and_half(samples, masked):
    """The block's one masked sum per half gives what a FeatureSums per (vector, half) gives, over
    several groups of prompts; a half with no samples stays empty."""
    g = torch.Generator().manual_seed(samples)
    v, d = 3, 6
    sums = HalfSums.zeros(v, d, "cpu")
    ref = [[FeatureSums.zeros(d), FeatureSums.zeros(d)] for _ in range(v)]
    for groups in (2, 1):
        codes = torch.relu(torch.randn(groups, v, samples, 5, d, generator=g))
        keep = torch.rand(groups, v, samples, 5, generator=g) > 0.3 if masked else None
        sums.add(codes, keep)
        for i in range(v):
            for h in range(min(2, samples)):
                ref[i][h].add(codes[:, i, h::2], None if keep is None else keep[:, i, h::2])
    halves = sums.means()
    for i in range(v):
        for h in range(2):
            assert sums.n[i, h] == ref[i][h].n
            torch.testing.assert_close(halves[i, h], ref[i][h].mean)
            torch.testing.assert_close((sums.active[i, h] / sums.n[i, h].clamp(min=1)).float(), ref[i][h].density)
        torch.testing.assert_close(sums.mean()[i], (ref[i][0] + ref[i][1]).mean)
    if samples == 1:
        assert (sums.n[:, 1] == 0).all() and (halves[:, 1] == 0).all()


def test_encode_positions_drops_position_zero_only_when_asked(tiny_sae):
    acts = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    full = encode_positions(tiny_sae, acts, True)
    rest = encode_positions(tiny_sae, acts, False)
    assert full.shape == (2, 5, 64) and rest.shape == (2, 4, 64)
    torch.testing.assert_close(rest, full[:, 1:])


# --- baseline ---------------------------------------------------------------------------------


def test_baseline_is_unsteered_rollouts_from_the_baseline_seed_stream(tiny_model, tiny_sae, spec):
    base = measure_baseline(tiny_model, tiny_sae, HOOK, spec, multiplier=2, seed=SEED)
    assert base.n == 5 * 6 * 12  # prompts * (multiplier * samples) * positions
    ref = unsteered_mean_codes(tiny_model, tiny_sae, spec, lambda p: [row_seed(SEED, BASELINE, p, s) for s in range(6)])
    torch.testing.assert_close(base.mean, ref, atol=1e-5, rtol=1e-5)
    small = measure_baseline(tiny_model, tiny_sae, HOOK, spec, multiplier=2, seed=SEED, max_rows=4)
    torch.testing.assert_close(small.mean, base.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(small.density, base.density, atol=1e-6, rtol=0)
    assert ((base.density >= 0) & (base.density <= 1)).all() and base.density.sum() > 0


# --- effects ----------------------------------------------------------------------------------


def test_scale_zero_is_zero_effect_against_a_baseline_from_the_same_seeds(tiny_model, tiny_sae, spec, vectors):
    zero = torch.zeros(len(IDS))
    raw = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        spec,
        vectors=vectors,
        vector_ids=IDS,
        scales=zero,
        baseline_mean=torch.zeros(64),
        seed=SEED,
    )
    for i, vid in enumerate(IDS):
        # effect at scale 0 + baseline mean == mean SAE codes of unsteered rollouts with the same row seeds
        same_seeds = unsteered_mean_codes(
            tiny_model,
            tiny_sae,
            spec,
            lambda p, vid=vid: [row_seed(SEED, STEERED, vid, p, s) for s in range(spec.samples_per_prompt)],
        )
        torch.testing.assert_close(raw.effects[i], same_seeds, atol=1e-5, rtol=1e-5)
        eff = measure_effects(
            tiny_model,
            tiny_sae,
            HOOK,
            spec,
            vectors=vectors[i : i + 1],
            vector_ids=[vid],
            scales=zero[:1],
            baseline_mean=same_seeds,
            seed=SEED,
        )
        assert eff.effects.abs().max() <= 1e-6
    # rows are seeded by vector id: different ids give different rollouts even unsteered
    assert not torch.equal(raw.effects[0], raw.effects[1])


def test_steering_has_an_effect(tiny_model, tiny_sae, spec, vectors):
    blk = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        spec,
        vectors=vectors,
        vector_ids=IDS,
        scales=torch.tensor([0.0, 0.0, 20.0, 20.0]),
        baseline_mean=torch.zeros(64),
        seed=SEED,
    )
    base = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        spec,
        vectors=vectors,
        vector_ids=IDS,
        scales=torch.zeros(4),
        baseline_mean=torch.zeros(64),
        seed=SEED,
    )
    assert torch.equal(blk.effects[:2], base.effects[:2])
    assert (blk.effects[2:] - base.effects[2:]).abs().max() > 1e-2
    assert blk.effects.shape == (4, 64) and blk.effects.dtype == torch.float32
    assert blk.sample_tokens.shape == (4, 3, 12)  # keep_samples 4, but only 3 samples per prompt
    last = spec.prompts[-1]
    assert torch.equal(blk.sample_tokens[:, :, : len(last)], torch.tensor(last).expand(4, 3, -1))


@pytest.fixture(scope="module")
def baseline_mean(tiny_model, tiny_sae, spec):
    return measure_baseline(tiny_model, tiny_sae, HOOK, spec, multiplier=1, seed=SEED).mean


@pytest.fixture(scope="module")
def batched(tiny_model, tiny_sae, spec, vectors, baseline_mean):
    return measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        spec,
        vectors=vectors,
        vector_ids=IDS,
        scales=SCALES,
        baseline_mean=baseline_mean,
        seed=SEED,
    )


def test_batched_effects_equal_the_reference_loop(tiny_model, tiny_sae, spec, vectors, baseline_mean, batched):
    # these rollouts contain EOS (= the pad id) before their end: the KV cache must not mask it
    eos, hits = tiny_model.tokenizer.pad_token_id, 0
    for i, vid in enumerate(IDS):
        for p, ids in enumerate(spec.prompts):
            seeds = [row_seed(SEED, STEERED, vid, p, s) for s in range(spec.samples_per_prompt)]
            gen = generate(
                tiny_model,
                torch.tensor([ids] * len(seeds)),
                spec.new_tokens(p),
                seeds,
                sampling=spec.sampling,
                hook_name=HOOK,
                delta=vectors[i] * SCALES[i],
                use_cache=False,
            )
            hits += int((gen.tokens[:, :-1] == eos).sum())
    assert hits > 0
    for i, vid in enumerate(IDS):
        ref = reference_effects(
            tiny_model,
            tiny_sae,
            HOOK,
            spec,
            vector=vectors[i],
            vector_id=vid,
            scale=float(SCALES[i]),
            baseline_mean=baseline_mean,
            seed=SEED,
        )
        torch.testing.assert_close(batched.effects[i], ref, atol=1e-5, rtol=1e-5)


def test_grouping_vectors_into_blocks_does_not_change_effects(
    tiny_model, tiny_sae, spec, vectors, baseline_mean, batched
):
    def run(rows):
        return measure_effects(
            tiny_model,
            tiny_sae,
            HOOK,
            spec,
            vectors=vectors[rows],
            vector_ids=[IDS[r] for r in rows],
            scales=SCALES[rows],
            baseline_mean=baseline_mean,
            seed=SEED,
        )

    halves = [run([0, 1]), run([2, 3])]
    torch.testing.assert_close(torch.cat([h.effects for h in halves]), batched.effects, atol=1e-6, rtol=0)
    assert torch.equal(torch.cat([h.sample_tokens for h in halves]), batched.sample_tokens)
    rev = run([3, 2, 1, 0])
    torch.testing.assert_close(rev.effects.flip(0), batched.effects, atol=1e-6, rtol=0)
    single = run([2])
    torch.testing.assert_close(single.effects[0], batched.effects[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("max_rows", [1, 12, 25])
def test_batching_prompts_does_not_change_effects(
    tiny_model, tiny_sae, spec, vectors, baseline_mean, batched, max_rows
):
    # max_rows 1 or 12: one prompt per batch; 25: two prompts (of different lengths) share a batch of 4 * 3 rows each
    blk = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        spec,
        vectors=vectors,
        vector_ids=IDS,
        scales=SCALES,
        baseline_mean=baseline_mean,
        seed=SEED,
        max_rows=max_rows,
    )
    torch.testing.assert_close(blk.effects, batched.effects, atol=1e-6, rtol=0)
    assert torch.equal(blk.sample_tokens, batched.sample_tokens)


def test_include_first_position_false_drops_position_zero(tiny_model, tiny_sae, spec, vectors, baseline_mean):
    zero = torch.zeros(64)
    with_0 = measure_effects(
        tiny_model, tiny_sae, HOOK, spec, vectors=vectors, vector_ids=IDS, scales=SCALES, baseline_mean=zero, seed=SEED
    ).effects
    no_0 = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        replace(spec, include_first_position=False),
        vectors=vectors,
        vector_ids=IDS,
        scales=SCALES,
        baseline_mean=zero,
        seed=SEED,
    ).effects
    # every rollout starts with BOS, whose activation at position 0 sees nothing else: one fixed code
    _, cache = tiny_model.run_with_cache(torch.tensor([[BOS]]), names_filter=[HOOK])
    c0 = tiny_sae.encode(cache[HOOK])[0, 0]
    t = spec.total_tokens
    torch.testing.assert_close(with_0 * t, no_0 * (t - 1) + c0, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(with_0, no_0)
    # the baseline honours the flag the same way
    base_no_0 = measure_baseline(
        tiny_model, tiny_sae, HOOK, replace(spec, include_first_position=False), multiplier=1, seed=SEED
    )
    assert base_no_0.n == 5 * 3 * (t - 1)
    torch.testing.assert_close(baseline_mean * t, base_no_0.mean * (t - 1) + c0, atol=1e-4, rtol=1e-5)


# --- common random numbers and split halves ---------------------------------------------------


def test_common_random_numbers_pair_each_steered_rollout_with_an_unsteered_one(tiny_model, tiny_sae, spec, vectors):
    crn = replace(spec, common_random_numbers=True)
    base = measure_baseline(tiny_model, tiny_sae, HOOK, crn, multiplier=5, seed=SEED)
    assert base.n == 5 * 3 * 12  # the paired rollouts only: multiplier unused
    zero = torch.zeros(len(IDS))
    blk = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        crn,
        vectors=vectors,
        vector_ids=IDS,
        scales=zero,
        baseline_mean=base.mean,
        seed=SEED,
        baseline_halves=base.half_means,
    )
    # at scale 0 every vector writes exactly the paired unsteered texts: zero effect, also per half
    assert blk.effects.abs().max() <= 1e-6 and blk.halves.abs().max() <= 1e-6
    # the seeds no longer depend on the vector: two vectors at the same scale give the same texts
    same = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        crn,
        vectors=vectors[:2],
        vector_ids=IDS[:2],
        scales=torch.tensor([0.0, 0.0]),
        baseline_mean=base.mean,
        seed=SEED,
    )
    assert torch.equal(same.sample_tokens[0], same.sample_tokens[1])
    steered = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        crn,
        vectors=vectors,
        vector_ids=IDS,
        scales=SCALES,
        baseline_mean=base.mean,
        seed=SEED,
        baseline_halves=base.half_means,
    )
    assert (steered.effects[[0, 2, 3]].abs().amax(-1) > 1e-3).all()
    # the independent design at scale 0 does not vanish against its own (independent) baseline
    ind = measure_baseline(tiny_model, tiny_sae, HOOK, spec, multiplier=1, seed=SEED)
    indep = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        spec,
        vectors=vectors,
        vector_ids=IDS,
        scales=zero,
        baseline_mean=ind.mean,
        seed=SEED,
    )
    assert indep.effects.abs().max() > 1e-3


def test_halves_are_two_independent_measurements_that_average_to_the_effect(tiny_model, tiny_sae, vectors):
    prompts = prompt_token_ids(tiny_model, ["", "I think"], BOS, total_tokens=10)
    spec4 = RolloutSpec(prompts=prompts, samples_per_prompt=4, total_tokens=10, sampling=SamplingConfig())
    base = measure_baseline(tiny_model, tiny_sae, HOOK, spec4, multiplier=2, seed=SEED)
    torch.testing.assert_close(base.half_means.mean(0), base.mean, atol=1e-6, rtol=0)
    blk = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        spec4,
        vectors=vectors,
        vector_ids=IDS,
        scales=SCALES,
        baseline_mean=base.mean,
        seed=SEED,
        baseline_halves=base.half_means,
    )
    assert blk.halves.shape == (len(IDS), 2, 64)
    torch.testing.assert_close(blk.halves.mean(1), blk.effects, atol=1e-5, rtol=0)
    assert not torch.equal(blk.halves[:, 0], blk.halves[:, 1])
    # half h is exactly the effect of the samples of parity h: rebuild half 1 of vector 0 the slow way
    slow = unsteered_mean_codes(
        tiny_model, tiny_sae, spec4, lambda p: [row_seed(SEED, STEERED, IDS[1], p, s) for s in (1, 3)]
    )
    torch.testing.assert_close(
        blk.halves[1, 1] + base.half_means[1], slow, atol=1e-5, rtol=1e-5
    )  # vector 1 has scale 0
    one = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        replace(spec4, samples_per_prompt=1),
        vectors=vectors,
        vector_ids=IDS,
        scales=SCALES,
        baseline_mean=base.mean,
        seed=SEED,
    )
    assert torch.isnan(one.halves).all()  # one sample per prompt: no halves


def test_positions_over_max_resid_norm_are_left_out(tiny_model, tiny_sae, spec):
    """Attention-sink positions (huge residual norm) count nowhere: the baseline equals the mean SAE
    code over the remaining positions, computed the slow way; a bound above every norm changes nothing."""
    seeds = {
        p: [row_seed(SEED, BASELINE, p, s) for s in range(spec.samples_per_prompt)] for p in range(len(spec.prompts))
    }
    acts = []
    for p, ids in enumerate(spec.prompts):
        gen = generate(
            tiny_model, torch.tensor([ids] * len(seeds[p])), spec.new_tokens(p), seeds[p], sampling=spec.sampling
        )
        _, cache = tiny_model.run_with_cache(gen.tokens, names_filter=[HOOK])
        acts.append(cache[HOOK])
    flat = torch.cat([a.reshape(-1, a.shape[-1]) for a in acts])
    bound = float(flat.norm(dim=-1).median())
    keep = flat.norm(dim=-1) <= bound
    assert 0 < keep.sum() < len(keep)
    expected = tiny_sae.encode(flat[keep]).mean(0)
    got = measure_baseline(tiny_model, tiny_sae, HOOK, replace(spec, max_resid_norm=bound), multiplier=1, seed=SEED)
    assert got.n == int(keep.sum())
    torch.testing.assert_close(got.mean, expected, atol=1e-5, rtol=1e-5)
    loose = measure_baseline(tiny_model, tiny_sae, HOOK, replace(spec, max_resid_norm=1e9), multiplier=1, seed=SEED)
    plain = measure_baseline(tiny_model, tiny_sae, HOOK, spec, multiplier=1, seed=SEED)
    assert torch.equal(loose.mean, plain.mean) and loose.n == plain.n
