"""Chaos (slow tier): 01 and 03 run as the notebooks run them (01 with two CPU worker subprocesses,
03 with an ``openai`` judge) while a seeded driver SIGKILLs the parent's process group, a single
worker or the parent alone at random points, restarts, and the fake judge server answers a seeded
share of requests with a fault (connection dropped, 429, malformed JSON, a hung request). The end
must be what an undisturbed run gives: the same effects files, the same judge scores, every judged
text scored (or counted in a failure report on the way), no process left over, and no shard of a
discarded plan merged.

Two fast tests pin what the chaos test found: a worker whose run was killed stops at its next block
instead of working on, orphaned, and a worker waiting on a block another holds looks again within
seconds, not a heartbeat interval (lease_s / 6), once it is free.

The run has the shape of ``params/test.yaml`` (decoder rows, a loss-calibrated scale grid, CAA and
the prompt baseline judged on two tasks) on the tiny model and SAE: each restart reloads the model
in a fresh process, which on SmolLM2 would take minutes per kill on two cores."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fake_openai_server import FakeOpenAIServer
from helpers import FIRST_8, build_run_cfg, shard_files, tiny_run
from saets_utils.config import REPO_ROOT, RunConfig
from saets_utils.effects.plan import Plan, work_dir
from saets_utils.manifest import StaleInputs, check_current

SEED = 22  # the driver's: kill order and points, and which requests the server faults
N_VECTORS, PER_BLOCK = 24, 2  # 12 blocks: kills land between blocks of a run
LEASE_S = 600.0  # longer than the test: every take-over must come from knowing the holder is dead
FAULT_SHARE = 0.3  # of requests the server answers with a fault
FAULTS = ("connection", "429", "malformed", "hung")
HUNG_S = 3.0  # a hung request's silence; the judge gives up after eval.judge.timeout_s = 1 s
# Bound on each wait: a guard against a hang, not a timing (a loaded 2-core machine took 100 s to
# start one run of 01).
WAIT_S = 600

STEP = textwrap.dedent(
    """
    import sys
    from saets_utils.config import load_config
    from saets_utils.manifest import begin_step, record_step
    from saets_utils.models.loading import load_model
    from saets_utils.models.sae_loading import load_sae

    params, step, restart = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    run = load_config(params)
    model, sae = load_model(run.model), load_sae(run)
    begin_step(run, step)
    if step == "01_effects":  # notebook 01's cell, with two CPU workers
        from saets_utils.effects.runner import run_effects

        run_effects(run, model, sae, restart=restart, cpu_workers=2, poll_s=0.1)
        record_step(run, step, "cpu")
    else:  # notebook 03's cell
        from saets_utils.evaluation.evaluate import evaluate_run
        from saets_utils.judges import JudgeFailures

        try:
            report = evaluate_run(run, model, sae, progress=False)
        except JudgeFailures as e:
            print("JUDGE FAILURES:", e, flush=True)
            sys.exit(3)
        record_step(run, step, "cpu", report.stats)
    print("STEP DONE", flush=True)
    """
)


class ChaosServer(FakeOpenAIServer):
    """The fake server, faulting a seeded share of requests: the n-th request of a message gets the
    fault ``sha256(seed, n, message)`` picks, so which ones fail does not depend on timing."""

    def __init__(self, seed: int, share: float) -> None:
        super().__init__(slow_s=HUNG_S)
        self.seed, self.share, self.chaos = seed, share, False
        self.faults: Counter = Counter()

    def draw(self, content: str, n: int) -> str | None:
        h = hashlib.sha256(f"{self.seed}:{n}:{content}".encode()).hexdigest()
        if int(h[:8], 16) / 2**32 >= self.share:
            return None
        return FAULTS[int(h[8:16], 16) % len(FAULTS)]

    def _reply(self, h: Any, body: dict[str, Any], content: str, fault: str | None) -> None:
        if fault is None and self.chaos:
            with self._lock:
                fault = self.draw(content, self._seen[content] - 1)
                if fault:
                    self.faults[fault] += 1
            if fault == "connection":  # no reply at all: the client sees the connection close
                h.close_connection = True
                return
        super()._reply(h, body, content, {"hung": "slow"}.get(fault or "", fault))


def write_tasks(folder: Path) -> list[str]:
    """Two short tasks (the tiny model's context is 128 characters)."""
    paths = []
    for name, pos, neg in (("zap", "zz zap", "aa cap"), ("rain", "rr rain", "ss sun")):
        task = {
            "name": name,
            "behaviour": f"Is the text about {name}?",
            "coherence": "Is the text fluent?",
            "steering_prompt": f"Write about {name}.",
            "positive": [f"{pos} {i}" for i in range(8)],
            "negative": [f"{neg} {i}" for i in range(8)],
        }
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(task))
        paths.append(str(path))
    return paths


def chaos_run(folder: Path, base_url: str, tasks: list[str], **changes: Any) -> RunConfig:
    return build_run_cfg(
        folder,
        seed=1,
        effects={
            "vectors": {"source": "decoder_rows", "ids": {"start": 0, "stop": N_VECTORS}},
            "vectors_per_batch": PER_BLOCK,
            "lease_s": LEASE_S,
        },
        eval={
            "tasks": tasks,
            "methods": ["CAA", "prompt"],
            "scale_grid": {"start": 0, "stop": 40, "step": 20},
            "samples_per_scale": 4,
            "new_tokens": 6,
            "targeting": False,
            "fgaa_density_max": 1.0,  # the tiny SAE's features are all dense
            "battle": {"per_pair": 0},
            "bootstrap": 20,
            "judge": {
                "kind": "openai",
                "base_url": base_url,
                "concurrency": 8,
                "timeout_s": 1.0,
                "max_retries": 1,
                "max_failed_share": 0.0,  # any failed judgement stops 03: a re-run asks it again
            },
        },
        **changes,
    )


def live_processes(pgids: set[int], marker: str) -> list[str]:
    """Processes (not zombies) in one of ``pgids`` or whose command line names ``marker``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if state != "Z" and (int(pgrp) in pgids or marker in cmd):
            found.append(f"pid {d.name} (group {pgrp}): {cmd[:200]}")
    return found


def workers_of(parent: subprocess.Popen) -> list[int]:
    """The parent's effects workers (they share its process group)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != parent.pid:
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == parent.pid and b"saets_utils.effects.runner" in cmd:
                out.append(int(d.name))
    return out


class Driver:
    """Starts each step in its own process group, kills it where the seeded plan says, restarts."""

    def __init__(self, tmp: Path, rng: random.Random) -> None:
        self.tmp, self.rng = tmp, rng
        self.groups: set[int] = set()
        self.counts: Counter = Counter()
        self.logs: list[Path] = []
        self.history: list[str] = []
        self.t0 = time.monotonic()

    def start(self, params: Path, step: str, restart: bool = False) -> subprocess.Popen:
        log = self.tmp / "logs" / f"{len(self.logs):02d}-{step}.log"
        log.parent.mkdir(exist_ok=True)
        self.logs.append(log)
        with open(log, "w") as f:  # the child keeps its own handle
            p = subprocess.Popen(
                [sys.executable, "-c", STEP, str(params), step, "1" if restart else "0"],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
                start_new_session=True,  # its own process group, which its workers join
            )
        self.groups.add(p.pid)
        return p

    def wait_until(self, p: subprocess.Popen, ready) -> bool:
        """Poll ``ready()`` until it holds (True) or ``p`` has ended (False)."""
        deadline = time.monotonic() + WAIT_S
        while not ready():
            if p.poll() is not None:
                return False
            assert time.monotonic() < deadline, f"no progress: {self.logs[-1].read_text()[-3000:]}"
            time.sleep(0.01)
        return True

    def kill(self, p: subprocess.Popen, kind: str) -> bool:
        """SIGKILL the parent's group, one worker, or the parent alone (its workers live on)."""
        if kind == "group":
            os.killpg(p.pid, signal.SIGKILL)
        elif kind == "worker":
            workers = workers_of(p)
            if not workers:
                return False
            os.kill(self.rng.choice(workers), signal.SIGKILL)
        else:
            os.kill(p.pid, signal.SIGKILL)
        self.counts[f"kill {kind}"] += 1
        return True

    def note(self, event: str) -> None:
        self.history.append(f"{time.monotonic() - self.t0:5.0f} s  {event}")

    def finish(self, p: subprocess.Popen) -> int:
        return p.wait(timeout=WAIT_S)

    def tail(self) -> str:
        return self.logs[-1].read_text(errors="replace")[-3000:]


def effects_files(run: RunConfig) -> dict[str, dict[str, torch.Tensor]]:
    d = run.results_dir
    return {n: load_file(d / n) for n in ("effects.safetensors", "baseline.safetensors", "effects_samples.safetensors")}


@pytest.mark.slow
def test_chaos_kills_restarts_and_judge_faults_end_where_an_undisturbed_run_does(tmp_path, capsys):
    t_start = time.monotonic()
    rng = random.Random(SEED)
    server = ChaosServer(SEED, FAULT_SHARE).start()
    try:
        tasks = write_tasks(tmp_path)
        ref = chaos_run(tmp_path / "undisturbed", server.base_url, tasks)
        run = chaos_run(tmp_path, server.base_url, tasks)
        params = tmp_path / "params" / "tinyrun.yaml"

        # --- the undisturbed run, in this process (one thread, as each worker) -----------------
        from saets_utils.effects.runner import run_effects
        from saets_utils.evaluation.evaluate import evaluate_run
        from saets_utils.models.loading import load_model
        from saets_utils.models.sae_loading import load_sae

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model, sae = load_model(ref.model), load_sae(ref)
            run_effects(ref, model, sae)
            evaluate_run(ref, model, sae, progress=False)
        finally:
            torch.set_num_threads(threads)
        server._seen.clear()
        capsys.readouterr()

        drv = Driver(tmp_path, rng)
        drv.t0 = t_start
        drv.note("the undisturbed run done")
        n_blocks = N_VECTORS // PER_BLOCK
        shards = work_dir(run) / "shards"

        def new_shards(since: float) -> int:
            return sum(1 for p in shards.glob("*.safetensors") if p.stat().st_mtime >= since)

        # --- 01 started with the wrong seed, killed: its plan is then discarded (restart) -------
        wrong = tmp_path / "wrong" / "tinyrun.yaml"  # same run name, so the same results folder
        wrong.parent.mkdir()
        wrong.write_text(yaml.safe_dump({**yaml.safe_load(params.read_text()), "seed": 2}))
        p = drv.start(wrong, "01_effects")
        k = rng.randint(1, n_blocks - 1)
        assert drv.wait_until(p, lambda: new_shards(0) >= k), drv.tail()
        drv.kill(p, "group")
        drv.note(f"01 with the wrong seed: group killed at block {new_shards(0)}")
        drv.finish(p)
        stale = tmp_path / "stale_shards"
        shutil.copytree(shards, stale)
        discarded = Plan.load(work_dir(run) / "plan.safetensors").plan_id

        # --- 01 with the right params, killed at seeded points, resumed until it finishes -------
        def plan_id() -> str | None:
            try:
                return Plan.load(work_dir(run) / "plan.safetensors").plan_id
            except Exception:  # not (yet) there
                return None

        def blocks_done() -> int:
            mine = plan_id()
            return sum(1 for p in shards.glob(f"{mine}-*.safetensors")) if mine not in (None, discarded) else 0

        schedule = [  # per run: (kill, after this many more blocks); then runs without kills
            [("worker", rng.randint(0, 3)), ("group", rng.randint(1, 3))],  # a worker dies, then the whole run
            [("parent", rng.randint(0, 2))],  # the parent alone: its workers live on, orphaned
        ]
        attempts = 0
        while True:
            attempts += 1
            assert attempts <= 8, f"01 did not finish in 8 attempts: {drv.tail()}"
            restart = plan_id() in (None, discarded)  # until the new plan stands
            p = drv.start(params, "01_effects", restart=restart)
            events = []
            for kind, k in schedule.pop(0) if schedule else []:
                start = blocks_done()
                ready = lambda k=k, start=start: blocks_done() >= start + k
                if kind != "group":  # its workers must be running
                    ready = lambda r=ready, p=p: r() and len(workers_of(p)) == 2
                if drv.wait_until(p, ready) and drv.kill(p, kind):
                    events.append(f"{kind} killed at block {blocks_done()}")
                    if kind == "parent":
                        drv.counts["workers orphaned"] += len(workers_of(p))
                else:
                    events.append(f"{kind} not killed (the run ended first)")
            rc = drv.finish(p)
            drv.note(f"01 {'restart' if restart else 'resume'}: {', '.join(events) or 'no kill'}; rc {rc}")
            if rc == 0:
                break
            if not any("killed at" in e for e in events) or (
                rc != -signal.SIGKILL and "vectors unmeasured" not in drv.tail()
            ):
                pytest.fail(f"01 failed, not from a kill: {drv.tail()}")
            with pytest.raises(StaleInputs, match="re-run 01_effects"):
                check_current(run, ("01_effects",), "chaos")  # an interrupted 01: nothing to read
            if plan_id() not in (None, discarded) and not drv.counts["stale shards planted"]:
                # workers of the discarded plan, still running, write their blocks late
                for s in sorted(stale.iterdir())[:2]:
                    shutil.copy(s, shards / f"{s.stem}.late.safetensors")
                    drv.counts["stale shards planted"] += 1
        drv.counts["01 attempts"] = attempts + 1  # and the wrong-seed one

        # --- 03 against the faulting server: killed once, then re-run until it finishes --------
        server.chaos = True
        attempts, failures = 0, []
        kill_at = server.n_requests + rng.randint(5, 40)  # after this many requests of 03
        while True:
            attempts += 1
            assert attempts <= 8, f"03 did not finish in 8 attempts: {drv.tail()}"
            p = drv.start(params, "03_eval")
            if attempts == 1 and drv.wait_until(p, lambda: server.n_requests >= kill_at):
                drv.kill(p, "group")
            rc = drv.finish(p)
            drv.note(f"03: rc {rc}")
            if rc == 0:
                break
            if rc == 3:  # stopped on failed judgements, each one counted in its report
                m = re.search(r"(\d+) of (\d+) judgements failed", drv.tail())
                assert m, drv.tail()
                failures.append((int(m.group(1)), int(m.group(2))))
            else:
                assert rc == -signal.SIGKILL and attempts == 1, drv.tail()
        drv.counts["03 attempts"] = attempts
        server.chaos = False

        # --- no process left: not the workers of a killed parent, not a hung one ---------------
        deadline = time.monotonic() + 60
        while (left := live_processes(drv.groups, str(tmp_path))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, "left running:\n" + "\n".join(left)
        drv.note("no process left")
    finally:
        server.stop()
        if "drv" in locals():
            for line in live_processes(set(), str(tmp_path)):  # after a failed assertion: none outlives it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[1]), signal.SIGKILL)
            with capsys.disabled():  # what happened when, also when an assertion failed
                print("\n  " + "\n  ".join(drv.history))

    # --- the effects: those of the undisturbed run, no shard of the discarded plan merged --------
    got, want = effects_files(run), effects_files(ref)
    for name in want:
        assert want[name].keys() == got[name].keys()
        for k in want[name]:
            torch.testing.assert_close(got[name][k], want[name][k], rtol=0, atol=0, equal_nan=True, msg=f"{name} {k}")
    pd.testing.assert_frame_equal(
        pd.read_csv(run.results_dir / "effects_table.csv").drop(columns="seconds"),
        pd.read_csv(ref.results_dir / "effects_table.csv").drop(columns="seconds"),
    )
    late = sorted(shards.glob("*.late.safetensors"))
    assert late, "the discarded plan's shards were not there at the merge"
    for s in late:  # they hold other numbers for vectors the merge has: taking them would show
        t = load_file(s)
        rows = [got["effects.safetensors"]["vector_ids"].tolist().index(v) for v in t["vector_ids"].tolist()]
        assert not torch.equal(t["effects"], got["effects.safetensors"]["effects"][rows])
    assert Plan.load(work_dir(run) / "plan.safetensors").plan_id != discarded

    # --- 03: the same texts and scores; every judged text scored, or counted where it failed ----
    cols = ["task", "method", "scale", "sample", "text", "behaviour", "coherence"]
    samples = pd.read_json(run.results_dir / "eval" / "samples.jsonl", lines=True)
    pd.testing.assert_frame_equal(
        samples[cols], pd.read_json(ref.results_dir / "eval" / "samples.jsonl", lines=True)[cols]
    )
    for name in ("summary.csv", "by_scale.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(run.results_dir / "eval" / name), pd.read_csv(ref.results_dir / "eval" / name)
        )
    stats = json.loads((run.results_dir / "eval" / "judge_stats.json").read_text())
    assert samples[["behaviour", "coherence"]].notna().all().all() and stats["n_errors"] == 0
    assert stats["n_requests"] == 2 * len(samples)
    assert all(0 < n_failed <= n == stats["n_requests"] for n_failed, n in failures), failures
    assert failures, "no 03 run stopped on failed judgements: raise FAULT_SHARE"
    assert set(server.faults) == set(FAULTS), server.faults
    check_current(run, ("01_effects", "03_eval"), "chaos")  # both stamped, on their final files

    took = time.monotonic() - t_start
    with capsys.disabled():
        print(
            f"\nchaos (seed {SEED}): kills survived {sum(v for k, v in drv.counts.items() if k.startswith('kill '))} "
            f"({', '.join(f'{k[5:]} {v}' for k, v in sorted(drv.counts.items()) if k.startswith('kill '))}); "
            f"01 attempts {drv.counts['01 attempts']}, workers orphaned {drv.counts['workers orphaned']}, "
            f"stale shards planted {drv.counts['stale shards planted']} "
            f"(none merged); 03 attempts {drv.counts['03 attempts']}; judge faults injected "
            f"{sum(server.faults.values())} ({', '.join(f'{k} {v}' for k, v in sorted(server.faults.items()))}) "
            f"in {server.n_requests} requests; texts accounted {len(samples)} ({stats['n_requests']} judgements, all "
            f"scored; failed on the way and counted: {[n for n, _ in failures]}); {took:.0f} s"
        )


# --- what the chaos test found, pinned fast ---------------------------------------------------


def _attempt(run: RunConfig, model, sae) -> Plan:
    from saets_utils.effects.runner import prepare_plan
    from saets_utils.io_utils import atomic_write_json

    plan = prepare_plan(run, model, sae)
    atomic_write_json(run.paths.work.attempt("A"), {"plan_id": plan.plan_id})
    return plan


def test_a_worker_whose_run_is_gone_stops_at_its_next_block(tmp_path, tiny_model, tiny_sae, monkeypatch, capsys):
    """Its parent killed alone (an OOM kill, a crashed kernel), a worker subprocess notices it was
    orphaned and stops after the block it is measuring; in-process work (no parent to lose) goes on."""
    from saets_utils.effects import runner

    run = tiny_run(tmp_path, vectors=FIRST_8, lease_s=LEASE_S)
    _attempt(run, tiny_model, tiny_sae)
    parent = {"pid": os.getppid()}
    monkeypatch.setattr(runner.os, "getppid", lambda: parent["pid"])
    real = runner.compute_block

    def block_then_orphaned(*args, **kwargs):
        real(*args, **kwargs)
        parent["pid"] = 1  # the parent died during this block: init adopted the worker

    monkeypatch.setattr(runner, "compute_block", block_then_orphaned)
    runner.work_loop(run, "A", "w-sub", model=tiny_model, sae=tiny_sae, stop_with_parent=True)
    assert len(shard_files(run)) == 1  # the block under way was finished and saved, no other begun
    assert "effects worker w-sub: its run is gone (its parent process died); stopping" in capsys.readouterr().out
    runner.work_loop(run, "A", "w-main", model=tiny_model, sae=tiny_sae)  # in-process: carries on
    assert len(shard_files(run)) == 4


CLAIM = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from saets_utils.effects.claims import try_claim
    assert try_claim(Path(sys.argv[1]), sys.argv[2], "B", "w-other", lease_s=600.0).state == "claimed"
    print("claimed", flush=True)
    time.sleep(120)
    """
)


def test_a_waiting_worker_takes_a_freed_block_within_seconds(tmp_path, tiny_model, tiny_sae):
    """A block held by another live worker is looked at again every few seconds: once its holder
    dies, the waiting worker takes it without sleeping out a heartbeat interval (100 s here)."""
    from saets_utils.effects.plan import block_key
    from saets_utils.effects.runner import work_loop

    run = tiny_run(tmp_path, vectors=FIRST_8, lease_s=LEASE_S)
    plan = _attempt(run, tiny_model, tiny_sae)
    holder = subprocess.Popen(
        [sys.executable, "-c", CLAIM, str(run.paths.work.claims), block_key(plan, PER_BLOCK, 0)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
    taken_after: list[float] = []

    def kill_once_the_rest_is_done() -> None:
        while len(shard_files(run)) < 3:
            time.sleep(0.05)
        time.sleep(0.5)  # the worker is waiting on block 0 now
        holder.kill()
        t0 = time.monotonic()
        while not (run.paths.work.claims / f"{block_key(plan, PER_BLOCK, 0)}.1").exists():  # its take-over
            time.sleep(0.05)
        taken_after.append(time.monotonic() - t0)

    killer = threading.Thread(target=kill_once_the_rest_is_done, daemon=True)
    killer.start()
    try:
        work_loop(run, "A", "w-me", model=tiny_model, sae=tiny_sae)
    finally:
        holder.kill()
        holder.wait()
    assert len(shard_files(run)) == 4
    assert taken_after[0] < 15, f"block 0 taken {taken_after[0]:.0f} s after its holder died"
