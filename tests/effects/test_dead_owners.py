"""Locks and claims that know a dead owner: a lease held by a process of this host that
no longer exists, or whose pid now belongs to a process started at another time, is taken over at
once with a notice naming it; a live holder, or one on another host, keeps the lease. And 01 killed
with kill -9 half-way resumes at once on a re-run, to the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import FIRST_8, WAIT_S, assert_equals_reference, shard_files, tiny_run
from saets_utils.config import ConfigError
from saets_utils.effects.claims import identity, process_start, read_claims, try_claim
from saets_utils.effects.plan import work_dir
from saets_utils.effects.runner import LOCK, run_effects

LEASE = 600.0  # far longer than any test: a take-over can only come from knowing the holder is dead

CLAIM = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from saets_utils.effects.claims import try_claim
    got = try_claim(Path(sys.argv[1]), sys.argv[2], "A", "w-child", lease_s=600.0)
    assert got.state == "claimed", got
    print("claimed", flush=True)
    if len(sys.argv) > 3:
        import time
        time.sleep(float(sys.argv[3]))
    """
)


def claim_in_child(folder, key, sleep_s: float | None = None) -> subprocess.Popen:
    """A child process that claims ``key`` (and then sleeps ``sleep_s``, or exits at once)."""
    args = [sys.executable, "-c", CLAIM, str(folder), key] + ([] if sleep_s is None else [str(sleep_s)])
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "claimed"
    return p


def test_claim_of_an_exited_process_is_taken_over_at_once(tmp_path, capsys):
    child = claim_in_child(tmp_path, "blk")
    assert child.wait(timeout=60) == 0
    held = read_claims(tmp_path, "blk")[-1]
    assert held.pid == child.pid and held.fresh(LEASE) and held.start is not None
    got = try_claim(tmp_path, "blk", "B", "w-me", lease_s=LEASE)
    assert got.state == "claimed" and got.path == tmp_path / "blk.1"
    notice = capsys.readouterr().out.strip().splitlines()
    assert notice == [
        f"saets: taking over {tmp_path.name}/blk from w-child (pid {child.pid} on {held.host}): its process is gone"
    ]


def test_a_holder_killed_while_writing_its_claim_leaves_no_claim(tmp_path, monkeypatch):
    """A claim appears with its holder's identity or not at all: a worker killed between creating its
    claim and writing who it is left an empty file that read as a live holder, and the next run
    waited out the whole lease (found by tests/effects/test_chaos.py: 590 s at a 600 s lease)."""

    def killed(*a, **k):
        raise SystemExit("killed mid-write")

    monkeypatch.setattr(os, "link", killed)
    with pytest.raises(SystemExit):
        try_claim(tmp_path, "blk", "A", "w-dying", lease_s=LEASE)
    monkeypatch.undo()
    assert read_claims(tmp_path, "blk") == [] and not list(tmp_path.iterdir())  # no claim, no temporary
    got = try_claim(tmp_path, "blk", "B", "w-next", lease_s=LEASE)
    assert got.state == "claimed" and read_claims(tmp_path, "blk")[-1].worker == "w-next"


def test_claim_of_a_live_process_still_holds_until_it_dies(tmp_path):
    assert try_claim(tmp_path, "mine", "A", "w1", lease_s=LEASE).state == "claimed"  # this test's own process
    assert try_claim(tmp_path, "mine", "A", "w2", lease_s=LEASE).state == "held"
    child = claim_in_child(tmp_path, "blk", sleep_s=120)
    try:
        assert try_claim(tmp_path, "blk", "B", "w-me", lease_s=LEASE).state == "held"
    finally:
        child.kill()
        child.wait()
    assert try_claim(tmp_path, "blk", "B", "w-me", lease_s=LEASE).state == "claimed"


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path, capsys):
    """The holder's pid exists, but it started at another time: a new process got the dead one's pid."""
    me = identity()
    assert me["start"] == process_start(os.getpid()) is not None
    gone = {"attempt": "A", "worker": "w-old", **me, "start": "another-boot:12345"}
    (tmp_path / "blk.0").write_text(json.dumps(gone))
    assert try_claim(tmp_path, "blk", "B", "w-me", lease_s=LEASE).state == "claimed"
    assert "its pid now belongs to another process" in capsys.readouterr().out


def test_a_holder_on_another_host_keeps_its_lease(tmp_path):
    child = claim_in_child(tmp_path, "blk")
    child.wait(timeout=60)
    info = json.loads((tmp_path / "blk.0").read_text())
    (tmp_path / "blk.0").write_text(json.dumps({**info, "host": "node-elsewhere"}))  # its pid means nothing here
    assert try_claim(tmp_path, "blk", "B", "w-me", lease_s=LEASE).state == "held"
    assert try_claim(tmp_path, "blk", "B", "w-me", lease_s=0.0).state == "claimed"  # once its lease expires


def test_a_run_lock_of_a_live_process_refuses_and_of_a_dead_one_is_taken_over(tmp_path, tiny_model, tiny_sae, capsys):
    run = tiny_run(tmp_path, vectors={"source": "decoder_rows", "ids": [5, 6]}, lease_s=LEASE)
    child = claim_in_child(run.results_dir / LOCK, "run", sleep_s=120)  # a second run, alive
    try:
        with pytest.raises(ConfigError, match=rf"another run .*pid {child.pid} on"):
            run_effects(run, tiny_model, tiny_sae)
        assert not work_dir(run).exists()
    finally:
        child.kill()
        child.wait()
    t0 = time.monotonic()
    run_effects(run, tiny_model, tiny_sae)  # its lock is fresh for 600 s, but its holder is dead
    assert time.monotonic() - t0 < 60
    assert f"taking over {LOCK}/run from w-child (pid {child.pid} on" in capsys.readouterr().out


PARENT = textwrap.dedent(
    """
    import sys
    from saets_utils.config import load_config
    from saets_utils.effects.runner import run_effects
    from saets_utils.models.loading import load_model
    from saets_utils.models.sae_loading import load_sae
    run = load_config(sys.argv[1])
    run_effects(run, load_model(run.model), load_sae(run), cpu_workers=2, poll_s=0.1)
    """
)


def test_01_killed_mid_run_resumes_at_once_to_the_uninterrupted_result(
    tmp_path, effects_reference, tiny_model, tiny_sae, capsys
):
    """The parent and its two CPU workers are SIGKILLed together (a killed kernel, an OOM kill) while
    blocks are left; an immediate re-run takes over the lock and the dead workers' claims without
    waiting for their 600 s leases, and merges to the uninterrupted run's numbers."""
    run = tiny_run(tmp_path, vectors=FIRST_8, lease_s=LEASE)
    params = tmp_path / "params" / "tinyrun.yaml"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(tmp_path / "parent.log", "w")  # noqa: SIM115 - the child keeps writing to it
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(params)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    claims = work_dir(run) / "claims"
    deadline = time.monotonic() + WAIT_S
    try:
        # mid-run: a block measured, and a worker holding a claim on one not yet written
        while not (shard_files(run) and claims.is_dir() and len(shard_files(run)) < len(list(claims.glob("*.0")))):
            assert parent.poll() is None, (tmp_path / "parent.log").read_text()
            assert time.monotonic() < deadline, "no block measured in time"
            time.sleep(0.02)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the parent and its workers at once
        parent.wait()
        log.close()
    done_before = len(shard_files(run))
    assert 0 < done_before < 4, "killed before the end"
    finished = {s.name.split(".")[0] for s in shard_files(run)}
    orphans = {p.name.split(".")[0] for p in claims.glob("*.0")} - finished  # claimed by a worker now dead
    assert all(read_claims(claims, k)[-1].fresh(LEASE) for k in orphans)
    t0 = time.monotonic()
    run_effects(run, tiny_model, tiny_sae)
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    assert f"taking over {LOCK}/run from" in out and "its process is gone" in out
    for k in orphans:  # the dead workers' blocks, taken over without waiting for their leases
        assert f"taking over claims/{k} from " in out
    assert took < 60, f"the re-run waited {took:.0f} s"
    print(f"kill -9 with {done_before} of 4 blocks done; the re-run resumed and finished in {took:.1f} s")
    assert_equals_reference(run, effects_reference)


def test_ctrl_c_in_the_kernel_releases_the_block_for_a_rerun_in_the_same_kernel(
    tmp_path, effects_reference, tiny_model, tiny_sae, monkeypatch
):
    """In-process work (no workers) interrupted mid-block: the holder is this very process, alive, so
    only releasing the claim on the way out lets the next cell's re-run take it without waiting."""
    from saets_utils.effects import runner as effects_runner
    from saets_utils.effects.claims import EXPIRED

    run = tiny_run(tmp_path, vectors={"source": "decoder_rows", "ids": [0, 1]}, lease_s=LEASE)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(effects_runner, "compute_block", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_effects(run, tiny_model, tiny_sae)
    claims = work_dir(run) / "claims"
    (key,) = {p.name.split(".")[0] for p in claims.iterdir()}
    assert read_claims(claims, key)[-1].mtime == EXPIRED[1]
    t0 = time.monotonic()
    run_effects(run, tiny_model, tiny_sae)
    assert time.monotonic() - t0 < 60
    assert_equals_reference(run, effects_reference)
