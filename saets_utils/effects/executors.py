"""Where notebook 01's workers run: subprocesses on this machine, or submitit jobs (Slurm).

Either way a worker is ``python -m saets_utils.effects.runner``'s :func:`work_loop` on one device,
claiming blocks from the run's folder (which must be on a filesystem all workers share); the
pools here only start, watch and stop them. The runner's parent loop treats both alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import submitit
import torch

from saets_utils.config import ConfigError, RunConfig
from saets_utils.effects.claims import expire_claims_of
from saets_utils.effects.plan import Plan, done_ids
from saets_utils.paths import WorkPaths


class WorkerPool(Protocol):
    """Started workers by name: which ended (and how), and stopping them."""

    workers: list[str]

    def finished(self) -> dict[str, str | None]:
        """Workers that ended since the last call: name -> error text (None: exited cleanly)."""
        ...

    def kill(self, worker: str) -> None: ...

    def stop(self) -> None:
        """Stop every worker still running (the parent is leaving)."""
        ...


def worker_command(work: Path, device: str, attempt: str, worker: str, *, threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "saets_utils.effects.runner",
        "--work",
        str(work),
        "--device",
        device,
        "--attempt",
        attempt,
        "--worker",
        worker,
        "--threads",
        str(threads),
    ]


class LocalPool:
    """One worker subprocess per device of this machine, logs in ``<work>/logs/<worker>.log``."""

    def __init__(self, work: Path, attempt: str, devices: Sequence[str], threads: int = 1) -> None:
        WorkPaths(work).logs.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.workers = [f"{attempt}-w{i}" for i in range(len(devices))]
        self.devices = dict(zip(self.workers, devices))
        self.procs: dict[str, subprocess.Popen] = {}
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        for w, d in self.devices.items():
            with open(self.log(w), "w") as log:  # the child keeps its own handle
                cmd = worker_command(work, d, attempt, w, threads=threads)
                self.procs[w] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._reported: set[str] = set()

    def log(self, worker: str) -> Path:
        return WorkPaths(self.work).log(worker)

    def finished(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for w, p in self.procs.items():
            rc = p.poll()
            if rc is None or w in self._reported:
                continue
            self._reported.add(w)
            tail = self.log(w).read_text(errors="replace")[-2000:] if self.log(w).is_file() else ""
            out[w] = None if rc == 0 else f"worker {w} ({self.devices[w]}) exited with code {rc}:\n{tail}"
        return out

    def kill(self, worker: str) -> None:
        p = self.procs[worker]
        if p.poll() is None:
            p.kill()
            p.wait(timeout=60)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for w, p in self.procs.items():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill(w)


def slurm_parameters(run: RunConfig) -> dict[str, Any]:
    """submitit parameters for ``run.effects.slurm``: one job per array task, ``gpus_per_task`` GPUs each."""
    s = run.effects.slurm
    params: dict[str, Any] = {
        "name": f"saets-01-{run.name}",
        "timeout_min": s.time_min,
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": s.gpus_per_task,
        "slurm_array_parallelism": s.tasks,
        "slurm_additional_parameters": dict(s.sbatch),
    }
    if s.partition:
        params["slurm_partition"] = s.partition
    if s.account:
        params["slurm_account"] = s.account
    if s.cpus_per_task:
        params["cpus_per_task"] = s.cpus_per_task
    return params


def slurm_executor(run: RunConfig, folder: Path) -> Any:
    """A submitit Slurm executor for ``run.effects.slurm`` (logs in ``folder``)."""
    try:
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    except RuntimeError as e:  # no srun here
        raise ConfigError(
            f"effects.executor 'slurm' needs Slurm on this machine ({e}); run from a node of the cluster, "
            "or use effects.executor 'local'"
        ) from None
    ex.update_parameters(**slurm_parameters(run))
    return ex


class SubmititPool:
    """``tasks`` jobs of ``task(work, attempt, worker, gpus_per_task, threads)`` submitted as one batch
    (a Slurm job array) on a submitit ``executor`` (Slurm, or ``submitit.LocalExecutor`` in tests)."""

    def __init__(
        self,
        executor: Any,
        task: Callable[..., None],
        work: Path,
        attempt: str,
        *,
        tasks: int,
        gpus_per_task: int,
        threads: int = 1,
    ):
        self.workers = [f"{attempt}-s{i}" for i in range(tasks)]
        with executor.batch():
            jobs = [executor.submit(task, str(work), attempt, w, gpus_per_task, threads) for w in self.workers]
        self.jobs = dict(zip(self.workers, jobs))
        self._reported: set[str] = set()

    def finished(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for w, job in self.jobs.items():
            if w in self._reported or not job.done():
                continue
            self._reported.add(w)
            try:
                job.result()
                out[w] = None
            except Exception as e:  # the job's own error, or submitit's "job failed / was killed"
                out[w] = f"worker {w} (job {job.job_id}) failed:\n{str(e)[-2000:]}"
        return out

    def kill(self, worker: str) -> None:
        self.jobs[worker].cancel(check=False)

    def stop(self) -> None:
        for w, job in self.jobs.items():
            if not job.done():
                self.kill(w)


def available_devices(gpus: int, cpu_workers: int = 0) -> list[str]:
    """``cuda:0..gpus-1`` (error if fewer exist), or ``cpu_workers`` CPU workers; [] = in-process."""
    if gpus < 0 or cpu_workers < 0:
        raise ConfigError("gpus and cpu_workers must be >= 0")
    if gpus and cpu_workers:
        raise ConfigError(f"gpus={gpus} and cpu_workers={cpu_workers}: choose GPU workers or CPU workers, not both")
    if cpu_workers:
        return ["cpu"] * cpu_workers
    n = torch.cuda.device_count()
    if gpus > n:
        seen = "no CUDA device is" if n == 0 else f"only {n} CUDA device(s) are"
        raise ConfigError(
            f"gpus={gpus} but {seen} visible; use gpus <= {n}, or cpu_workers=N for N CPU worker subprocesses"
        )
    return [f"cuda:{i}" for i in range(gpus)]


def watch(run: RunConfig, plan: Plan, pool: Any, bar, *, poll_s: float) -> list[str]:
    """Follow the workers until all have ended: merged progress from the shards, a worker silent for
    a lease is killed as hung, a dead worker's claims are released at once. Stops them on exit."""
    wd = run.paths.work
    lease = run.effects.lease_s
    failures: list[str] = []
    seen: dict[Path, tuple[str, list[int]]] = {}
    running = set(pool.workers)

    def ended(w: str, err: str | None) -> None:
        running.discard(w)
        expire_claims_of(wd.claims, w)
        if err:
            failures.append(err)
            bar.write(f"effects: {err.splitlines()[0]}; others continue")

    try:
        while running:
            time.sleep(poll_s)
            bar.update(len(done_ids(run, plan, seen)) - bar.n)
            for w, err in pool.finished().items():
                ended(w, err)
            now = time.time()
            for w in sorted(running):
                beat = wd.heartbeat(w)
                if beat.is_file() and beat.stat().st_mtime < now - lease:
                    pool.kill(w)
                    ended(w, f"worker {w} sent no heartbeat for {lease:g} s (hung): killed")
    finally:
        pool.stop()
    bar.update(len(done_ids(run, plan, seen)) - bar.n)
    return failures
