"""Notebook 01's runner on the tiny model: the output contract, resuming, plans guarded by their
settings, device selection, and bad inputs failing before any model forward. Workers killed, hung
or failing, and the runner's other failure modes: test_effects_workers.py."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import HOOK, N_VECTORS, shard_files, tiny_run
from saets_utils.config import ConfigError
from saets_utils.effects import runner as effects_runner
from saets_utils.effects.calibration import STATUSES
from saets_utils.effects.measure import measure_effects
from saets_utils.effects.plan import Plan, fingerprint, input_digests, work_dir
from saets_utils.effects.runner import available_devices, prepare_plan, rollout_spec, run_effects
from saets_utils.effects.store import load_effects
from saets_utils.effects.vector_sources import build_vectors


@pytest.fixture(scope="module")
def reference(effects_reference):
    """An uninterrupted in-process run (gpus=0) of all N_VECTORS vectors (conftest)."""
    return effects_reference


# --- output contract --------------------------------------------------------------------------


def test_run_writes_the_contract_files(reference, tiny_sae):
    run, path = reference
    assert path == run.results_dir / "effects.safetensors"
    t = load_file(path)
    n, g = N_VECTORS, 5
    assert t["effects"].shape == (n, 64) and t["effects"].dtype == torch.float32
    assert t["vectors"].shape == (n, 32) and t["scales"].shape == (n,) and t["losses"].shape == (n, g)
    assert t["vector_ids"].dtype == torch.int64 and t["vector_ids"].tolist() == list(range(n))
    assert torch.all(t["vector_ids"][1:] > t["vector_ids"][:-1])
    # unit directions (the decoder rows), and the vector actually used is direction * scale
    torch.testing.assert_close(t["vectors"].norm(dim=-1), torch.ones(n))
    torch.testing.assert_close(t["vectors"], tiny_sae.W_dec[:n] / tiny_sae.W_dec[:n].norm(dim=-1, keepdim=True))
    torch.testing.assert_close(t["used_vectors"], t["vectors"] * t["scales"][:, None])

    table = pd.read_csv(run.results_dir / "effects_table.csv")
    assert list(table.columns) == ["id", "scale", "status", "seconds"]
    assert table["id"].tolist() == list(range(n))
    assert set(table["status"]) <= set(STATUSES) and "ok" in set(table["status"])
    assert (table["seconds"] > 0).all()
    torch.testing.assert_close(torch.tensor(table["scale"].values, dtype=torch.float32), t["scales"])
    finite = torch.isfinite(t["scales"])
    assert torch.isfinite(t["effects"][finite]).all()
    assert (t["scales"][finite] > 0).all() and (t["scales"][finite] <= 40).all()

    meta = json.loads((run.results_dir / "effects_meta.json").read_text())
    assert meta["n_vectors"] == n and meta["d_sae"] == 64 and meta["d_model"] == 32
    assert meta["fingerprint"] == fingerprint(run, input_digests(run, tiny_sae)) and meta["hook_name"] == HOOK
    assert meta["status_counts"] == dict(Counter(table["status"]))
    # 2 prompts * (2 * 4) baseline samples * 16 positions
    assert meta["baseline_positions"] == 2 * 8 * 16

    eff = load_effects(run.results_dir)
    assert torch.equal(eff.effects, t["effects"]) and eff.sample_tokens.shape == (n, 4, 16)
    assert eff.baseline_mean.shape == (64,) and eff.row(7) == 7


def test_stored_effects_are_measure_effects_at_the_stored_scale(reference, tiny_model, tiny_sae):
    run, _ = reference
    eff = load_effects(run.results_dir)
    plan = Plan.load(work_dir(run) / "plan.safetensors")
    spec = rollout_spec(run, tiny_model, 1)
    rows = [i for i in range(N_VECTORS) if eff.table.status[i] == "ok"][:2]
    blk = measure_effects(
        tiny_model,
        tiny_sae,
        HOOK,
        spec,
        vectors=eff.vectors[rows],
        vector_ids=eff.vector_ids[rows].tolist(),
        scales=eff.scales[rows],
        baseline_mean=plan.baseline_mean,
        seed=run.seed,
    )
    torch.testing.assert_close(blk.effects, eff.effects[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eff.baseline_mean, plan.baseline_mean)


# --- resuming ---------------------------------------------------------------------------------


def test_gradient_start_keeps_the_pilot_and_lands_near_the_hints_scales(reference, tmp_path, tiny_model, tiny_sae):
    """``calibration.start: gradient``: the first block (the pilot) is calibrated from the hint, so its
    scales are the reference run's; every other vector starts at its own scale and lands within the
    search's tolerance of the hint's answer. The start and, with it, the block size are fingerprinted
    (the default hint leaves fingerprints as they were)."""
    ref_run, ref_path = reference
    run = tiny_run(tmp_path, calibration={"start": "gradient"}, vectors_per_batch=6)  # a pilot of 6
    want, got = load_file(ref_path), load_file(run_effects(run, tiny_model, tiny_sae, gpus=0))
    torch.testing.assert_close(got["scales"][:6], want["scales"][:6], rtol=1e-5, atol=0)
    # the tiny model's loss curves are noisy and often dip (non_monotone), so agreement is checked
    # where both searches found a clean crossing, on the median (SmolLM2: docs/performance.md)
    status = [pd.read_csv(r.results_dir / "effects_table.csv")["status"].tolist() for r in (ref_run, run)]
    ok = torch.tensor([a == b == "ok" for a, b in zip(*status)])
    assert ok.sum() >= 8
    assert float((got["scales"][ok] / want["scales"][ok]).log().abs().median()) < 0.1
    moved = (got["scales"][6:] - want["scales"][6:]).abs() > 1e-3 * want["scales"][6:]
    assert moved.sum() >= 4  # the others did start elsewhere
    digests = input_digests(run, tiny_sae)
    assert fingerprint(run, digests) != fingerprint(ref_run, digests)
    rebatched = tiny_run(tmp_path / "b", calibration={"start": "gradient"}, vectors_per_batch=4)
    assert fingerprint(rebatched, digests) != fingerprint(run, digests)
    assert fingerprint(tiny_run(tmp_path / "c", vectors_per_batch=4), digests) == fingerprint(ref_run, digests)


def test_gradient_start_is_the_same_after_a_resume(tmp_path, tiny_model, tiny_sae):
    """A run measured in two goes (12 vectors, then grown to all) recomputes the same pilot, so its
    vectors start, and land, where an uninterrupted run's do."""
    grad, rows = {"start": "gradient"}, {"source": "decoder_rows", "ids": {"start": 0, "stop": 12}}
    fresh = tiny_run(tmp_path / "fresh", calibration=grad, vectors_per_batch=6)
    want = load_file(run_effects(fresh, tiny_model, tiny_sae, gpus=0))
    run_effects(
        tiny_run(tmp_path / "two", calibration=grad, vectors_per_batch=6, vectors=rows), tiny_model, tiny_sae, gpus=0
    )
    got = load_file(
        run_effects(tiny_run(tmp_path / "two", calibration=grad, vectors_per_batch=6), tiny_model, tiny_sae, gpus=0)
    )
    assert got["vector_ids"].tolist() == list(range(N_VECTORS))
    torch.testing.assert_close(got["scales"], want["scales"], rtol=1e-5, atol=0, equal_nan=True)


def test_rerun_does_no_work(reference, tiny_model, tiny_sae, monkeypatch):
    run, path = reference
    before = load_file(path)
    shards = shard_files(run)

    def no_work(*a, **k):
        raise AssertionError("compute_block called on a finished run")

    monkeypatch.setattr(effects_runner, "compute_block", no_work)
    assert run_effects(run, tiny_model, tiny_sae, gpus=0) == path
    # batching is not a setting of the numbers: another block size reuses the same work
    rebatched = run.model_copy(update={"effects": run.effects.model_copy(update={"vectors_per_batch": 5})})
    assert run_effects(rebatched, tiny_model, tiny_sae, gpus=0) == path
    assert shard_files(run) == shards
    after = load_file(path)
    for k in before:
        assert torch.equal(torch.nan_to_num(before[k], nan=-1.0), torch.nan_to_num(after[k], nan=-1.0)), k


def test_plan_made_with_other_settings_needs_restart(tmp_path, tiny_model, tiny_sae, monkeypatch):
    small = {"source": "decoder_rows", "ids": [3, 9, 12]}
    run = tiny_run(tmp_path, vectors=small)
    run_effects(run, tiny_model, tiny_sae, gpus=0)
    old_shards = shard_files(run)
    assert old_shards
    changed = tiny_run(tmp_path, vectors=small, loss_target={"kind": "relative", "value": 0.5})
    assert fingerprint(changed) != fingerprint(run)
    with pytest.raises(ConfigError, match="restart=True"):
        run_effects(changed, tiny_model, tiny_sae, gpus=0)
    assert shard_files(run) == old_shards  # nothing was discarded
    path = run_effects(changed, tiny_model, tiny_sae, gpus=0, restart=True)
    assert not any(p.exists() for p in old_shards)
    meta = json.loads((path.parent / "effects_meta.json").read_text())
    assert (
        meta["fingerprint"] == fingerprint(changed, input_digests(changed, tiny_sae))
        and meta["effects"]["loss_target"]["value"] == 0.5
    )
    assert load_file(path)["vector_ids"].tolist() == [3, 9, 12]


# --- devices ----------------------------------------------------------------------------------


def test_a_run_grows_to_more_vectors(tmp_path, tiny_model, tiny_sae, monkeypatch):
    """Asking for more vectors extends the plan: only the added ones are measured, the old ones keep
    their numbers, and the result equals a run of the larger selection from scratch (to float rounding)."""
    small = tiny_run(tmp_path / "a", vectors={"source": "decoder_rows", "ids": {"start": 2, "stop": 5}})
    run_effects(small, tiny_model, tiny_sae, gpus=0)
    first = Plan.load(work_dir(small) / "plan.safetensors")
    assert first.base_fingerprint and first.ancestors == []
    measured: list[int] = []
    real = effects_runner.compute_block

    def counting(run, model, sae, plan, *, rows, **k):
        measured.extend(plan.vector_ids[rows].tolist())
        return real(run, model, sae, plan, rows=rows, **k)

    monkeypatch.setattr(effects_runner, "compute_block", counting)
    big = tiny_run(tmp_path / "a", vectors={"source": "decoder_rows", "ids": [2, 3, 4, 7, 11]})
    path = run_effects(big, tiny_model, tiny_sae, gpus=0)
    assert sorted(measured) == [7, 11]
    grown = Plan.load(work_dir(big) / "plan.safetensors")
    assert grown.ancestors == [first.plan_id] and grown.plan_id != first.plan_id
    assert torch.equal(grown.baseline_mean, first.baseline_mean)
    meta = json.loads((path.parent / "effects_meta.json").read_text())
    assert meta["fingerprint"] == fingerprint(big, input_digests(big, tiny_sae)) and meta["n_vectors"] == 5

    fresh = tiny_run(tmp_path / "b", vectors={"source": "decoder_rows", "ids": [2, 3, 4, 7, 11]})
    want = load_file(run_effects(fresh, tiny_model, tiny_sae, gpus=0))
    got = load_file(path)
    assert got["vector_ids"].tolist() == [2, 3, 4, 7, 11]
    for k in want:  # to float rounding: the grown run's blocks hold other rows (engine docs)
        if want[k].is_floating_point():
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, equal_nan=True, msg=k)
        else:
            assert torch.equal(got[k], want[k]), k

    # a plan never shrinks, and other settings still need restart
    fewer = tiny_run(tmp_path / "a", vectors={"source": "decoder_rows", "ids": [2, 3]})
    with pytest.raises(ConfigError, match="leaves out"):
        run_effects(fewer, tiny_model, tiny_sae, gpus=0)
    other = tiny_run(
        tmp_path / "a",
        vectors={"source": "decoder_rows", "ids": [2, 3, 4, 7, 11, 12]},
        loss_target={"kind": "relative", "value": 0.5},
    )
    with pytest.raises(ConfigError, match="more than which vectors"):
        run_effects(other, tiny_model, tiny_sae, gpus=0)


def test_a_plan_saved_before_growth_existed_grows(tmp_path, tiny_model, tiny_sae):
    """A plan without a stored base fingerprint grows when the current settings with its own
    vector range reproduce its fingerprint."""
    run = tiny_run(tmp_path, vectors={"source": "decoder_rows", "ids": {"start": 0, "stop": 3}})
    plan = prepare_plan(run, tiny_model, tiny_sae)
    plan.base_fingerprint = ""
    plan.save(work_dir(run) / "plan.safetensors")
    more = tiny_run(tmp_path, vectors={"source": "decoder_rows", "ids": {"start": 0, "stop": 6}})
    grown = prepare_plan(more, tiny_model, tiny_sae)
    assert grown.vector_ids.tolist() == list(range(6)) and grown.ancestors == [plan.plan_id]
    # an old vector that is not the new selection's (another draw, another file) is never grown over
    grown.vectors[1] = -grown.vectors[1]
    grown.save(work_dir(run) / "plan.safetensors")
    most = tiny_run(tmp_path, vectors={"source": "decoder_rows", "ids": {"start": 0, "stop": 8}})
    with pytest.raises(ConfigError, match="differ"):
        prepare_plan(most, tiny_model, tiny_sae)


def test_available_devices_without_gpus(monkeypatch):
    """Regression: gpus=N on a machine without GPUs silently started N CPU workers (gpus=999 too)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert available_devices(0) == []
    for n in (1, 999):
        with pytest.raises(ConfigError, match=f"gpus={n} but no CUDA device is visible.*cpu_workers"):
            available_devices(n)
    assert available_devices(0, cpu_workers=3) == ["cpu", "cpu", "cpu"]
    with pytest.raises(ConfigError, match="not both"):
        available_devices(1, cpu_workers=1)
    with pytest.raises(ConfigError, match="gpus"):
        available_devices(-1)


def test_available_devices_with_gpus(monkeypatch, tmp_path, tiny_model, tiny_sae):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available_devices(0) == []
    assert available_devices(2) == ["cuda:0", "cuda:1"]
    with pytest.raises(ConfigError, match="only 2 CUDA"):
        available_devices(3)
    run = tiny_run(tmp_path)
    with pytest.raises(ConfigError, match="gpus=3"):
        run_effects(run, tiny_model, tiny_sae, gpus=3)
    assert not work_dir(run).exists()  # refused before any plan or work


# --- bad inputs fail before any model forward -------------------------------------------------


@pytest.fixture
def no_forward(tiny_model, monkeypatch):
    """Any forward pass of the model fails the test (not with a ConfigError)."""

    def forward(*a, **k):
        raise AssertionError("the model ran before the inputs were validated")

    monkeypatch.setattr(tiny_model, "forward", forward)
    return tiny_model


def vectors_file(tmp_path: Path, vectors: torch.Tensor, ids: list[int] | None = None) -> Path:
    path = tmp_path / "vectors.safetensors"
    t = {"vectors": vectors.contiguous()}
    if ids is not None:
        t["vector_ids"] = torch.tensor(ids, dtype=torch.int64)
    save_file(t, str(path))
    return path


def good_vectors(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(0))


def fails_before_work(tmp_path, vectors, model, sae, match: str) -> str:
    run = tiny_run(tmp_path, vectors=vectors)
    with pytest.raises(ConfigError, match=match) as err:
        run_effects(run, model, sae, gpus=0)
    assert not (work_dir(run) / "plan.safetensors").exists()
    assert not (work_dir(run) / "shards").exists()
    return str(err.value)


def test_decoder_row_out_of_range(tmp_path, no_forward, tiny_sae):
    vectors = {"source": "decoder_rows", "ids": {"start": 60, "stop": 70}}
    msg = fails_before_work(tmp_path, vectors, no_forward, tiny_sae, "out of range")
    assert "64" in msg and "0..63" in msg
    vectors = {"source": "decoder_rows", "ids": [1, -1]}
    fails_before_work(tmp_path, vectors, no_forward, tiny_sae, "out of range")
    vectors = {"source": "decoder_rows", "ids": [4, 4]}
    fails_before_work(tmp_path, vectors, no_forward, tiny_sae, "duplicates")
    vectors = {"source": "decoder_rows", "ids": {"start": 5, "stop": 5}}
    fails_before_work(tmp_path, vectors, no_forward, tiny_sae, "selects no")


@pytest.mark.parametrize(
    "row",
    [
        torch.cat([torch.ones(5), torch.tensor([float("nan")]), torch.ones(26)]),  # one NaN entry
        torch.zeros(32),
        torch.full((32,), float("inf")),
    ],
    ids=["nan", "zero", "inf"],
)
def test_bad_vector_in_file(tmp_path, no_forward, tiny_sae, row):
    vecs = good_vectors()
    vecs[1] = row
    path = vectors_file(tmp_path, vecs, ids=[10, 20, 30])
    vectors = {"source": "file", "path": str(path)}
    msg = fails_before_work(tmp_path, vectors, no_forward, tiny_sae, "zero or non-finite")
    assert "[20]" in msg  # names the offending vector id


def test_repeated_ids_in_vectors_file(tmp_path, no_forward, tiny_sae):
    path = vectors_file(tmp_path, good_vectors(), ids=[5, 5, 7])
    vectors = {"source": "file", "path": str(path)}
    fails_before_work(tmp_path, vectors, no_forward, tiny_sae, "appear more than once")


def test_vectors_file_problems(tmp_path, no_forward, tiny_sae):
    vectors = {"source": "file", "path": str(tmp_path / "missing.safetensors")}
    fails_before_work(tmp_path, vectors, no_forward, tiny_sae, "does not exist")
    path = vectors_file(tmp_path, torch.randn(3, 16))
    vectors = {"source": "file", "path": str(path)}
    fails_before_work(tmp_path, vectors, no_forward, tiny_sae, r"need \[n, 32\]")
    save_file({"other": torch.randn(3, 32)}, str(path))
    fails_before_work(tmp_path, vectors, no_forward, tiny_sae, "no 'vectors' tensor")


@pytest.mark.parametrize(
    "effects, match",
    [
        ({"scale_grid": {"start": 0, "stop": 40, "step": 0}}, "scale grid is empty"),
        ({"scale_grid": {"start": 40, "stop": 0, "step": 10}}, "scale grid is empty"),
        ({"vectors": {"source": "steering_ideas"}}, "effects.vectors.source"),
        ({"vectors": {"source": "random"}}, "count is required"),
        ({"vectors": {"source": "pairs"}}, "count is required"),
        ({"vectors": {"source": "file"}}, "path is required"),
        ({"vectors": {"source": "decoder_rows", "ids": {"begin": 0, "stop": 3}}}, "start: a, stop: b"),
    ],
)
def test_config_rejects_bad_effects_settings(tmp_path, effects, match):
    with pytest.raises(ConfigError, match=match):
        tiny_run(tmp_path, **effects)


def test_vector_sources_yield_unit_vectors_in_id_order(tmp_path, tiny_sae):
    run = tiny_run(tmp_path, vectors={"source": "random", "count": 5})
    ids, vecs = build_vectors(run, tiny_sae, 32)
    assert ids.tolist() == [0, 1, 2, 3, 4] and vecs.shape == (5, 32)
    torch.testing.assert_close(vecs.norm(dim=-1), torch.ones(5))
    again = build_vectors(run, tiny_sae, 32)[1]
    assert torch.equal(vecs, again)  # seeded by the run seed
    path = vectors_file(tmp_path, good_vectors(4) * 3.0, ids=[7, 8, 9, 11])
    run = tiny_run(tmp_path, vectors={"source": "file", "path": str(path), "ids": [1, 3]})
    ids, vecs = build_vectors(run, tiny_sae, 32)
    assert ids.tolist() == [8, 11]
    g = good_vectors(4)
    torch.testing.assert_close(vecs, g[[1, 3]] / g[[1, 3]].norm(dim=-1, keepdim=True))


def test_prepare_plan_reuses_the_saved_plan(tmp_path, tiny_model, tiny_sae, monkeypatch):
    run = tiny_run(tmp_path, vectors={"source": "decoder_rows", "ids": [2, 5]})
    plan = prepare_plan(run, tiny_model, tiny_sae)
    assert plan.vector_ids.tolist() == [2, 5] and plan.loss_tokens.shape == (4, 16)
    assert torch.all(plan.loss_tokens[:, 0] == 1)  # every chunk starts with the configured BOS
    monkeypatch.setattr(tiny_model, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    again = prepare_plan(run, tiny_model, tiny_sae)
    assert torch.equal(again.baseline_mean, plan.baseline_mean) and again.unsteered_loss == plan.unsteered_loss
