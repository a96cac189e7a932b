"""Properties of the steering-vector builders: unit norm, no mutation, clear errors, and each
method doing what its formula promises on constructed cases."""

import copy
import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from helpers import HOOK
from saets_utils.approximator.model import EffectApproximator
from saets_utils.evaluation import task_vectors
from saets_utils.evaluation.methods import (
    build_caa_vector,
    build_fgaa_target,
    build_fgaa_vector,
    build_pinverse_vector,
    build_rotation_vector,
    build_sae_ts_vector,
    build_sae_vector,
    discover_target_features,
    feature_density,
    mean_resid,
    mean_sae_acts,
    pinverse,
    rotation_matrix,
    target_vector,
)
from saets_utils.registry import REGISTRY

D_MODEL, D_SAE = 16, 24


def unit_rows(n, d, g):
    x = torch.randn(n, d, generator=g, dtype=torch.float64).float()
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def approx():
    g = torch.Generator().manual_seed(0)
    return EffectApproximator(torch.randn(D_MODEL, D_SAE, generator=g), torch.randn(D_SAE, generator=g))


@pytest.fixture(scope="module")
def W_dec():
    return unit_rows(D_SAE, D_MODEL, torch.Generator().manual_seed(1))


def seqs(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.tensor([1]), torch.randint(2, 97, (n - 1,), generator=g)]) for n in lengths]


def test_target_vector():
    t = target_vector([(3, 0.5), (7, -2.0)], D_SAE)
    assert t.shape == (D_SAE,) and t[3] == 0.5 and t[7] == -2.0 and t.abs().sum() == 2.5


@pytest.mark.parametrize(
    "targets, msg",
    [
        ([], "empty"),
        ([(D_SAE, 1.0)], "out of range"),
        ([(-1, 1.0)], "out of range"),
        ([(1.5, 1.0)], "out of range"),
        ([(True, 1.0)], "out of range"),
        ([(2, 1.0), (2, 1.0)], "twice"),
        ([(2, float("nan"))], "not finite"),
        ([(2, 0.0)], "zero"),
        ([(2,)], "pair"),
        ([("x", 1.0)], "pair"),
    ],
)
def test_target_vector_rejects_bad_targets(targets, msg):
    with pytest.raises(ValueError, match=msg):
        target_vector(targets, D_SAE)


def test_every_vector_method_is_unit_and_leaves_inputs_alone(approx, W_dec, tiny_model):
    targets = [(2, 0.5), (5, 0.5)]
    saved = copy.deepcopy((approx.W, approx.b, W_dec, targets))
    pos, neg = seqs([3, 5, 4], 0), seqs([6, 2], 1)
    saved_toks = [t.clone() for t in pos + neg]
    vectors = {
        "SAE": build_sae_vector(W_dec, targets),
        "SAE-TS": build_sae_ts_vector(approx, targets),
        "pinverse": build_pinverse_vector(approx, targets),
        "rotation": build_rotation_vector(approx, W_dec, targets),
        "FGAA": build_fgaa_vector(approx, targets),
        "CAA": build_caa_vector(tiny_model, HOOK, pos, neg, include_first_position=True, batch_size=2),
    }
    # the random control is built in task_vectors from the run's seed (tests/test_registry.py), and
    # SAE-TS-nobias is SAE-TS at lambda 0
    vectors["SAE-TS-nobias"] = build_sae_ts_vector(approx, targets, 0.0)
    assert set(vectors) | {"random"} == {m.name for m in REGISTRY if m.vector}
    for name, v in vectors.items():
        width = tiny_model.cfg.d_model if name == "CAA" else D_MODEL
        assert v.shape == (width,), name
        assert v.norm().item() == pytest.approx(1.0, abs=1e-5), name
    for a, b in zip((approx.W, approx.b, W_dec), saved[:3]):
        assert torch.equal(a, b)
    assert targets == saved[3]
    assert all(torch.equal(a, b) for a, b in zip(pos + neg, saved_toks))


def test_sae_ts_raises_target_effect_where_decoder_row_misfires():
    # Feature 0's decoder row e0 barely drives its own effect (W[:, 0] = 0.2 e0 + e1) but drives
    # feature 1 hard (W[:, 1] = 2 e0): the situation SAE-TS was made for.
    g = torch.Generator().manual_seed(2)
    W = 0.1 * torch.randn(D_MODEL, D_SAE, generator=g)
    e = torch.eye(D_MODEL)
    W[:, 0], W[:, 1] = 0.2 * e[0] + e[1], 2 * e[0]
    W_dec = unit_rows(D_SAE, D_MODEL, g)
    W_dec[0] = e[0]
    approx = EffectApproximator(W, torch.randn(D_SAE, generator=g))
    sae, ts = (
        approx.predict(build_sae_vector(W_dec, [(0, 1.0)])),
        approx.predict(build_sae_ts_vector(approx, [(0, 1.0)])),
    )
    assert ts[0] > sae[0] + 0.3
    assert ts[0] - ts[1] > sae[0] - sae[1]


def test_sae_ts_without_bias_term_maximises_predicted_target_effect(approx, W_dec):
    # lam=0 gives norm(W[:, j]), the unit vector with the largest x @ W[:, j] (Cauchy-Schwarz).
    for j in range(D_SAE):
        ts = approx.predict(build_sae_ts_vector(approx, [(j, 1.0)], lam=0.0))[j]
        assert ts >= approx.predict(W_dec[j])[j] - 1e-5
        assert ts - approx.b[j] == pytest.approx(approx.W[:, j].norm().item(), rel=1e-5)


def test_sae_ts_removes_bias_direction(approx):
    c = approx.correction
    for j in range(D_SAE):
        plain, ts = build_sae_ts_vector(approx, [(j, 1.0)], lam=0.0), build_sae_ts_vector(approx, [(j, 1.0)])
        assert ts @ c < plain @ c


def test_sae_ts_zero_result_raises():
    # target direction == bias direction and lam = 1: the two terms cancel.
    approx = EffectApproximator(torch.eye(D_MODEL, D_SAE), torch.eye(D_SAE)[3])
    with pytest.raises(ValueError, match="SAE-TS vector"):
        build_sae_ts_vector(approx, [(3, 1.0)], lam=1.0)


def test_pinverse_solves_least_squares(approx):
    targets = [(4, 1.0), (9, 3.0)]
    t = target_vector(targets, D_SAE, torch.float64)
    rhs = (t / t.norm() - approx.b.double()).unsqueeze(1)
    x = torch.linalg.lstsq(approx.W.double().T, rhs).solution.squeeze(1)  # min ||x @ W - rhs||
    v = build_pinverse_vector(approx, targets)
    torch.testing.assert_close(v.double(), x / x.norm(), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        build_pinverse_vector(approx, targets, W_pinv=torch.linalg.pinv(approx.W)), v, atol=1e-5, rtol=0
    )


def low_rank(m, n, k, seed):
    """``(A [m, k], B [k, n])`` float64 factors of a rank-k ``W = A @ B``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g, dtype=torch.float64), torch.randn(k, n, generator=g, dtype=torch.float64)


def cosine(a, b):
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


@pytest.mark.parametrize("storage", [torch.float32, torch.float64])
def test_pinverse_vector_is_the_rank_k_solution_of_a_low_rank_W(storage):
    # W = A @ B of rank 5, built in float64 and stored in float32 (as approximators are saved) or
    # kept in float64. pinv(A B) = B^+ A^+ exactly, from the float64 factors.
    m, n, k = 64, 512, 5
    A, B = low_rank(m, n, k, seed=9)
    pinv_k = B.T @ torch.linalg.inv(B @ B.T) @ torch.linalg.inv(A.T @ A) @ A.T  # [n, m]
    b = 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    approx = EffectApproximator((A @ B).to(storage), b.to(storage))
    targets = [(3, 1.0), (100, 2.0), (411, -0.5)]
    t = target_vector(targets, n, torch.float64)
    rhs = t / t.norm() - approx.b.double()
    intended = rhs @ pinv_k
    v = build_pinverse_vector(approx, targets)
    assert v.dtype == storage and v.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert cosine(v, intended) > 0.999
    P = pinverse(approx.W)
    assert P.dtype == torch.float64 and P.shape == (n, m)
    assert torch.linalg.matrix_rank(P, rtol=1e-6) == k
    torch.testing.assert_close(P, pinv_k, atol=1e-5 * pinv_k.abs().max().item(), rtol=0)
    # Mutation check: torch's default cut-off inverts the float32 rounding of the null directions,
    # so the old computation is noise; this test fails if build_pinverse_vector regresses to it.
    old = rhs @ torch.linalg.pinv(approx.W.double())
    if storage == torch.float32:
        assert abs(cosine(old, intended)) < 0.5
    else:  # in float64 the default cut-off is right, and so is the rank-aware one
        assert cosine(old, intended) > 0.999


def test_pinverse_full_rank_is_the_plain_pseudoinverse_and_rejects_bad_input(approx):
    torch.testing.assert_close(pinverse(approx.W), torch.linalg.pinv(approx.W.double()), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(pinverse(approx.W.double()), torch.linalg.pinv(approx.W.double()))
    with pytest.raises(ValueError, match="2-D"):
        pinverse(approx.b)
    with pytest.raises(ValueError, match="rtol"):
        pinverse(approx.W, rtol=1.5)


def test_rotation_matrix_is_orthogonal(approx, W_dec):
    R = rotation_matrix(approx, W_dec)
    torch.testing.assert_close(R @ R.T, torch.eye(D_MODEL), atol=1e-5, rtol=0)


def test_rotation_matrix_of_a_full_rank_W_is_the_procrustes_U_Vt(approx, W_dec):
    W = approx.W.double()
    C = (W / W.norm(dim=0, keepdim=True)) @ (W_dec.double() / W_dec.double().norm(dim=1, keepdim=True))
    U, _, Vh = torch.linalg.svd(C)
    torch.testing.assert_close(rotation_matrix(approx, W_dec), (U @ Vh).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("storage", [torch.float32, torch.float64])
def test_rotation_matrix_of_a_low_rank_W_is_a_rank_k_partial_isometry_into_its_span(storage):
    d_model, d_sae, k = 32, 96, 5
    A, B = low_rank(d_model, d_sae, k, seed=11)
    approx = EffectApproximator((A @ B).to(storage), torch.zeros(d_sae, dtype=storage))
    W_dec = unit_rows(d_sae, d_model, torch.Generator().manual_seed(12)).to(storage)
    R = rotation_matrix(approx, W_dec).double()
    s = torch.linalg.svdvals(R)
    torch.testing.assert_close(s[:k], torch.ones(k, dtype=torch.float64), atol=1e-5, rtol=0)
    assert s[k:].max() < 1e-5  # rank k, not a full orthogonal matrix fixed by rounding noise
    torch.testing.assert_close(R @ R.T @ R, R, atol=1e-5, rtol=0)
    Q = torch.linalg.qr(A)[0]  # orthonormal basis of W's column span (that of its normalised columns)
    for j in (0, 17, 95):
        Rd = R @ W_dec[j].double()
        assert Rd.norm() > 1e-3
        assert (Rd - Q @ (Q.T @ Rd)).norm() < 1e-5 * Rd.norm()
        v = build_rotation_vector(approx, W_dec, [(j, 1.0)], lam=0.0)
        assert v.norm().item() == pytest.approx(1.0, abs=1e-5)
        assert (v.double() - Q @ (Q.T @ v.double())).norm() < 1e-5


def test_rotation_vector_raises_when_the_target_is_outside_the_rotated_span():
    # Every column of W is e0, so C = e0 u^T has rank 1 with u the sum of the unit decoder rows; a
    # target direction orthogonal to u has R @ d = 0 and no rotation vector.
    e = torch.eye(D_MODEL)
    W = e[:, :1].expand(D_MODEL, D_SAE).contiguous()
    W_dec = torch.stack([e[j % (D_MODEL - 1) + 1] for j in range(D_SAE)])  # rows e1..e15, e1..e9
    approx = EffectApproximator(W, torch.zeros(D_SAE))
    R = rotation_matrix(approx, W_dec)
    assert torch.linalg.matrix_rank(R.double(), rtol=1e-5) == 1
    assert build_rotation_vector(approx, W_dec, [(0, 1.0)], lam=0.0) @ e[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="R @ d is zero"):
        build_rotation_vector(approx, W_dec, [(0, 1.0), (1, -1.0)])  # d ~ e1 - e2, orthogonal to u
    with pytest.raises(ValueError, match="outside the span"):
        build_rotation_vector(approx, W_dec, [(0, 1.0)], R=torch.diag((torch.arange(D_MODEL) != 1).float()))


def test_rotation_recovers_a_known_rotation_and_maps_decoder_rows_to_effect_columns(W_dec):
    # W's columns are rotated (and rescaled) decoder rows: R must be that rotation, and the
    # rotation vector of feature j (no bias) must be the direction of W[:, j], i.e. R d, not R^T d.
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, generator=g, dtype=torch.float64))[0].float()
    W = (Q @ W_dec.T) * (0.5 + torch.rand(D_SAE, generator=g))
    approx = EffectApproximator(W, torch.zeros(D_SAE))
    R = rotation_matrix(approx, W_dec)
    torch.testing.assert_close(R, Q, atol=1e-4, rtol=0)
    for j in (0, 7):
        v = build_rotation_vector(approx, W_dec, [(j, 1.0)])
        torch.testing.assert_close(v, W[:, j] / W[:, j].norm(), atol=1e-4, rtol=0)
        torch.testing.assert_close(build_rotation_vector(approx, W_dec, [(j, 1.0)], R=R), v)


def test_rotation_and_pinverse_reject_width_mismatch(approx, W_dec):
    with pytest.raises(ValueError, match="W_dec must be"):
        build_rotation_vector(approx, W_dec[:, :-1], [(0, 1.0)])
    with pytest.raises(ValueError, match="W_dec must be"):
        rotation_matrix(approx, W_dec[:-1])
    with pytest.raises(ValueError, match="R must be"):
        build_rotation_vector(approx, W_dec, [(0, 1.0)], R=torch.eye(D_MODEL + 1))
    with pytest.raises(ValueError, match="W_pinv must be"):
        build_pinverse_vector(approx, [(0, 1.0)], W_pinv=torch.zeros(D_MODEL, D_SAE))
    with pytest.raises(ValueError, match="out of range"):
        build_sae_ts_vector(approx, [(D_SAE, 1.0)])


def _direct_means(model, toks, start, fn=lambda a: a):
    """Per-example mean over positions of fn(acts), one unpadded forward pass per example."""
    out = []
    for s in toks:
        _, cache = model.run_with_cache(s[None])
        out.append(fn(cache[HOOK][0, start:]).mean(0))
    return torch.stack(out).mean(0)


@pytest.mark.parametrize("include_first", [True, False])
def test_caa_matches_direct_computation(tiny_model, include_first):
    pos, neg = seqs([3, 7, 5, 2, 9], 4), seqs([4, 6, 8], 5)
    start = 0 if include_first else 1
    mp = _direct_means(tiny_model, pos, start)
    torch.testing.assert_close(
        mean_resid(tiny_model, HOOK, pos, include_first_position=include_first, batch_size=2), mp, atol=1e-5, rtol=1e-5
    )
    expected = mp - _direct_means(tiny_model, neg, start)
    v = build_caa_vector(tiny_model, HOOK, pos, neg, include_first_position=include_first, batch_size=2)
    torch.testing.assert_close(v, expected / expected.norm(), atol=1e-5, rtol=1e-5)


def test_mean_resid_accepts_equal_length_tensor(tiny_model):
    toks = torch.stack(seqs([5, 5, 5], 6))
    torch.testing.assert_close(
        mean_resid(tiny_model, HOOK, toks, include_first_position=True),
        mean_resid(tiny_model, HOOK, list(toks), include_first_position=True, batch_size=1),
    )


def test_mean_resid_rejects_bad_input(tiny_model):
    with pytest.raises(ValueError, match="not a hook"):
        mean_resid(tiny_model, "blocks.9.hook_resid_post", seqs([3], 0), include_first_position=True)
    with pytest.raises(ValueError, match="no token sequences"):
        mean_resid(tiny_model, HOOK, [], include_first_position=True)
    with pytest.raises(ValueError, match="no position to average"):
        mean_resid(tiny_model, HOOK, seqs([3, 1], 0), include_first_position=False)


def test_mean_sae_acts_and_density_match_direct_computation(tiny_model, tiny_sae):
    toks = seqs([3, 7, 5, 2], 7)
    expected = _direct_means(tiny_model, toks, 1, tiny_sae.encode)
    got = mean_sae_acts(tiny_model, tiny_sae, HOOK, toks, include_first_position=False, batch_size=3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    codes = []
    for s in toks:
        _, cache = tiny_model.run_with_cache(s[None])
        codes.append(tiny_sae.encode(cache[HOOK][0]))
    dens = feature_density(tiny_model, tiny_sae, HOOK, toks, include_first_position=True, batch_size=3)
    torch.testing.assert_close(dens, (torch.cat(codes) > 0).float().mean(0))


@contextmanager
def sinks(model, positions, factor=1e4):
    """Scale the residual at ``HOOK`` of the given positions by ``factor`` (attention sinks) in every
    forward pass, as a permanent hook that runs before run_with_cache's caching hook."""
    hp = model.hook_dict[HOOK]

    def blow_up(act, hook):
        act = act.clone()
        act[:, [p for p in positions if p < act.shape[1]]] *= factor
        return act

    hp.add_hook(blow_up, is_permanent=True)
    try:
        yield
    finally:
        hp.remove_hooks(including_permanent=True)


def _direct_kept(model, toks, start, drop, fn=lambda a: a):
    """Per-example rows fn(acts) at positions start.. except ``drop`` (unhooked), one pass per example."""
    out = []
    for s in toks:
        _, cache = model.run_with_cache(s[None])
        keep = [p for p in range(start, len(s)) if p not in drop]
        if keep:
            out.append(fn(cache[HOOK][0, keep]))
    return out


def test_mean_sae_acts_and_density_leave_out_positions_over_max_resid_norm(tiny_model, tiny_sae):
    toks = seqs([5, 7, 4, 3], 13)
    norms = torch.cat([tiny_model.run_with_cache(s[None])[1][HOOK][0].norm(dim=-1) for s in toks])
    bound = 10 * norms.max().item()
    assert 1e4 * norms.min().item() > bound
    rows = _direct_kept(tiny_model, toks, 1, {2}, tiny_sae.encode)
    expected = torch.stack([r.mean(0) for r in rows]).mean(0)
    with sinks(tiny_model, [2]):
        got = mean_sae_acts(
            tiny_model, tiny_sae, HOOK, toks, include_first_position=False, batch_size=3, max_resid_norm=bound
        )
        unfiltered = mean_sae_acts(tiny_model, tiny_sae, HOOK, toks, include_first_position=False, batch_size=3)
        dens = feature_density(
            tiny_model, tiny_sae, HOOK, toks, include_first_position=False, batch_size=3, max_resid_norm=bound
        )
        resid = mean_resid(tiny_model, HOOK, toks, include_first_position=False, batch_size=3, max_resid_norm=bound)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (unfiltered - expected).abs().max() > 1.0  # the sink would dominate the mean without the filter
    torch.testing.assert_close(dens, (torch.cat(rows) > 0).float().mean(0))
    resid_rows = _direct_kept(tiny_model, toks, 1, {2})
    torch.testing.assert_close(resid, torch.stack([r.mean(0) for r in resid_rows]).mean(0), atol=1e-5, rtol=1e-5)
    # a bound above every norm changes nothing
    torch.testing.assert_close(
        mean_sae_acts(tiny_model, tiny_sae, HOOK, toks, include_first_position=False, max_resid_norm=bound),
        mean_sae_acts(tiny_model, tiny_sae, HOOK, toks, include_first_position=False),
    )


def test_an_example_whose_every_position_is_a_sink_is_skipped(tiny_model, tiny_sae):
    toks = seqs([6, 3], 14)  # without the first position, the second example has positions 1 and 2 only
    bound = 10 * max(tiny_model.run_with_cache(s[None])[1][HOOK][0].norm(dim=-1).max().item() for s in toks)
    rows = _direct_kept(tiny_model, toks, 1, {1, 2}, tiny_sae.encode)
    assert len(rows) == 1
    with sinks(tiny_model, [1, 2]):
        got = mean_sae_acts(
            tiny_model, tiny_sae, HOOK, toks, include_first_position=False, batch_size=2, max_resid_norm=bound
        )
        with pytest.raises(ValueError, match="every position of every example"):
            mean_sae_acts(tiny_model, tiny_sae, HOOK, toks[1:], include_first_position=False, max_resid_norm=bound)
        with pytest.raises(ValueError, match="no position to count"):
            feature_density(tiny_model, tiny_sae, HOOK, toks[1:], include_first_position=False, max_resid_norm=bound)
    torch.testing.assert_close(got, rows[0].mean(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_resid_norm must be > 0"):
        mean_resid(tiny_model, HOOK, toks, include_first_position=False, max_resid_norm=0.0)


def test_target_discovery_uses_the_runs_max_resid_norm(tiny_model, tiny_sae):
    # task_vectors.contrast_acts (the means FGAA and target discovery rank features by) passes the
    # run's effects.max_resid_norm: with it the sink at position 2 is left out, without it it is not.
    pos, neg = seqs([5, 7], 15), seqs([4, 6], 16)
    bound = 10 * max(tiny_model.run_with_cache(s[None])[1][HOOK][0].norm(dim=-1).max().item() for s in pos + neg)
    expected = [
        torch.stack([r.mean(0) for r in _direct_kept(tiny_model, t, 1, {2}, tiny_sae.encode)]).mean(0)
        for t in (pos, neg)
    ]
    task = SimpleNamespace(positive="p", negative="n")
    for max_norm in (bound, None):
        ctx = SimpleNamespace(
            run=SimpleNamespace(effects=SimpleNamespace(include_first_position=False, max_resid_norm=max_norm)),
            model=tiny_model,
            sae=tiny_sae,
            hook_name=HOOK,
            tokens={"p": pos, "n": neg}.get,
        )
        with sinks(tiny_model, [2]):
            got = task_vectors.contrast_acts(task, ctx)  # type: ignore[arg-type]
        for g_, w in zip(got, expected):
            if max_norm is None:
                assert (g_ - w).abs().max() > 1.0
            else:
                torch.testing.assert_close(g_, w, atol=1e-5, rtol=1e-5)


def test_fgaa_target_drops_dense_and_bos_features_and_l1_normalises():
    pos = torch.zeros(D_SAE)
    pos[[0, 1, 2, 3, 4, 5]] = torch.tensor([9.0, 8.0, 3.0, 2.0, 1.0, 0.5])
    neg = torch.zeros(D_SAE)
    neg[5] = 1.0  # more active on negatives: never a target
    density = torch.full((D_SAE,), 0.001)
    density[0] = 0.5  # dense
    target = build_fgaa_target(pos, neg, density, density_max=0.01, bos_features=[1], top_k=3)
    assert [i for i, _ in target] == [2, 3, 4]
    assert sum(w for _, w in target) == pytest.approx(1.0)
    assert [w for _, w in target] == pytest.approx([0.5, 1 / 3, 1 / 6])
    # top_k larger than the number of positive features keeps only the positive ones
    assert [i for i, _ in build_fgaa_target(pos, neg, density, density_max=0.01, bos_features=[1], top_k=10)] == [
        2,
        3,
        4,
    ]
    v = build_fgaa_vector(EffectApproximator(torch.randn(D_MODEL, D_SAE), torch.randn(D_SAE)), target)
    assert v.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_discover_target_features():
    g = torch.Generator().manual_seed(8)
    pos, neg = torch.rand(D_SAE, generator=g), torch.rand(D_SAE, generator=g)
    density = torch.rand(D_SAE, generator=g) * 0.02
    found = discover_target_features(pos, neg, density, density_max=0.01, k=4)
    diff = torch.where(density <= 0.01, pos - neg, torch.tensor(-math.inf))
    assert [i for i, _ in found] == [i for i in diff.topk(4).indices.tolist() if diff[i] > 0]
    assert sum(w for _, w in found) == pytest.approx(1.0)
    assert all(w > 0 for _, w in found) and all(density[i] <= 0.01 for i, _ in found)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(neg_acts=torch.zeros(D_SAE + 1)), "must all be"),
        (dict(top_k=0), "top-k"),
        (dict(density_max=0.0), "density_max"),
        (dict(bos_features=[D_SAE]), "out of range"),
        (dict(pos_acts=torch.zeros(D_SAE)), "no feature is more active"),
    ],
)
def test_fgaa_target_rejects_bad_input(kwargs, msg):
    args = (
        dict(
            pos_acts=torch.ones(D_SAE),
            neg_acts=torch.zeros(D_SAE),
            density=torch.zeros(D_SAE),
            density_max=0.01,
            bos_features=[],
            top_k=3,
        )
        | kwargs
    )
    with pytest.raises(ValueError, match=msg):
        build_fgaa_target(**args)
