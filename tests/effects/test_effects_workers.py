"""Notebook 01's workers under failure: leases, a worker SIGKILLed mid-block on submitit's
LocalExecutor (the Slurm path), and one regression test per runner defect found by reading the code
(stale shards after a restart, an interrupted parent, a block that always fails, concurrent runs,
changed inputs, an unreadable plan and leftover temporary files, a half-written merged set, file
modes). Tiny model; the slow parts are the real worker processes of the executor test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import submitit
import torch
from safetensors.torch import save_file

from helpers import FIRST_8, WAIT_S, assert_equals_reference, shard_ids, tiny_run
from saets_utils.config import ConfigError
from saets_utils.effects import executors, store
from saets_utils.effects import runner as effects_runner
from saets_utils.effects.claims import EXPIRED, Heartbeat, fail_claim, read_claims, try_claim
from saets_utils.effects.plan import Plan, work_dir
from saets_utils.effects.runner import LOCK, block_key, run_effects
from saets_utils.effects.store import load_effects, merge_effects
from saets_utils.io_utils import atomic_save_safetensors, atomic_write_text, make_temp_dir
from saets_utils.models import assets
from saets_utils.models.tiny import tiny_sae as make_tiny_sae


def ready(heartbeat: Path) -> bool:
    """A worker's heartbeat file says it has loaded the model and claims blocks now."""
    try:
        return json.loads(heartbeat.read_text()).get("state") == "working"
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def no_compute(monkeypatch) -> None:
    def fail(*a, **k):
        raise AssertionError("compute_block called on finished work")

    monkeypatch.setattr(effects_runner, "compute_block", fail)


# --- leases -----------------------------------------------------------------------------------


def age(path: Path, seconds: float) -> None:
    """Date a claim's lease ``seconds`` back, as if its holder last renewed it then (no test waits
    for a lease to run out: a loaded machine can stall any short wait)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


LEASE = 60.0  # far longer than any stall of a loaded machine between two claims of a test


def test_leases_expire_without_heartbeats_and_failures_are_counted_per_attempt(tmp_path):
    a = try_claim(tmp_path, "blk", "A", "w1", lease_s=LEASE, max_failures=2)
    assert a.state == "claimed" and a.path == tmp_path / "blk.0"
    with Heartbeat(0.05, a.path):  # renewed: nobody else gets it, however old it was
        age(a.path, 10 * LEASE)
        deadline = time.monotonic() + WAIT_S
        while a.path.stat().st_mtime < time.time() - LEASE:
            assert time.monotonic() < deadline, "the heartbeat did not renew the lease"
            time.sleep(0.05)
        assert try_claim(tmp_path, "blk", "A", "w2", lease_s=LEASE, max_failures=2).state == "held"
    age(a.path, LEASE + 1)  # its holder stopped renewing (killed, hung, preempted) a lease ago
    b = try_claim(tmp_path, "blk", "A", "w2", lease_s=LEASE, max_failures=2)
    assert b.state == "claimed" and b.path == tmp_path / "blk.1"
    assert try_claim(tmp_path, "blk", "A", "w3", lease_s=LEASE, max_failures=2).state == "held"
    fail_claim(b.path, "RuntimeError: boom")  # a failure ends the lease at once
    given_up = try_claim(tmp_path, "blk", "A", "w3", lease_s=LEASE, max_failures=2)
    assert given_up.state == "given_up" and given_up.failures == 2 and "boom" in given_up.errors[-1]
    later = try_claim(tmp_path, "blk", "B", "w1", lease_s=LEASE, max_failures=2)  # a later run retries it
    assert later.state == "claimed" and later.path == tmp_path / "blk.2"
    # a requeued job keeps its worker name but is a new process: it takes its own claim back at once
    info = json.loads(later.path.read_text())
    later.path.write_text(json.dumps({**info, "pid": info["pid"] + 1}))
    assert try_claim(tmp_path, "blk", "B", "w1", lease_s=LEASE).state == "claimed"
    assert [c.gen for c in read_claims(tmp_path, "blk")] == [0, 1, 2, 3]


# --- the Slurm path on submitit's LocalExecutor -------------------------------------------------


HUNG_S = 8.0  # the lease: a worker silent this long is hung (a live one beats every HUNG_S / 6)


@pytest.fixture
def reference(effects_reference):
    return effects_reference


def test_workers_killed_or_hung_mid_block_on_submitit_give_the_uninterrupted_result(
    tmp_path, reference, tiny_model, tiny_sae, capsys
):
    """Three submitit jobs (LocalExecutor: real processes) claim blocks from the run's folder. Worker 0
    is SIGKILLed and worker 1 frozen (SIGSTOP: a hang, no heartbeat) while each holds a block. The
    parent cancels the silent job, their blocks are re-claimed by the other worker, each vector is
    measured once, and the merged result equals the uninterrupted in-process run.
    Regression (hung worker): the parent used to poll a hung worker forever.

    Holding a block is set up, not raced for: with all three workers stopped, workers 0 and 1 are
    given a block each by a claim exactly like their own (worker, attempt, host, pid, start time; no
    shard), the state a worker killed mid-block leaves. Catching them mid-block by polling (as this
    test did) failed on a loaded machine, where a tiny block is measured between two polls."""
    slurm = {"tasks": 3, "gpus_per_task": 0}
    run = tiny_run(tmp_path, vectors=FIRST_8, lease_s=HUNG_S, executor="slurm", slurm=slurm)
    ex = submitit.LocalExecutor(folder=str(tmp_path / "submitit"))
    ex.update_parameters(timeout_min=10)
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["path"] = run_effects(run, tiny_model, tiny_sae, poll_s=0.1, executor=ex)
        except BaseException as e:  # handed to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    hit: dict[str, tuple[str, int]] = {}  # worker suffix -> (block key, pid)
    workers: dict[str, dict[str, Any]] = {}  # worker suffix -> its heartbeat record (pid, attempt, ...)
    claims, shards = work_dir(run) / "claims", work_dir(run) / "shards"
    deadline = time.monotonic() + WAIT_S
    try:
        # Hold every block until all three workers are up (they start at very different times on a
        # loaded machine, and one could otherwise finish all blocks alone).
        while not (work_dir(run) / "plan.safetensors").exists():
            assert thread.is_alive() and time.monotonic() < deadline, f"no plan in time: {outcome}"
            time.sleep(0.01)
        plan = Plan.load(work_dir(run) / "plan.safetensors")
        gate = [try_claim(claims, block_key(plan, 2, k), "gate", "gate", lease_s=4.0).path for k in range(4)]
        assert all(gate)
        workers_dir = work_dir(run) / "workers"
        with Heartbeat(0.1, *gate) as beat:
            while sum(ready(p) for p in workers_dir.glob("*.json")) < 3:
                assert thread.is_alive() and time.monotonic() < deadline, f"workers not up in time: {outcome}"
                time.sleep(0.05)
            workers.update(
                {p.stem[-3:]: {**json.loads(p.read_text()), "worker": p.stem} for p in workers_dir.glob("*.json")}
            )
            assert sorted(workers) == ["-s0", "-s1", "-s2"], sorted(workers)
            for info in workers.values():  # all frozen: no claim is taken while blocks change hands
                os.kill(info["pid"], signal.SIGSTOP)
            for k, who in enumerate(("-s0", "-s1")):  # block k is held by worker who, mid-block
                beat.discard(gate[k])
                os.utime(gate[k], EXPIRED)
                w = workers[who]
                key = block_key(plan, 2, k)
                held = {"attempt": w["attempt"], "worker": w["worker"], "host": w["host"], "pid": w["pid"]}
                (claims / f"{key}.1").write_text(json.dumps({**held, "start": w["start"], "since": time.time()}))
                hit[who] = (key, w["pid"])
        for p in gate[2:]:
            os.utime(p, EXPIRED)
        os.kill(hit["-s0"][1], signal.SIGKILL)  # killed mid-block
        os.kill(workers["-s2"]["pid"], signal.SIGCONT)  # worker 1 stays stopped: hung mid-block
        thread.join(WAIT_S)
        assert not thread.is_alive(), "run_effects did not return after the kill and the hang"
    finally:
        for who, w in workers.items():  # none left frozen if the test stopped half-way
            with contextlib.suppress(ProcessLookupError):
                os.kill(w["pid"], signal.SIGKILL if who == "-s1" else signal.SIGCONT)
    assert "error" not in outcome, outcome.get("error")
    out = capsys.readouterr()
    assert f"-s1 sent no heartbeat for {HUNG_S:g} s (hung): killed" in out.out + out.err
    counts = shard_ids(run)
    assert sorted(counts) == list(range(8)) and set(counts.values()) == {1}, "each vector exactly once"
    assert_equals_reference(run, reference)
    for who, (key, pid) in hit.items():  # its block was re-claimed and measured by another worker
        gens = read_claims(claims, key)
        mine = next(c.gen for c in gens if c.pid == pid)
        assert any(c.gen > mine and not c.worker.endswith(who) for c in gens), [c.worker for c in gens]
        assert not list(shards.glob(f"{key}.*{who}.safetensors"))


# --- regression tests, one per defect -----------------------------------------------------------


def test_shards_of_a_discarded_plan_are_never_merged(tmp_path, reference, tiny_model, tiny_sae, monkeypatch):
    """Regression: restart deleted the folder while old workers still ran; a shard they wrote after
    it (old settings) was taken by the merge. Shards carry the plan id; only current ones count."""
    two = {"source": "decoder_rows", "ids": [2, 4]}  # calibrated "ok": the old target gives other scales
    old = tiny_run(tmp_path, vectors=two, loss_target={"kind": "relative", "value": 0.6})
    run_effects(old, tiny_model, tiny_sae)
    stale = next((work_dir(old) / "shards").glob("*.safetensors")).read_bytes()
    run = tiny_run(tmp_path, vectors=two)  # the reference's settings
    prepare = effects_runner.prepare_plan

    def prepare_then_old_worker_writes(*a, **k):
        plan = prepare(*a, **k)
        (work_dir(run) / "shards").mkdir(exist_ok=True)
        (work_dir(run) / "shards" / "0-old-worker.safetensors").write_bytes(stale)
        return plan

    monkeypatch.setattr(effects_runner, "prepare_plan", prepare_then_old_worker_writes)
    run_effects(run, tiny_model, tiny_sae, restart=True)
    assert_equals_reference(run, reference)


def test_an_interrupted_parent_stops_its_workers_and_releases_its_lock(tmp_path, tiny_model, tiny_sae, monkeypatch):
    """Regression: the parent's poll loop had no try/finally; an interrupt left workers running."""
    run = tiny_run(tmp_path, vectors=FIRST_8)
    pools = []
    local_pool = executors.LocalPool
    monkeypatch.setattr(executors, "LocalPool", lambda *a, **k: pools.append(local_pool(*a, **k)) or pools[-1])

    class InterruptedTime:  # the parent's first poll is interrupted (Ctrl-C in the notebook)
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(s):
            raise KeyboardInterrupt

    monkeypatch.setattr(executors, "time", InterruptedTime())
    with pytest.raises(KeyboardInterrupt):
        run_effects(run, tiny_model, tiny_sae, cpu_workers=2)
    procs = list(pools[0].procs.values())
    assert len(procs) == 2 and all(p.poll() is not None for p in procs), "workers left running"
    lock = read_claims(run.results_dir / LOCK, "run")[-1]
    assert lock.mtime == EXPIRED[1]  # released: the next run starts at once


def test_a_block_that_always_fails_is_reported_and_skipped_and_retried_by_the_next_run(
    tmp_path, reference, tiny_model, tiny_sae, monkeypatch
):
    """Regression: a block that crashed its worker every time was retried forever."""
    run = tiny_run(tmp_path, vectors={"source": "decoder_rows", "ids": [0, 1, 2, 3]})
    compute = effects_runner.compute_block
    calls: list[list[int]] = []

    def crashes_on_vector_2(run, model, sae, plan, *, rows, **k):
        ids = plan.vector_ids[rows].tolist()
        calls.append(ids)
        if 2 in ids:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return compute(run, model, sae, plan, rows=rows, **k)

    monkeypatch.setattr(effects_runner, "compute_block", crashes_on_vector_2)
    with pytest.raises(RuntimeError, match=r"(?s)2 of 4 vectors unmeasured.*vector ids \[2, 3\]\) failed 3 times"):
        run_effects(run, tiny_model, tiny_sae)
    assert calls == [[0, 1], [2, 3], [2, 3], [2, 3]]  # the other block was measured, this one tried 3 times
    assert sorted(shard_ids(run)) == [0, 1]
    monkeypatch.setattr(effects_runner, "compute_block", compute)
    run_effects(run, tiny_model, tiny_sae)  # a later run retries it
    assert_equals_reference(run, reference)


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_lives(tmp_path, tiny_model, tiny_sae):
    """Regression: two concurrent runs of the same params each computed every block."""
    run = tiny_run(tmp_path, vectors={"source": "decoder_rows", "ids": [5, 6]}, lease_s=LEASE)
    other = try_claim(run.results_dir / LOCK, "run", "", "otherhost:4242", lease_s=LEASE)
    assert other.path is not None
    with pytest.raises(ConfigError, match=r"another run .*pid \d+ on"):  # its lock is fresh
        run_effects(run, tiny_model, tiny_sae)
    assert not work_dir(run).exists()  # refused before any work
    age(other.path, LEASE + 1)  # that run died a lease ago: its lock expired, the next run takes it over
    run_effects(run, tiny_model, tiny_sae)
    assert sorted(shard_ids(run)) == [5, 6]


def test_changed_sae_or_vectors_file_is_not_resumed_but_targets_key_is(tmp_path, tiny_model, tiny_sae, monkeypatch):
    """Regression: the fingerprint hashed settings only, so a retrained SAE or a rewritten vectors file
    resumed on stale shards; and ``sae.targets_key`` (read by 03 only) invalidated 01's work."""
    path = tmp_path / "vectors.safetensors"
    vecs = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    save_file({"vectors": vecs}, str(path))
    run = tiny_run(tmp_path, vectors={"source": "file", "path": str(path)})
    run_effects(run, tiny_model, tiny_sae)
    no_compute(monkeypatch)
    relabelled = run.model_copy(update={"sae": run.sae.model_copy(update={"targets_key": "tiny/other-key"})})
    run_effects(relabelled, tiny_model, tiny_sae)  # nothing recomputed
    retrained = make_tiny_sae(d_in=32, d_sae=64, k=4, seed=1)
    with pytest.raises(ConfigError, match=r"other effects settings or inputs.*restart=True"):
        run_effects(run, tiny_model, retrained)
    save_file({"vectors": vecs.flip(0)}, str(path))  # same path and settings, other content
    with pytest.raises(ConfigError, match=r"other effects settings or inputs.*restart=True"):
        run_effects(run, tiny_model, tiny_sae)


def test_unreadable_plan_is_replaced_by_restart_and_stale_tmp_files_are_removed(tmp_path, tiny_model, tiny_sae):
    """Regression: an unreadable plan.safetensors blocked restart=True; leftover .tmp files stayed."""
    run = tiny_run(tmp_path, vectors={"source": "decoder_rows", "ids": [7, 8]})
    wd = work_dir(run)
    wd.mkdir(parents=True)
    (wd / "plan.safetensors").write_bytes(b"\x00truncated")
    with pytest.raises(ConfigError, match=r"unreadable.*restart=True"):
        run_effects(run, tiny_model, tiny_sae)
    run_effects(run, tiny_model, tiny_sae, restart=True)
    assert Plan.load(wd / "plan.safetensors").vector_ids.tolist() == [7, 8]
    # writers killed mid-write left these; a young one may still be being written by a live worker
    old = [wd / "shards" / ".x.safetensors.ab12.tmp", run.results_dir / ".effects.safetensors.cd34.tmp"]
    young = wd / ".plan.safetensors.ef56.tmp"
    for p in [*old, young]:
        p.write_bytes(b"partial")
    for p in old:
        os.utime(p, (time.time() - 3600,) * 2)
    run_effects(run, tiny_model, tiny_sae)
    assert not any(p.exists() for p in old) and young.exists()


def test_an_interrupted_merge_is_detected_on_load(tmp_path, reference, monkeypatch):
    """Regression: the merge wrote five files one after another; a crash left a mixed set that loaded."""
    ref_run, _ = reference
    run = ref_run.model_copy(update={"results_root": str(tmp_path)})
    shutil.copytree(ref_run.results_dir, run.results_dir)
    plan = Plan.load(work_dir(run) / "plan.safetensors")
    write_json = store.atomic_write_json

    def crash(*a, **k):
        raise OSError("node lost power")

    monkeypatch.setattr(store, "atomic_write_json", crash)  # dies before effects_meta.json
    with pytest.raises(OSError, match="power"):
        merge_effects(run, plan)
    with pytest.raises(RuntimeError, match="interrupted merge"):
        load_effects(run.results_dir)
    monkeypatch.setattr(store, "atomic_write_json", write_json)
    merge_effects(run, plan)
    assert load_effects(run.results_dir).effects.shape[0] == 24


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writes_use_the_umask_modes(tmp_path, umask):
    """Regression: atomic writes made files 0600 and folders 0700 (mkstemp/mkdtemp), unreadable to
    colleagues sharing results/ or the cache on a cluster."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_save_safetensors({"t": torch.zeros(2)}, tmp_path / "b.safetensors")
        folder = make_temp_dir(tmp_path, ".f.")
        with assets._building(tmp_path / "asset") as building:
            assert stat.S_IMODE(building.stat().st_mode) == 0o777 & ~umask
    finally:
        os.umask(old)
    for f in ("a.txt", "b.safetensors"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    assert not list(tmp_path.glob(".a.txt.*"))


def test_slurm_settings_are_checked_before_any_work(tmp_path, tiny_model, tiny_sae, monkeypatch):
    run = tiny_run(tmp_path, executor="slurm")
    with pytest.raises(ConfigError, match=r"effects\.slurm\.tasks"):
        run_effects(run, tiny_model, tiny_sae, gpus=2)
    assert not work_dir(run).exists()
    with pytest.raises(ConfigError, match=r"slurm\.tasks"):
        tiny_run(tmp_path, slurm={"tasks": 0})
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="needs Slurm"):
        run_effects(run, tiny_model, tiny_sae)
    assert not (work_dir(run) / "plan.safetensors").exists()
    fake = tmp_path / "bin" / "srun"  # submitit only looks for srun before submitting
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    sl = {"partition": "gpu", "account": "lab", "tasks": 16, "time_min": 90, "sbatch": {"qos": "high"}}
    ex = executors.slurm_executor(tiny_run(tmp_path, slurm=sl), tmp_path / "logs")  # submitit validates the names
    p = ex._executor.parameters
    assert (p["partition"], p["account"], p["array_parallelism"], p["gpus_per_node"]) == ("gpu", "lab", 16, 1)
    assert p["time"] == 90 and p["additional_parameters"] == {"qos": "high"}
