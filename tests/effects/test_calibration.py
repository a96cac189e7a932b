"""Scale calibration: interpolation on hand-made loss curves, losses equal to the model's own
next-token loss, and the tiny-model sweep landing on the target (batched like one at a time)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from helpers import HOOK
from saets_utils.config import LossTarget, SamplingConfig
from saets_utils.effects.calibration import (
    STATUSES,
    Calibration,
    SearchStart,
    calibrate_scales,
    calibrate_scales_secant,
    gradient_start,
    hook_layer,
    interpolate_scale,
    local_exponent,
    loss_gradient,
    loss_target_value,
    resid_at_hook,
    scale_hint,
    steered_losses,
)
from saets_utils.steering.generation import generate
from saets_utils.steering.hooks import steering_hook

GRID = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
TARGET = LossTarget(kind="relative", value=0.3)


# --- interpolation on hand-made curves --------------------------------------------------------


def test_hook_layer():
    assert hook_layer("blocks.12.hook_resid_post") == 12 and hook_layer(HOOK) == 1


def test_interpolates_linearly_between_last_point_below_and_first_above():
    scale, status = interpolate_scale([0, 10, 20, 30], [1.0, 1.2, 2.0, 3.0], 1.6)
    assert status == "ok" and scale == pytest.approx(15.0)
    # crossing in the first step
    assert interpolate_scale([0, 20], [1.0, 3.0], 1.5) == (pytest.approx(5.0), "ok")


def test_points_after_the_crossing_may_be_nan():
    assert interpolate_scale([0, 10, 20, 30], [1.0, 2.0, math.nan, math.nan], 1.5) == (pytest.approx(5.0), "ok")


def test_equal_to_target_is_not_above():
    # 1.6 at scale 10 does not exceed the target, so the crossing is between 10 and 20
    scale, status = interpolate_scale([0, 10, 20], [1.0, 1.6, 2.0], 1.6)
    assert status == "ok" and scale == pytest.approx(10.0)


def test_not_reached_gives_the_largest_grid_scale():
    assert interpolate_scale([0, 10, 20, 30], [1.0, 1.1, 1.2, 1.3], 5.0) == (30.0, "not_reached")
    assert interpolate_scale([0, 20, 40], [1.0, 1.1, 1.2], 1.2) == (40.0, "not_reached")


def test_above_at_zero_gives_nan():
    scale, status = interpolate_scale([0, 10, 20], [2.0, 3.0, 4.0], 1.5)
    assert status == "above_at_zero" and math.isnan(scale)


def test_non_monotone_is_flagged_but_scale_kept_at_first_crossing():
    scale, status = interpolate_scale([0, 10, 20, 30], [1.0, 1.4, 1.1, 2.0], 1.5)
    assert status == "non_monotone"
    assert scale == pytest.approx(20 + 10 * (1.5 - 1.1) / (2.0 - 1.1))
    # a dip within tol is noise, not non-monotonicity; a dip after the crossing does not count
    assert interpolate_scale([0, 10, 20, 30], [1.0, 1.4, 1.38, 2.0], 1.5)[1] == "ok"
    assert interpolate_scale([0, 10, 20, 30], [1.0, 2.0, 1.2, 3.0], 1.5)[1] == "ok"
    assert interpolate_scale([0, 10, 20, 30], [1.0, 1.4, 1.38, 2.0], 1.5, tol=0.0)[1] == "non_monotone"


def test_loss_target_value_relative_vs_absolute():
    assert loss_target_value(LossTarget(kind="absolute", value=4.0), 3.2) == 4.0
    assert loss_target_value(LossTarget(kind="relative", value=0.5), 3.2) == pytest.approx(3.7)
    assert loss_target_value(LossTarget(kind="relative", value=0.5), 1.0) == pytest.approx(1.5)


# --- losses on the tiny model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def chunks(tiny_model):
    """``[6, 16]`` chunks of the tiny model's own text: low loss unsteered, so steering raises it."""
    return generate(
        tiny_model, torch.ones(6, 1, dtype=torch.long), 15, list(range(6)), sampling=SamplingConfig(top_k=20, top_p=0.9)
    ).tokens


@pytest.fixture(scope="module")
def resid(tiny_model, chunks):
    return resid_at_hook(tiny_model, HOOK, chunks)


@pytest.fixture(scope="module")
def unsteered(tiny_model, chunks, resid):
    return float(steered_losses(tiny_model, HOOK, chunks, resid, torch.zeros(1, 32))[0])


def test_resid_at_hook_matches_run_with_cache_and_batch_size(tiny_model, chunks, resid):
    _, cache = tiny_model.run_with_cache(chunks, names_filter=[HOOK])
    assert resid.shape == (6, 16, 32)
    torch.testing.assert_close(resid, cache[HOOK], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resid_at_hook(tiny_model, HOOK, chunks, batch_size=4), resid, atol=1e-5, rtol=1e-5)


def test_zero_delta_loss_is_the_models_mean_next_token_loss(tiny_model, chunks, resid, unsteered):
    ref = float(tiny_model(chunks, return_type="loss"))
    assert unsteered == pytest.approx(ref, abs=1e-5)
    # by hand as well: mean over all next-token predictions
    logp = tiny_model(chunks).log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, chunks[:, 1:, None])[..., 0]
    assert unsteered == pytest.approx(float(nll.mean()), abs=1e-5)


def test_steered_losses_equal_the_hooked_models_loss(tiny_model, chunks, resid, tiny_sae):
    deltas = tiny_sae.W_dec[:5] * torch.tensor([0.0, 1.0, 2.5, 4.0, 8.0])[:, None]
    losses = steered_losses(tiny_model, HOOK, chunks, resid, deltas)
    assert losses.shape == (5,) and losses.dtype == torch.float64
    for i in range(5):
        with steering_hook(tiny_model, HOOK, deltas[i]):
            ref = float(tiny_model(chunks, return_type="loss"))
        assert float(losses[i]) == pytest.approx(ref, abs=1e-5)
    # how many deltas share a forward does not matter
    torch.testing.assert_close(
        steered_losses(tiny_model, HOOK, chunks, resid, deltas, max_rows=1), losses, atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        steered_losses(tiny_model, HOOK, chunks, resid, deltas, max_rows=13), losses, atol=1e-6, rtol=0
    )
    assert losses[-1] > losses[0] + 0.1  # steering hard raises the loss on the model's own text


# --- calibrate_scales on the tiny model -------------------------------------------------------


@pytest.fixture(scope="module")
def calibration(tiny_model, tiny_sae, chunks, resid, unsteered):
    return calibrate_scales(
        tiny_model, HOOK, chunks, resid, tiny_sae.W_dec[:16], grid=GRID, target=TARGET, unsteered_loss=unsteered
    )


def test_calibration_records_every_vector(calibration, unsteered):
    cal = calibration
    assert cal.scales.shape == (16,) and cal.losses.shape == (16, len(GRID)) and len(cal.status) == 16
    assert set(cal.status) <= set(STATUSES)
    assert cal.target == pytest.approx(unsteered + 0.3) and cal.unsteered_loss == unsteered
    assert {"ok", "not_reached"} <= set(cal.status), "the fixture should exercise both outcomes"
    assert torch.all(cal.losses[:, 0] == unsteered)


def test_ok_scale_reaches_the_target_within_the_interpolation_error(tiny_model, tiny_sae, chunks, resid, calibration):
    cal = calibration
    for i, st in enumerate(cal.status):
        row = cal.losses[i]
        if st != "ok":
            continue
        j = int(torch.nonzero(row > cal.target)[0, 0])
        assert torch.isnan(row[j + 1 :]).all(), "the sweep stops for a vector once it crossed"
        assert torch.isfinite(row[: j + 1]).all() and (row[:j] <= cal.target).all()
        s = float(cal.scales[i])
        assert GRID[j - 1] <= s <= GRID[j]
        loss = float(steered_losses(tiny_model, HOOK, chunks, resid, tiny_sae.W_dec[i : i + 1] * s)[0])
        lo, hi = float(row[j - 1]), float(row[j])
        assert lo - 1e-6 <= loss <= hi + 1e-6
        assert abs(loss - cal.target) <= hi - lo


def test_not_reached_takes_the_largest_scale_and_stays_below(calibration):
    cal = calibration
    for i, st in enumerate(cal.status):
        if st == "not_reached":
            assert float(cal.scales[i]) == GRID[-1]
            assert torch.isfinite(cal.losses[i]).all() and (cal.losses[i] <= cal.target).all()


def test_batching_vectors_gives_the_same_calibration(tiny_model, tiny_sae, chunks, resid, unsteered, calibration):
    for i in range(0, 16, 3):
        one = calibrate_scales(
            tiny_model,
            HOOK,
            chunks,
            resid,
            tiny_sae.W_dec[i : i + 1],
            grid=GRID,
            target=TARGET,
            unsteered_loss=unsteered,
        )
        assert one.status == calibration.status[i : i + 1]
        torch.testing.assert_close(one.scales, calibration.scales[i : i + 1], atol=1e-4, rtol=0)
        torch.testing.assert_close(one.losses, calibration.losses[i : i + 1], atol=1e-6, rtol=0, equal_nan=True)
    small = calibrate_scales(
        tiny_model,
        HOOK,
        chunks,
        resid,
        tiny_sae.W_dec[:16],
        grid=GRID,
        target=TARGET,
        unsteered_loss=unsteered,
        max_rows=7,
    )
    assert small.status == calibration.status
    torch.testing.assert_close(small.scales, calibration.scales, atol=1e-4, rtol=0)
    # the grid order given does not matter either (it is swept upwards)
    rev = calibrate_scales(
        tiny_model, HOOK, chunks, resid, tiny_sae.W_dec[:16], grid=GRID[::-1], target=TARGET, unsteered_loss=unsteered
    )
    torch.testing.assert_close(rev.scales, calibration.scales, atol=1e-4, rtol=0)


def test_absolute_target_below_unsteered_loss_skips_every_vector(tiny_model, tiny_sae, chunks, resid, unsteered):
    below = LossTarget(kind="absolute", value=unsteered - 0.1)
    cal = calibrate_scales(
        tiny_model, HOOK, chunks, resid, tiny_sae.W_dec[:3], grid=GRID, target=below, unsteered_loss=unsteered
    )
    assert cal.status == ["above_at_zero"] * 3 and torch.isnan(cal.scales).all()
    assert torch.isnan(cal.losses[:, 1:]).all()  # nothing beyond scale 0 was evaluated
    far_above = LossTarget(kind="absolute", value=unsteered + 100.0)
    high = calibrate_scales(
        tiny_model, HOOK, chunks, resid, tiny_sae.W_dec[:3], grid=GRID, target=far_above, unsteered_loss=unsteered
    )
    assert high.status == ["not_reached"] * 3 and torch.all(high.scales == GRID[-1])


# --- the secant search against the sweep (the oracle) ------------------------------------------


@pytest.fixture(scope="module")
def start(tiny_model, tiny_sae, chunks, resid, unsteered):
    return scale_hint(
        tiny_model, HOOK, chunks, resid, tiny_sae.W_dec[:4], grid=GRID, target=TARGET, unsteered_loss=unsteered
    )


def _same_outcome(a: str, b: str) -> bool:
    return a == b or {a, b} <= {"ok", "non_monotone"}


@pytest.mark.parametrize("coarse_chunks", [None, 2])
def test_secant_finds_the_sweeps_scales_with_fewer_evaluations(
    tiny_model, tiny_sae, chunks, resid, unsteered, calibration, start, coarse_chunks
):
    vecs = tiny_sae.W_dec[:16]
    sec = calibrate_scales_secant(
        tiny_model,
        HOOK,
        chunks,
        resid,
        vecs,
        grid=GRID,
        target=TARGET,
        unsteered_loss=unsteered,
        start=start,
        coarse_chunks=coarse_chunks,
    )
    assert all(_same_outcome(a, b) for a, b in zip(calibration.status, sec.status, strict=True))
    ok = torch.tensor([st != "not_reached" for st in calibration.status])
    assert ok.any() and (~ok).any()
    # not reached: the grid's largest scale, and every point it evaluated stays below the target
    assert torch.all(sec.scales[~ok] == GRID[-1])
    assert sec.probe_losses is not None and bool((sec.probe_losses[~ok].nan_to_num(-1.0) <= sec.target).all())
    # crossed: within 5% of the sweep's scale, and the loss there is on the target
    torch.testing.assert_close(sec.scales[ok], calibration.scales[ok], rtol=0.05, atol=0)
    loss = steered_losses(tiny_model, HOOK, chunks, resid, vecs[ok] * sec.scales[ok, None])
    assert float((loss - sec.target).abs().max()) < 0.02
    assert sec.evaluations is not None and calibration.evaluations is not None
    assert float(sec.evaluations.mean()) < 0.5 * float(calibration.evaluations.mean())
    if coarse_chunks:  # evaluations on 2 of the 6 chunks count a third each
        assert not torch.all(sec.evaluations == sec.evaluations.round())


def test_secant_without_a_start_and_batched_like_one_at_a_time(tiny_model, tiny_sae, chunks, resid, unsteered, start):
    vecs = tiny_sae.W_dec[:8]
    both = calibrate_scales_secant(
        tiny_model, HOOK, chunks, resid, vecs, grid=GRID, target=TARGET, unsteered_loss=unsteered, start=start
    )
    for i in (0, 2, 5):
        one = calibrate_scales_secant(
            tiny_model,
            HOOK,
            chunks,
            resid,
            vecs[i : i + 1],
            grid=GRID,
            target=TARGET,
            unsteered_loss=unsteered,
            start=start,
        )
        assert one.status == both.status[i : i + 1]
        torch.testing.assert_close(one.scales, both.scales[i : i + 1], atol=1e-4, rtol=0)
    cold = calibrate_scales_secant(
        tiny_model, HOOK, chunks, resid, vecs, grid=GRID, target=TARGET, unsteered_loss=unsteered, start=None
    )
    torch.testing.assert_close(cold.scales, both.scales, rtol=0.05, atol=0)


def test_secant_skips_vectors_above_the_target_at_zero(tiny_model, tiny_sae, chunks, resid, unsteered, start):
    below = LossTarget(kind="absolute", value=unsteered - 0.1)
    cal = calibrate_scales_secant(
        tiny_model,
        HOOK,
        chunks,
        resid,
        tiny_sae.W_dec[:3],
        grid=GRID,
        target=below,
        unsteered_loss=unsteered,
        start=start,
    )
    assert cal.status == ["above_at_zero"] * 3 and torch.isnan(cal.scales).all()
    assert cal.evaluations is not None and torch.all(cal.evaluations == 0)


def test_scale_hint_is_the_sweeps_median_and_none_when_nothing_crosses(
    tiny_model, tiny_sae, chunks, resid, unsteered, calibration, start
):
    assert isinstance(start, SearchStart) and start.exponent > 0
    crossed = [float(calibration.scales[i]) for i in range(4) if calibration.status[i] != "not_reached"]
    assert start.scale == pytest.approx(statistics.median(crossed), abs=1e-4)
    far = LossTarget(kind="absolute", value=unsteered + 100.0)
    assert (
        scale_hint(tiny_model, HOOK, chunks, resid, tiny_sae.W_dec[:4], grid=GRID, target=far, unsteered_loss=unsteered)
        is None
    )


def test_local_exponent_of_a_power_law():
    assert local_exponent([2.0, 4.0], [0.5, 4.0], 2.0) == pytest.approx(3.0)
    assert local_exponent([2.0, 4.0], [0.0, 4.0], 2.0) == 2.0  # no rise: the default
    assert local_exponent([2.0, 4.0], [1.0, 1e9], 2.0) == 8.0  # clamped


@pytest.mark.parametrize(("chunk_bytes", "bias"), [(None, False), (4 * 300, False), (None, True)])
def test_final_resid_loss_equals_the_models_own_loss_with_softcap_and_blocks(monkeypatch, chunk_bytes, bias):
    from saets_utils.effects import calibration
    from saets_utils.models.tiny import tiny_gemma2_model

    model = tiny_gemma2_model(seed=2)  # logit soft-capping, final RMSNorm
    if chunk_bytes:  # blocks of a few positions (and a last, shorter one)
        monkeypatch.setattr(calibration, "LOGIT_CHUNK_BYTES", chunk_bytes * model.cfg.d_vocab // 7)
    if bias:  # an unembedding bias (left out only where it is zero)
        with torch.no_grad():
            model.b_U.normal_(generator=torch.Generator().manual_seed(3))
    tokens = torch.randint(3, model.cfg.d_vocab, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = model(tokens, stop_at_layer=model.cfg.n_layers)
        per_seq = calibration.final_resid_loss(model, final, tokens)
        ref = model(tokens, return_type="loss", loss_per_token=True).mean(-1)
    assert per_seq.dtype == torch.float64 and per_seq.shape == (3,)
    torch.testing.assert_close(per_seq.float(), ref, atol=1e-5, rtol=1e-5)


def test_logsumexp_in_place_is_torchs_bit_for_bit():
    from saets_utils.effects.calibration import _logsumexp_

    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0)) * 20
    x[1] = -math.inf  # a row with nothing possible
    x[2, 7] = math.inf
    ref = torch.logsumexp(x, -1)
    assert torch.equal(_logsumexp_(x.clone()), ref)


# --- a per-vector start from the loss's gradient -----------------------------------------------


def test_loss_gradient_is_the_slope_of_the_steered_loss(tiny_model, tiny_sae, chunks, resid):
    g = loss_gradient(tiny_model, HOOK, chunks, resid, max_rows=4)  # two batches of chunks
    assert (
        g.shape == (32,) and g.dtype == torch.float32 and not any(p.grad is not None for p in tiny_model.parameters())
    )
    eps = 1e-2
    for v in tiny_sae.W_dec[:3]:
        v = v / v.norm()
        up, down = steered_losses(tiny_model, HOOK, chunks, resid, torch.stack([eps * v, -eps * v]))
        assert float(g @ v) == pytest.approx(float(up - down) / (2 * eps), rel=1e-2, abs=1e-4)


def test_gradient_start_recovers_the_level_of_its_own_model():
    """Pilot scales made by ``log s = a + b (g . v)`` with ``b = -exp(a) / (p need)`` give back ``a``."""
    torch.manual_seed(0)
    vecs = torch.nn.functional.normalize(torch.randn(12, 8), dim=-1)
    g, p, need, a = torch.randn(8) * 0.01, 2.5, 1.0, math.log(70.0)
    b = -math.exp(a) / (p * need)
    scales = torch.exp(a + b * (vecs.double() @ g.double())).float()
    status = ["ok"] * 10 + ["not_reached", "above_at_zero"]
    scales[10:] = torch.tensor([200.0, math.nan])  # left out of the fit
    pilot = Calibration(scales, status, torch.zeros(12, 1), 0.0, 0.0)
    start = gradient_start(pilot, vecs, g, SearchStart(40.0, p), need)
    assert start is not None and start.scale == pytest.approx(70.0, rel=1e-6) and start.slope == pytest.approx(b)
    torch.testing.assert_close(start.scales_for(vecs[:10]), scales[:10].double(), rtol=1e-5, atol=0)
    assert torch.all(SearchStart(40.0, p).scales_for(vecs) == 40.0)  # no gradient: one scale
    assert gradient_start(pilot.rows([10, 11, 0]), vecs[[10, 11, 0]], g, SearchStart(40.0, p), need) is None


def test_secant_starts_each_vector_where_its_start_says(tiny_model, tiny_sae, chunks, resid, unsteered, start):
    vecs = torch.nn.functional.normalize(tiny_sae.W_dec[:6], dim=-1)
    g = loss_gradient(tiny_model, HOOK, chunks, resid)
    per_vector = SearchStart(start.scale, start.exponent, g, slope=-start.scale / start.exponent)
    sec = calibrate_scales_secant(
        tiny_model, HOOK, chunks, resid, vecs, grid=GRID, target=TARGET, unsteered_loss=unsteered, start=per_vector
    )
    assert sec.probe_scales is not None
    first = per_vector.scales_for(vecs).clamp(min=1e-3 * GRID[-1], max=GRID[-1])
    torch.testing.assert_close(sec.probe_scales[:, 0], first)
    assert len(set(first.tolist())) == 6  # six different starts
