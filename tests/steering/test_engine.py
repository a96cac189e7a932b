"""The static decode engine (saets_utils/steering/engine.py) against TransformerLens, the reference.

In fp32 on the CPU it gives TransformerLens's logits (max |difference| <= 1e-5 of the largest
|logit|) and the same tokens and captured activations, on the tiny LayerNorm model and on the tiny
Gemma-2 (grouped-query attention, both soft-caps, norms before and after each sublayer, a sliding
window shorter than the sequences), at every hook point, steered or not. Deliberately broken
engines (rotary twice, a wrong window, a soft-cap left out, ...) fail the same comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from saets_utils.config import SamplingConfig
from saets_utils.models.grouped_attention import grouped_attention
from saets_utils.models.tiny import tiny_gemma2_model, tiny_model
from saets_utils.models.weight_layout import linear_layout
from saets_utils.steering import engine, generation
from saets_utils.steering.engine import EngineOptions, EngineUnsupported, StaticDecoder, parse_hook
from saets_utils.steering.generation import generate_aligned, row_uniforms
from saets_utils.steering.step_graphs import StepRunner, attended_positions

TOL = 1e-5  # max |logit difference| / max |logit|, and the same for captured activations
T = 20  # longer than the tiny Gemma-2's window of 8
PROMPTS = [[1], [1, 40, 41], [1, 50], [1], [1, 60, 61, 62], [1, 7]]
SEEDS = [11, 12, 13, 14, 15, 16]


def _prepared(model):
    linear_layout(model)  # as load_model prepares every model
    grouped_attention(model)
    return model


def _gemma2(seed: int):
    """The tiny Gemma-2 with soft-caps that bite: its attention scores reach ~2.6 and its logits ~8,
    where Gemma-2's caps of 50 and 30 would change them by less than the comparison's tolerance."""
    model = tiny_gemma2_model(seed=seed)
    model.cfg.attn_scores_soft_cap = 1.0  # every module shares this config
    model.cfg.output_logits_soft_cap = 5.0
    return model


@pytest.fixture(scope="module")
def models():
    return {"tiny": _prepared(tiny_model(seed=0)), "gemma2": _prepared(_gemma2(seed=0))}


def _inputs(prompts=PROMPTS, seeds=SEEDS, total=T):
    """generate_aligned's buffers: prompt tokens, which positions they force, each position's uniform."""
    tokens = torch.zeros(len(prompts), total, dtype=torch.long)
    forced = torch.zeros(len(prompts), total, dtype=torch.bool)
    u = torch.zeros(len(prompts), total, dtype=torch.float64)
    for r, (ids, seed) in enumerate(zip(prompts, seeds)):
        tokens[r, : len(ids)] = torch.tensor(ids)
        forced[r, : len(ids)] = True
        u[r, len(ids) :] = row_uniforms([seed], total - len(ids))[0]
    return tokens, forced, u


def _delta(model, scale=4.0):
    g = torch.Generator().manual_seed(1)
    return torch.randn(len(PROMPTS), model.cfg.d_model, generator=g) * scale


_REFERENCES: dict[tuple, tuple] = {}


def reference(model, hook, delta, sampling, monkeypatch):
    """TransformerLens's decode (generate_aligned, engine tl): tokens, activations and the logits of
    every step (read where they are sampled). Computed once per model and settings."""
    key = (id(model), hook, None if delta is None else delta.sum().item(), repr(sampling))
    if key not in _REFERENCES:
        _REFERENCES[key] = _reference(model, hook, delta, sampling, monkeypatch)
    return _REFERENCES[key]


def _reference(model, hook, delta, sampling, monkeypatch):
    seen: list[torch.Tensor] = []
    sample = generation.sample_from_logits

    def spy(logits, u, s):
        seen.append(logits.clone())
        return sample(logits, u, s)

    with monkeypatch.context() as m:
        m.setattr(generation, "sample_from_logits", spy)
        gen = generate_aligned(
            model,
            prompts=PROMPTS,
            total_tokens=T,
            seeds=SEEDS,
            sampling=sampling,
            hook_name=hook,
            delta=delta,
            capture=hook is not None,
        )
    return gen.tokens, gen.activations, torch.stack(seen)


def ours(model, hook, delta, sampling, options=None, broken: Callable | None = None):
    dec = StaticDecoder(
        model,
        len(PROMPTS),
        T,
        hook_name=hook,
        steer=delta is not None,
        capture=hook is not None,
        sampling=sampling,
        options=options,
    )
    if broken is not None:
        broken(dec)
    dec.load(*_inputs(), delta)
    logits = torch.stack(dec.run(keep_logits=True))
    return dec.tokens, dec.acts, logits


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def agreement(model, hook, delta, sampling, monkeypatch, **kw) -> tuple[float, bool, float]:
    """(logits error, tokens equal, activations error) of the engine against TransformerLens."""
    ref_tokens, ref_acts, ref_logits = reference(model, hook, delta, sampling, monkeypatch)
    tokens, acts, logits = ours(model, hook, delta, sampling, **kw)
    acts_err = 0.0 if ref_acts is None else _rel(acts, ref_acts)
    return _rel(logits, ref_logits), torch.equal(tokens, ref_tokens), acts_err


def equal(err: tuple[float, bool, float]) -> bool:
    logits_err, same_tokens, acts_err = err
    return logits_err <= TOL and same_tokens and acts_err <= TOL


# --- equality ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "gemma2"])
@pytest.mark.parametrize("point", ["hook_resid_pre", "hook_resid_mid", "hook_resid_post"])
def test_engine_equals_transformer_lens_steered_with_capture(models, name, point, monkeypatch):
    model = models[name]
    err = agreement(model, f"blocks.1.{point}", _delta(model), SamplingConfig(), monkeypatch)
    assert equal(err), err


@pytest.mark.parametrize("name", ["tiny", "gemma2"])
@pytest.mark.parametrize(
    "sampling,hook,steer",
    [
        (None, None, False),  # greedy, no hook
        (SamplingConfig(top_k=20, top_p=0.8, temperature=0.7), "blocks.2.hook_resid_post", False),  # capture only
        (SamplingConfig(), "blocks.0.hook_resid_post", True),
    ],
    ids=["greedy-unhooked", "nucleus-capture", "steer-layer0"],
)
def test_engine_equals_transformer_lens_sampling_and_hooks(models, name, sampling, hook, steer, monkeypatch):
    model = models[name]
    err = agreement(model, hook, _delta(model) if steer else None, sampling, monkeypatch)
    assert equal(err), err


@pytest.mark.parametrize("bucket", [1, 3, T])
def test_position_buckets_mask_the_positions_not_yet_written(models, bucket, monkeypatch):
    """Attending over more cached positions than written (a bucket of graphs) changes nothing."""
    model = models["gemma2"]
    options = EngineOptions(pos_bucket=bucket)
    err = agreement(model, "blocks.2.hook_resid_post", _delta(model), SamplingConfig(), monkeypatch, options=options)
    assert equal(err), err


def test_a_model_in_transformer_lens_own_layout_is_read_once_and_equal(monkeypatch):
    """Without load_model's layout the projections are copied once, at build; still equal."""
    model = _gemma2(seed=2)  # stock layout and attention
    err = agreement(model, "blocks.1.hook_resid_post", _delta(model), SamplingConfig(), monkeypatch)
    assert equal(err), err


def test_weights_are_read_in_place_and_the_cache_is_never_copied(models):
    from torch.profiler import ProfilerActivity, profile

    model = models["gemma2"]
    dec = StaticDecoder(
        model, 4, 12, hook_name="blocks.1.hook_resid_post", steer=True, capture=True, sampling=SamplingConfig()
    )
    for layer, block in zip(dec.layers, model.blocks):
        for ours_w, theirs in (
            (layer.qkv[0], block.attn.W_Q),
            (layer.out[0], block.attn.W_O),
            (layer.mlp[0], block.mlp.W_gate),
        ):
            assert ours_w.untyped_storage().data_ptr() == theirs.untyped_storage().data_ptr()
    dec.load(
        torch.ones(4, 12, dtype=torch.long),
        torch.zeros(4, 12, dtype=torch.bool),
        torch.rand(4, 12).double(),
        torch.randn(64),
    )
    ptrs = [k.data_ptr() for k in dec.K]
    for t in range(3):
        dec.runner(t, t + 1, False)
    cache_numel = dec.K[0].numel()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        dec.runner(3, 4, False)
    names = [e.name for e in prof.events()]
    assert "aten::repeat_interleave" not in names and "aten::clone" not in names and "aten::contiguous" not in names
    for e in prof.events():
        if e.name in ("aten::copy_", "aten::cat", "aten::_to_copy"):
            sizes = [torch.Size(s).numel() for s in e.input_shapes if s]
            assert all(n < cache_numel for n in sizes), (e.name, e.input_shapes)
    assert [k.data_ptr() for k in dec.K] == ptrs


def test_generate_aligned_engine_setting_and_measure_effects(models, tiny_sae):
    """``engine="static"`` in generate_aligned and RolloutSpec gives TransformerLens's rollouts."""
    from saets_utils.effects.measure import RolloutSpec, measure_effects

    model = models["tiny"]
    hook = "blocks.1.hook_resid_post"
    delta = _delta(model)
    kw = dict(prompts=PROMPTS, total_tokens=T, seeds=SEEDS, sampling=SamplingConfig())
    a = generate_aligned(model, **kw, hook_name=hook, delta=delta, capture=True, engine="tl")
    b = generate_aligned(model, **kw, hook_name=hook, delta=delta, capture=True, engine="static")
    assert torch.equal(a.tokens, b.tokens) and _rel(b.activations, a.activations) <= TOL
    with pytest.raises(ValueError, match="engine 'fast'"):
        generate_aligned(model, **kw, engine="fast")
    spec = RolloutSpec(prompts=((1,), (1, 40, 41)), samples_per_prompt=2, total_tokens=10, sampling=SamplingConfig())
    kw = dict(
        sae=tiny_sae,
        hook_name=hook,
        vectors=tiny_sae.W_dec[[3, 9]],
        vector_ids=[3, 9],
        scales=torch.tensor([2.0, 6.0]),
        baseline_mean=torch.zeros(tiny_sae.cfg.d_sae),
        seed=4,
    )
    tl = measure_effects(model, spec=spec, **kw)
    st = measure_effects(model, spec=replace(spec, engine="static"), **kw)
    assert torch.equal(tl.sample_tokens, st.sample_tokens)
    torch.testing.assert_close(st.effects, tl.effects, rtol=1e-5, atol=1e-6)


def test_engine_setting_is_validated_and_not_fingerprinted(tmp_path):
    from helpers import build_run_cfg
    from saets_utils.effects.plan import fingerprint

    run = build_run_cfg(tmp_path)
    assert run.effects.engine == "auto"
    static = build_run_cfg(tmp_path, effects={"engine": "static"}, stem="static")
    assert static.effects.engine == "static"
    assert fingerprint(static) == fingerprint(run)  # equal to float rounding, as batch shapes
    with pytest.raises(Exception, match="engine"):
        build_run_cfg(tmp_path, effects={"engine": "fast"}, stem="bad")


# --- shared prompt prefixes ----------------------------------------------------------------------

# 01's layout: rows (prompt, vector, sample), each vector's steering on all its rows
VEC_ROWS = [(p, j, n) for p in range(len(PROMPTS)) for j in range(2) for n in range(2)]
VEC_PROMPTS = [PROMPTS[p] for p, _, _ in VEC_ROWS]
VEC_SEEDS = [100 + 10 * p + n for p, _, n in VEC_ROWS]  # common random numbers: the seed skips the vector


def _vector_delta(model):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, model.cfg.d_model, generator=g) * 4.0)[[j for _, j, _ in VEC_ROWS]]


def test_shared_steps_group_rows_with_the_same_steering_and_prompt_so_far():
    tokens, forced, _ = _inputs([[1], [1, 40, 41], [1, 40, 42], [1, 40, 41], [1]], [1, 2, 3, 4, 5], total=6)
    delta = torch.tensor([[0.0], [1.0], [1.0], [1.0], [0.0]])
    steps = engine.shared_steps(tokens, forced, delta)
    s0, s1, s2 = steps[:3]

    def reps(rep: torch.Tensor, groups: int) -> list[int]:
        """The groups' rows; the rest pads the step to all 5 rows (fewer than MIN_SHARED_ROWS) with
        copies of the first."""
        assert len(rep) == 5 and rep[groups:].tolist() == [0] * (5 - groups)
        return rep[:groups].tolist()

    # position 0: rows 0 and 4 (steering 0), rows 1-3 (steering 1); only rows 0 and 4 sample
    assert reps(s0.rep, 2) == [0, 1] and s0.expand.tolist() == [0, 1, 1, 1, 0]
    assert s0.sample.tolist() == [0, 4] and s0.logit_groups.tolist() == [0] and s0.sample_at.tolist() == [0, 0]
    # position 1: rows 0 and 4 are past their prompt (their own groups); 1-3 still read [1, 40]
    assert s1.expand.tolist() == [0, 1, 1, 1, 2] and reps(s1.rep, 3) == [0, 1, 4] and s1.sample.tolist() == [0, 4]
    # position 2: [1, 40, 41] twice, [1, 40, 42] once; everyone samples position 3
    assert s2.expand.tolist() == [0, 1, 2, 1, 3] and s2.sample.tolist() == [0, 1, 2, 3, 4]
    assert s2.logit_groups.tolist() == [0, 1, 2, 3] and s2.sample_at.tolist() == [0, 1, 2, 1, 3]
    assert steps[3:] == [None, None]  # every row its own from position 3 on
    # before the steering is added, the steering does not split groups: at position 0 all five rows
    # read [1], one group, which becomes the two steered ones; from position 1 on the groupings agree
    assert reps(s0.pre_rep, 1) == [0] and s0.pre_expand.tolist() == [0] * 5 and s0.pre_to_post.tolist() == [0] * 5
    assert reps(s1.pre_rep, 3) == [0, 1, 4] and s1.pre_to_post is None and s2.pre_to_post is None
    none = engine.shared_steps(tokens, forced, None)  # unsteered: rows 1 and 3 share row 2's prefix too
    assert reps(none[0].rep, 1) == [0] and none[1].expand.tolist() == [0, 1, 1, 1, 2]
    assert all(step.pre_to_post is None for step in none if step is not None)
    # with more rows than MIN_SHARED_ROWS, a step computes its groups and pads to that many
    many = engine.shared_steps(*_inputs([[1]] * 40, list(range(40)), total=3)[:2], None)
    assert many[0].rep.tolist() == [0] * engine.MIN_SHARED_ROWS and many[1] is None


@pytest.mark.parametrize("name", ["tiny", "gemma2"])
def test_shared_prefixes_equal_transformer_lens_and_compute_fewer_rows(models, name, monkeypatch):
    model = models[name]
    hook, delta = "blocks.1.hook_resid_post", _vector_delta(model)
    ref = generate_aligned(
        model, VEC_PROMPTS, T, VEC_SEEDS, sampling=SamplingConfig(), hook_name=hook, delta=delta, capture=True
    )
    rows_seen: list[int] = []
    qkv = engine._qkv
    monkeypatch.setattr(engine, "_qkv", lambda x, *a: (rows_seen.append(x.shape[0]), qkv(x, *a))[1])
    computed = {}
    for share in (False, True):
        rows_seen.clear()
        tokens, acts = engine.decode_aligned(
            model,
            *_inputs(VEC_PROMPTS, VEC_SEEDS),
            sampling=SamplingConfig(),
            hook_name=hook,
            delta=delta,
            capture=True,
            options=EngineOptions(share_prefixes=share),
        )
        assert torch.equal(tokens, ref.tokens) and _rel(acts, ref.activations) <= TOL
        computed[share] = sum(rows_seen)
    rows, layers, last = len(VEC_ROWS), model.cfg.n_layers, 2  # the capture-only last step: layers 0 and 1

    def groups(t: int, steered: bool) -> int:
        """Inside a prompt, one row per (prompt so far, vector), or per prompt so far where the
        steering is not yet added; past it, every row. At least 16 rows are computed."""
        keys = {
            (j if steered else -1, *PROMPTS[p][: t + 1]) if t < len(PROMPTS[p]) else (j, p, n) for p, j, n in VEC_ROWS
        }
        return max(len(keys), engine.MIN_SHARED_ROWS)

    before = 2  # layers 0 and 1 run before the steering is added at blocks.1.hook_resid_post
    by_vector = sum(groups(t, True) * layers for t in range(T - 1))
    shared = sum(groups(t, False) * before + groups(t, True) * (layers - before) for t in range(T - 1))
    assert computed[False] == rows * ((T - 1) * layers + last)
    assert computed[True] == shared + rows * last < by_vector + rows * last < computed[False]


def test_sharing_across_steering_vectors_fails_the_comparison(models, monkeypatch):
    """Grouping rows without their steering (a mutation) gives other rollouts."""
    model = models["gemma2"]
    hook, delta = "blocks.1.hook_resid_post", _vector_delta(model)
    ref = generate_aligned(
        model, VEC_PROMPTS, T, VEC_SEEDS, sampling=SamplingConfig(), hook_name=hook, delta=delta, capture=True
    )
    share = engine.shared_steps
    monkeypatch.setattr(engine, "shared_steps", lambda tokens, forced, delta: share(tokens, forced, None))
    gen = generate_aligned(
        model,
        VEC_PROMPTS,
        T,
        VEC_SEEDS,
        sampling=SamplingConfig(),
        hook_name=hook,
        delta=delta,
        capture=True,
        engine="static",
    )
    assert _rel(gen.activations, ref.activations) > TOL


def test_auto_engine_is_static_where_tested_equal_and_tl_elsewhere(models):
    from types import SimpleNamespace

    model = models["gemma2"]
    assert engine.resolve_engine("auto", model, "blocks.1.hook_resid_post") == "static"  # fp32 on the CPU
    assert engine.resolve_engine("auto", model, None) == "static"
    assert engine.resolve_engine("auto", model, "blocks.1.attn.hook_z") == "tl"  # a hook it does not steer at
    assert engine.resolve_engine("tl", model, "blocks.1.hook_resid_post") == "tl"  # as set
    for cfg in ({"device": "cuda", "dtype": torch.float32}, {"device": "cpu", "dtype": torch.bfloat16}):
        other = SimpleNamespace(cfg=SimpleNamespace(n_layers=2, **cfg))
        assert engine.resolve_engine("auto", other, "blocks.1.hook_resid_post") == "tl"
        assert engine.resolve_engine("static", other, "blocks.1.hook_resid_post") == "static"


# --- mutations: a broken engine must fail the comparison ------------------------------------------


def _rotary_twice(monkeypatch):
    rotate = engine._rotate
    monkeypatch.setattr(engine, "_rotate", lambda x, cos, sin, r, a: rotate(rotate(x, cos, sin, r, a), cos, sin, r, a))


def _window(widen: int | None):
    def mutate(monkeypatch):
        mask = engine._window_mask
        monkeypatch.setattr(
            engine, "_window_mask", lambda p, pos, w: mask(p, pos, None if w is None or widen is None else w + widen)
        )

    return mutate


def _interleaved_kv_heads(monkeypatch):
    # query head h reads key/value head h % kv_head instead of h // group
    monkeypatch.setattr(
        engine, "_group_queries", lambda q, c: q.view(q.shape[0], c.group, c.n_kv, c.d_head).transpose(1, 2)
    )


def _capture_after_steering(monkeypatch):
    def hook(self, x, pos, share):
        if self.delta is not None:
            x = x + (self.delta if share is None else self.delta.index_select(0, share.rep))
        self.acts.index_copy_(1, pos.view(1), engine._every_row(x, share)[:, None])
        return x

    monkeypatch.setattr(StaticDecoder, "_hook", hook)


def _consts(**change):
    """A decoder built with wrong architecture constants."""

    def mutate(monkeypatch):
        read = engine._read_model
        monkeypatch.setattr(
            engine, "_read_model", lambda *a: (lambda c, *rest: (c._replace(**change), *rest))(*read(*a))
        )

    return mutate


MUTATIONS = {
    "rotary applied twice": _rotary_twice,
    "window one too wide": _window(1),
    "no sliding window": _window(None),
    "no attention soft-cap": _consts(attn_cap=0.0),
    "no output soft-cap": _consts(logit_cap=0.0),
    "no norms after sublayers": _consts(post_norm="none"),
    "rotary on adjacent pairs": _consts(adjacent_pairs=True),
    "key/value heads interleaved": _interleaved_kv_heads,
    "capture after steering": _capture_after_steering,
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_broken_engine_fails_the_comparison(models, mutation, monkeypatch):
    model = models["gemma2"]
    hook, delta = "blocks.1.hook_resid_post", _delta(model)
    ref = reference(model, hook, delta, SamplingConfig(), monkeypatch)
    MUTATIONS[mutation](monkeypatch)
    tokens, acts, logits = ours(model, hook, delta, SamplingConfig())
    err = (_rel(logits, ref[2]), torch.equal(tokens, ref[0]), _rel(acts, ref[1]))
    assert not equal(err), f"{mutation} went unnoticed: {err}"


# --- what the engine refuses ----------------------------------------------------------------------


def test_unsupported_models_and_hooks_are_refused(models):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=16,
        d_head=8,
        n_heads=2,
        d_vocab=20,
        n_ctx=32,
        act_fn="gelu",
        positional_embedding_type="standard",
    )
    with pytest.raises(EngineUnsupported, match="non-rotary positions"):
        StaticDecoder(HookedTransformer(cfg), 2, 8, hook_name=None, steer=False, capture=False, sampling=None)
    model = models["tiny"]
    hooked = model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: a)])
    with hooked, pytest.raises(EngineUnsupported, match="hooks attached"):
        StaticDecoder(model, 2, 8, hook_name=None, steer=False, capture=False, sampling=None)
    with pytest.raises(EngineUnsupported, match=r"use effects\.engine: tl"):
        parse_hook("blocks.1.attn.hook_z", 3)
    with pytest.raises(EngineUnsupported, match=r"layers 0\.\.2"):
        parse_hook("blocks.3.hook_resid_post", 3)
    assert parse_hook("blocks.2.hook_resid_mid", 3) == (2, "hook_resid_mid")


# --- the CUDA path, as far as the CPU can test it ------------------------------------------------


def test_attended_positions_buckets():
    assert [attended_positions(p, 10, 1) for p in range(10)] == list(range(1, 11))
    assert [attended_positions(p, 10, 4) for p in range(10)] == [4, 4, 4, 4, 8, 8, 8, 8, 10, 10]
    assert {attended_positions(p, 10, 64) for p in range(10)} == {10}


class FakeGraph:
    """Records like a CUDA graph: the warm-up runs for real; the capture's output is a static
    buffer that every replay rewrites in place (here by running the step again)."""

    captures = 0

    def warm(self, fn):
        return fn()

    def capture(self, fn):
        FakeGraph.captures += 1
        self.fn = fn
        self.out = fn()  # idempotent: the same position again, same values
        return self.out

    def replay(self):
        out = self.fn()
        if out is not None:
            self.out.copy_(out)


def test_step_runner_captures_once_per_bucket_and_replays_equal(models):
    model = models["gemma2"]
    hook, delta = "blocks.2.hook_resid_post", _delta(model)
    eager = ours(model, hook, delta, SamplingConfig(), options=EngineOptions(pos_bucket=8))
    FakeGraph.captures = 0

    def graphed(dec):
        dec.runner = StepRunner(dec.step, dec.device, graphs=True, graph_factory=FakeGraph)

    got = ours(model, hook, delta, SamplingConfig(), options=EngineOptions(pos_bucket=8), broken=graphed)
    assert FakeGraph.captures == 3 + 1  # attended 8, 16, 20, and the capture-only last step
    for a, b in zip(got, eager):
        assert torch.equal(a, b)


def test_step_runner_without_graphs_is_a_plain_call():
    calls = []
    runner = StepRunner(lambda pos, n, last: calls.append((int(pos), n, last)), "cpu", graphs=False)
    runner(3, 4, False)
    runner(4, 8, True)
    assert calls == [(3, 4, False), (4, 8, True)] and runner.captured == {}
    assert EngineOptions.for_device("cpu") == EngineOptions()  # eager, exact lengths, no graphs on the CPU
    assert EngineOptions.for_device("cuda").graphs


def test_the_step_compiles_without_graph_breaks(models, monkeypatch):
    """torch.compile (fullgraph, so any graph break fails) of every layer function; Dynamo's eager
    backend traces on the CPU in seconds, the GPU uses inductor on the same graphs."""
    torch._dynamo.reset()
    model = models["gemma2"]
    options = EngineOptions(compile="eager", pos_bucket=T)
    err = agreement(model, "blocks.1.hook_resid_mid", _delta(model), SamplingConfig(), monkeypatch, options=options)
    assert equal(err), err


# --- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_engine_equals_transformer_lens_on_smollm2(monkeypatch):
    from saets_utils.config import ModelConfig
    from saets_utils.models.loading import load_model

    model = load_model(ModelConfig())  # fp32, laid out, grouped-query attention
    hook = "blocks.12.hook_resid_post"  # the demo's hook
    g = torch.Generator().manual_seed(0)
    v = torch.randn(len(PROMPTS), model.cfg.d_model, generator=g)
    delta = 60 * v / v.norm(dim=-1, keepdim=True)  # shifts tone on SmolLM2 (docs)
    err = agreement(model, hook, delta, SamplingConfig(), monkeypatch)
    assert equal(err), err


# --- the GPU check, in its CPU smoke mode --------------------------------------------------------


@pytest.mark.slow
def test_gpu_check_script_smoke(tmp_path):
    """``bash benchmarks/gpu_check.sh --smoke``: every section runs on the CPU at tiny shapes and the
    correctness checks pass (the CUDA-only variants are left out there)."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    cmd = ["bash", "benchmarks/gpu_check.sh", "--smoke", "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["passed"] and res["smoke"]
    sections = res["sections"]
    assert not any("error" in s or "skipped" in s for s in sections.values()), sections
    assert sections["correctness_fp32"]["tiny_gemma2/device_default"]["rows_with_equal_tokens"] == 8
    assert sections["decode_throughput"]["engine_eager"]["rows_with_tl_tokens"] == 64
    assert sections["effects_throughput"]["static"]["effects_max_abs_diff_vs_tl"] < 1e-5
    for key in ("fp32", "tf32", "bf16"):
        assert sections["sae_encode"][key]["s"] > 0
