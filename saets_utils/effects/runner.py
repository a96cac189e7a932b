"""Run notebook 01's effects measurement: plan, workers, durable shards, resume, merge.

Layout under ``results/<run>/effects_work/``: ``run_config.json`` and ``plan.safetensors`` (vector
ids, unit vectors, loss chunks, baseline, fingerprint, plan id), ``shards/*.safetensors`` (one per
finished block of vectors, written atomically, tagged with the plan id), ``claims/`` (leases on
blocks, see :mod:`saets_utils.effects.claims`), ``workers/`` (heartbeats), ``logs/``. A re-run with
the same settings skips every vector already in a shard of the current plan; the merged result
does not depend on how vectors were grouped, since every rollout is seeded by its own vector id.

Blocks are a fixed partition of the plan (``vectors_per_batch`` rows each), so workers of any run
and any machine share the claims: a block is computed by one worker at a time, a dead worker's block
is re-claimed when its lease expires, and a block that fails ``max_failures`` times in one run is
reported and skipped (the next run retries it). One parent run per folder at a time (a lease lock).

Workers: ``gpus = N`` starts N subprocesses on ``cuda:0..N-1``; ``cpu_workers = N`` starts N CPU
subprocesses (testable without a GPU); neither runs in-process; ``effects.executor: slurm`` submits
``effects.slurm.tasks`` submitit jobs instead (see docs/slurm.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import torch
from torch import Tensor

from saets_utils.config import ConfigError, RunConfig
from saets_utils.effects.calibration import (
    Calibration,
    SearchStart,
    calibrate,
    check_loss_target,
    fit_gradient_start,
    resid_at_hook,
    scale_hint,
    steered_losses,
)
from saets_utils.effects.claims import (
    EXPIRED,
    Heartbeat,
    fail_claim,
    heartbeat_interval,
    identity,
    read_claims,
    try_claim,
)
from saets_utils.effects.executors import available_devices, watch, worker_command
from saets_utils.effects.measure import KEEP_SAMPLES, RolloutSpec, measure_baseline, measure_effects, prompt_token_ids
from saets_utils.effects.memory import gradient_rows, loss_rows, rollout_rows
from saets_utils.effects.plan import (
    Plan,
    base_fingerprint,
    block_key,
    done_ids,
    fingerprint,
    grow_plan,
    input_digests,
    plan_blocks,
    todo_blocks,
    work_dir,
)
from saets_utils.io_utils import atomic_save_safetensors, atomic_write_json, remove_stale_tmp
from saets_utils.paths import RunPaths, WorkPaths
from saets_utils.steering.engine import resolve_engine


def rollout_spec(run: RunConfig, model, bos: int) -> RolloutSpec:
    e = run.effects
    return RolloutSpec(
        prompts=prompt_token_ids(model, e.prompts, bos, e.total_tokens),
        samples_per_prompt=e.samples_per_prompt,
        total_tokens=e.total_tokens,
        sampling=e.sampling,
        include_first_position=e.include_first_position,
        common_random_numbers=e.common_random_numbers,
        max_resid_norm=e.max_resid_norm,
        engine=resolve_engine(e.engine, model, run.sae.hook_name),
    )


def prepare_plan(run: RunConfig, model, sae, restart: bool = False) -> Plan:
    """Load the run's plan, or build it (vectors, loss chunks, unsteered baseline) once and save it.

    A saved plan that differs only in its vector selection, and keeps every vector it measured, grows
    to the new selection (:func:`~saets_utils.effects.plan.grow_plan`: only the added vectors are then
    measured). Fails if an existing plan was made with other settings or inputs (a changed SAE or
    vectors file), unless ``restart`` (which deletes the old work folder, also when its plan is unreadable).
    """
    from saets_utils.effects.vector_sources import build_vectors
    from saets_utils.models.loading import bos_id, cut_loss_tokens
    from saets_utils.models.sae_loading import load_sae_from

    wd = work_dir(run)
    digests = input_digests(run, sae)
    fp = fingerprint(run, digests)
    plan_path = run.paths.work.plan
    if plan_path.is_file() and not restart:
        try:
            plan = Plan.load(plan_path)
        except Exception as e:  # a truncated or foreign file: only restart can replace it
            raise ConfigError(f"{plan_path} is unreadable ({e}); re-run with restart=True to rebuild it") from None
        if plan.fingerprint == fp:
            return plan
        ids, vectors = build_vectors(run, sae, model.cfg.d_model, lambda c: load_sae_from(c, run, "cpu"))
        grown, why = grow_plan(plan, run, ids=ids, vectors=vectors, digests=digests)
        if grown is not None:
            grown.save(plan_path)
            added = len(grown.vector_ids) - len(plan.vector_ids)
            print(f"effects: the run grows by {added} vectors to {len(grown.vector_ids)}; the measured ones are kept")
            return grown
        raise ConfigError(
            f"{wd} holds work made with other effects settings or inputs (fingerprint {plan.fingerprint} "
            f"!= {fp}; inputs then {plan.inputs}, now {digests}): {why}; re-run with restart=True to "
            "discard it, or use another params file"
        )
    if restart and wd.exists():
        # workers of an older run may still write here: their shards carry the old plan id and are ignored
        shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True, exist_ok=True)
    ids, vectors = build_vectors(run, sae, model.cfg.d_model, lambda c: load_sae_from(c, run, "cpu"))
    bos = bos_id(model, run.model)
    spec = rollout_spec(run, model, bos)
    # Document starts or the reference's concatenated rows, as effects.loss_chunking says.
    loss_tokens = cut_loss_tokens(run, model, bos)
    hook = run.sae.hook_name
    resid = resid_at_hook(model, hook, loss_tokens)
    unsteered = float(steered_losses(model, hook, loss_tokens, resid, torch.zeros(1, model.cfg.d_model))[0])
    check_loss_target(run.effects.loss_target, unsteered, run.effects.scale_grid.values())  # before any vector
    base = measure_baseline(
        model,
        sae,
        hook,
        spec,
        multiplier=run.effects.baseline_multiplier,
        seed=run.seed,
        max_rows=run.effects.vectors_per_batch * run.effects.samples_per_prompt,
    )
    plan = Plan(
        ids,
        vectors,
        loss_tokens,
        base.mean,
        base.density,
        base.half_means,
        unsteered,
        base.n,
        fp,
        inputs=digests,
        base_fingerprint=base_fingerprint(run, digests),
    )
    plan.save(plan_path)
    return plan


@dataclass
class BlockEffects:
    """A block of vectors calibrated and measured: the ``calibration``, ``effects [v, d_sae]`` and
    ``halves [v, 2, d_sae]`` (NaN for vectors that got no scale) and ``sample_tokens [v, k, total_tokens]``
    (zeros for those)."""

    calibration: Calibration
    effects: Tensor
    halves: Tensor
    sample_tokens: Tensor


HINT_VECTORS = 4


def plan_scale_hint(run: RunConfig, model, sae, plan: Plan, *, resid: Tensor) -> SearchStart | None:
    """The secant calibration's start for every block of the run: the reference sweep's median scale
    over the SAE's first :data:`HINT_VECTORS` decoder rows (unit norm). It depends on the run's SAE
    and loss chunks only, not on which vectors a plan, block, worker or resume measures, so a vector
    gets the same scale in every run of the same settings. None with the sweep method."""
    e = run.effects
    if e.calibration.method == "sweep":
        return None
    rows = sae.W_dec[:HINT_VECTORS].detach().float()
    vecs = (rows / rows.norm(dim=-1, keepdim=True)).to(model.cfg.device)
    return scale_hint(
        model,
        run.sae.hook_name,
        plan.loss_tokens,
        resid,
        vecs,
        grid=e.scale_grid.values(),
        target=e.loss_target,
        unsteered_loss=plan.unsteered_loss,
    )


@dataclass(frozen=True)
class BlockStarts:
    """Where 01's calibration starts: ``start`` for every vector, except the plan rows of the pilot,
    whose calibration is already done (``pilot``, its vectors in the order of ``pilot_rows``)."""

    start: SearchStart | None
    pilot_rows: tuple[int, ...] = ()
    pilot: Calibration | None = None

    def pilot_for(self, rows: Sequence[int]) -> Calibration | None:
        """The pilot's calibration of the plan ``rows`` when all of them are pilot rows, else None."""
        if self.pilot is None or not rows or not set(rows) <= set(self.pilot_rows):
            return None
        return self.pilot.rows([self.pilot_rows.index(r) for r in rows])


def plan_block_starts(
    run: RunConfig, model, sae, plan: Plan, *, resid: Tensor, hint: SearchStart | None
) -> BlockStarts:
    """``effects.calibration.start``: ``hint``, every vector starts at ``hint``; ``gradient``, the
    plan's first block (the pilot) is calibrated from ``hint``, and every other vector starts at the
    scale its loss slope predicts (:func:`~saets_utils.effects.calibration.gradient_start`, the level
    fitted to the pilot). Every worker and resume computes the same pilot (one block's calibration
    and one backward pass), so a vector's scale does not depend on who measures it."""
    e = run.effects
    if e.calibration.start != "gradient" or hint is None:
        return BlockStarts(hint)
    rows = plan_blocks(plan, e.vectors_per_batch)[0]
    vecs = plan.vectors[rows].to(model.cfg.device)
    pilot = plan_calibration(run, model, plan, resid=resid, vectors=vecs, start=hint)
    start = fit_gradient_start(
        model,
        run.sae.hook_name,
        plan.loss_tokens,
        resid,
        pilot=pilot,
        vectors=vecs,
        hint=hint,
        target=e.loss_target,
        unsteered_loss=plan.unsteered_loss,
        max_rows=gradient_rows(model, plan.loss_tokens.shape[1]),
    )
    return BlockStarts(start or hint, tuple(rows), pilot)


def plan_calibration(
    run: RunConfig, model, plan: Plan, *, resid: Tensor, vectors: Tensor, start: SearchStart | None
) -> Calibration:
    """01's calibration of unit ``vectors [v, d_model]`` to the run's loss target on the plan's loss
    chunks (``resid``: their activations at the hook), the search starting at ``start``."""
    e = run.effects
    return calibrate(
        model,
        run.sae.hook_name,
        plan.loss_tokens,
        resid,
        vectors,
        cfg=e.calibration,
        grid=e.scale_grid.values(),
        target=e.loss_target,
        unsteered_loss=plan.unsteered_loss,
        start=start,
        max_rows=loss_rows(model, plan.loss_tokens.shape[1]),
    )


def calibrate_and_measure(
    run: RunConfig,
    model,
    sae,
    plan: Plan,
    *,
    resid: Tensor,
    spec: RolloutSpec,
    vectors: Tensor,
    vector_ids: Sequence[int],
    keep_samples: int = KEEP_SAMPLES,
    hint: SearchStart | None = None,
    calibration: Calibration | None = None,
) -> BlockEffects:
    """01's recipe for unit ``vectors [v, d_model]`` (on the model's device): calibrate a scale each to
    the run's loss target on the plan's loss chunks (``resid``: their activations at the hook), then
    measure the effects of those that got one against the plan's baseline. Targeting uses it too.
    ``hint``: the secant calibration's start (:func:`plan_scale_hint`, or a
    :class:`BlockStarts`' start); ``calibration``: these vectors' calibration, already done (the
    pilot's), used instead of calibrating."""
    hook = run.sae.hook_name
    e = run.effects
    cal = calibration or plan_calibration(run, model, plan, resid=resid, vectors=vectors, start=hint)
    ok = torch.isfinite(cal.scales)
    v, d_sae = vectors.shape[0], plan.baseline_mean.shape[0]
    effects = torch.full((v, d_sae), float("nan"))
    halves = torch.full((v, 2, d_sae), float("nan"))
    samples = torch.zeros((v, keep_samples, e.total_tokens), dtype=torch.int64)
    if ok.any():
        blk = measure_effects(
            model,
            sae,
            hook,
            spec,
            vectors=vectors[ok],
            vector_ids=[vector_ids[i] for i in ok.nonzero()[:, 0].tolist()],
            scales=cal.scales[ok].to(vectors.device),
            baseline_mean=plan.baseline_mean,
            seed=run.seed,
            keep_samples=keep_samples,
            max_rows=rollout_rows(model, e.total_tokens),
            baseline_halves=plan.baseline_halves,
        )
        effects[ok] = blk.effects.float().cpu()
        halves[ok] = blk.halves.float().cpu()
        samples[ok, : blk.sample_tokens.shape[1]] = blk.sample_tokens
    return BlockEffects(cal, effects, halves, samples)


def compute_block(
    run: RunConfig,
    model,
    sae,
    plan: Plan,
    *,
    resid: Tensor,
    spec: RolloutSpec,
    rows: list[int],
    shard_path: Path,
    tags: dict[str, str] | None = None,
    hint: SearchStart | None = None,
    starts: BlockStarts | None = None,
) -> Calibration:
    """Calibrate scales and measure effects for plan rows ``rows``; write one shard atomically,
    tagged with the plan's id and fingerprint (and ``tags``, e.g. attempt and worker). ``hint``:
    the secant calibration's start (:func:`plan_scale_hint`); ``starts`` (:func:`plan_block_starts`)
    replaces it, and gives the pilot's rows their calibration."""
    t0 = time.perf_counter()
    ids = plan.vector_ids[rows]
    res = calibrate_and_measure(
        run,
        model,
        sae,
        plan,
        resid=resid,
        spec=spec,
        vectors=plan.vectors[rows].to(model.cfg.device),
        vector_ids=ids.tolist(),
        hint=hint if starts is None else starts.start,
        calibration=None if starts is None else starts.pilot_for(rows),
    )
    cal = res.calibration
    seconds = (time.perf_counter() - t0) / len(rows)
    atomic_save_safetensors(
        {
            "vector_ids": ids.contiguous(),
            "effects": res.effects,
            "effect_halves": res.halves,
            "scales": cal.scales,
            "losses": cal.losses.float(),
            "sample_tokens": res.sample_tokens,
        },
        shard_path,
        {
            "status": json.dumps(cal.status),
            "seconds": repr(seconds),
            "target": repr(cal.target),
            "plan_id": plan.plan_id,
            "fingerprint": plan.fingerprint,
            **(tags or {}),
        },
    )
    return cal


# A worker waiting on blocks that others hold looks again this often (or each heartbeat, if sooner):
# a block freed by its holder's death or end is taken in seconds, not after lease_s / 6.
WAIT_POLL_S = 2.0


def work_loop(
    run: RunConfig,
    attempt: str,
    worker: str,
    *,
    device: str = "cpu",
    model=None,
    sae=None,
    progress=None,
    stop_with_parent: bool = False,
) -> None:
    """Claim and measure blocks of the plan until each is done or given up (loading the model and SAE
    on ``device`` unless given). A block that raises is recorded as a failure of this attempt and
    retried, up to ``effects.max_failures``; a block another live worker holds is waited for.
    ``stop_with_parent`` (a worker subprocess): once the process that started it is gone (its run was
    killed), it stops after the block under way instead of working on, orphaned."""
    from saets_utils.models.loading import bos_id, load_model
    from saets_utils.models.sae_loading import load_sae

    parent = os.getppid() if stop_with_parent else None

    def orphaned() -> bool:  # the parent died: init (or a subreaper) adopted this process
        return parent is not None and os.getppid() != parent

    e = run.effects
    wd = run.paths.work
    want = json.loads(wd.attempt(attempt).read_text())
    beat_file = wd.heartbeat(worker)
    state = {"attempt": attempt, "device": device, **identity()}
    atomic_write_json(beat_file, {**state, "state": "loading"})
    with Heartbeat(heartbeat_interval(e.lease_s), beat_file) as beat:
        plan = Plan.load(wd.plan)
        if plan.plan_id != want["plan_id"]:
            print(f"effects worker {worker}: the plan was replaced (restart); nothing to do", flush=True)
            return
        model = model if model is not None else load_model(run.model, device)
        sae = sae if sae is not None else load_sae(run, device)
        if plan.inputs.get("sae") not in (None, input_digests(run, sae)["sae"]):
            raise RuntimeError(f"the SAE loaded on {device} differs from the one the plan was built with")
        spec = rollout_spec(run, model, bos_id(model, run.model))
        resid = resid_at_hook(model, run.sae.hook_name, plan.loss_tokens)
        hint = plan_scale_hint(run, model, sae, plan, resid=resid)  # the same for every worker and resume
        starts = plan_block_starts(run, model, sae, plan, resid=resid, hint=hint)  # so are these
        wd.shards.mkdir(exist_ok=True)
        ids = plan.vector_ids.tolist()
        atomic_write_json(beat_file, {**state, "state": "working"})
        seen: dict[Path, tuple[str, list[int]]] = {}
        while True:
            waiting = retry = False
            done = done_ids(run, plan, seen)
            for k, rows in enumerate(plan_blocks(plan, e.vectors_per_batch)):
                if orphaned():
                    break
                if all(ids[r] in done for r in rows):
                    continue
                key = block_key(plan, e.vectors_per_batch, k)
                got = try_claim(wd.claims, key, attempt, worker, lease_s=e.lease_s, max_failures=e.max_failures)
                waiting |= got.state == "held"
                if got.path is None:
                    continue
                beat.add(got.path)
                try:
                    done = done_ids(run, plan, seen)  # another worker may have finished it meanwhile
                    left = [r for r in rows if ids[r] not in done]
                    if left:
                        tags = {"attempt": attempt, "worker": worker}
                        compute_block(
                            run,
                            model,
                            sae,
                            plan,
                            resid=resid,
                            spec=spec,
                            rows=left,
                            shard_path=wd.shard(key, worker),
                            tags=tags,
                            starts=starts,
                        )
                        if progress is not None:
                            progress.update(len(left))
                    beat.discard(got.path)
                except KeyboardInterrupt:  # Ctrl-C in the notebook: a re-run in this kernel takes it at once
                    beat.discard(got.path)
                    os.utime(got.path, EXPIRED)
                    raise
                except Exception:
                    beat.discard(got.path)
                    err = traceback.format_exc()
                    print(f"effects worker {worker}: block {k} failed\n{err}", flush=True)
                    fail_claim(got.path, err)
                    retry = True  # until this attempt gives it up
            if orphaned():
                print(f"effects worker {worker}: its run is gone (its parent process died); stopping", flush=True)
                break
            if waiting:
                time.sleep(min(beat.interval_s, WAIT_POLL_S))
            elif not retry:
                break
    beat_file.unlink(missing_ok=True)  # finished: its silence from now on is not a hang


LOCK = RunPaths.effects_lock.rel  # in results/<run>/, outside the work folder that restart deletes


@contextmanager
def run_lock(run: RunConfig) -> Iterator[Path]:
    """Hold the run's lock (a lease renewed while held) or fail naming the live holder: two parents
    on one folder would each start workers on the same devices. A lock whose holder on this host is
    dead (killed, OOM, a crashed kernel) is taken over at once (:meth:`Claim.dead_holder`)."""
    folder = run.paths.effects_lock
    me = identity()
    got = try_claim(folder, "run", "", f"{me['host']}:{me['pid']}", lease_s=run.effects.lease_s)
    if got.path is None:
        h = read_claims(folder, "run")[-1]
        raise ConfigError(
            f"another run is measuring effects in {work_dir(run)} (pid {h.pid} on {h.host}, alive "
            f"{time.time() - h.mtime:.0f} s ago); wait for it to finish or stop it (its lock then expires "
            f"after effects.lease_s = {run.effects.lease_s:g} s)"
        )
    try:
        with Heartbeat(heartbeat_interval(run.effects.lease_s), got.path):
            yield got.path
    finally:
        os.utime(got.path, EXPIRED)


def _given_up(run: RunConfig, plan: Plan, attempt: str) -> list[str]:
    """Blocks this attempt gave up (``max_failures`` failures), with their vector ids and last error."""
    e = run.effects
    done = done_ids(run, plan)
    ids = plan.vector_ids.tolist()
    out = []
    for k, rows in enumerate(plan_blocks(plan, e.vectors_per_batch)):
        mine = [
            c
            for c in read_claims(run.paths.work.claims, block_key(plan, e.vectors_per_batch, k))
            if c.attempt == attempt
        ]
        if len(mine) >= e.max_failures and any(ids[r] not in done for r in rows):
            last = mine[-1].error or "its worker stopped renewing the lease (killed, hung or preempted)"
            out.append(
                f"block {k} (vector ids {[ids[r] for r in rows]}) failed {len(mine)} times, skipped; "
                f"last error:\n{last[-1500:]}"
            )
    return out


def run_effects(
    run: RunConfig,
    model,
    sae,
    *,
    gpus: int = 0,
    restart: bool = False,
    poll_s: float = 0.5,
    cpu_workers: int = 0,
    executor: Any = None,
) -> Path:
    """Measure all planned vectors (resuming), then merge; returns ``results/<run>/effects.safetensors``.

    ``model``/``sae`` (already loaded) build the plan and, without workers, do the work in-process.
    Workers: ``gpus`` or ``cpu_workers`` subprocesses here, or with ``effects.executor: slurm`` the
    submitit jobs of ``effects.slurm`` (``executor``: another submitit executor, e.g. a LocalExecutor).
    Raises after reporting failed workers and given-up blocks if any vector is left (re-run to resume).
    """
    from saets_utils.effects.store import merge_effects
    from saets_utils.progress import progress as progress_bar

    e = run.effects
    slurm = e.executor == "slurm"
    if slurm and (gpus or cpu_workers):
        raise ConfigError(
            "gpus/cpu_workers place workers on this machine; with effects.executor 'slurm' set "
            "effects.slurm.tasks and effects.slurm.gpus_per_task instead"
        )
    devices = [] if slurm else available_devices(gpus, cpu_workers)
    wd = work_dir(run)
    if slurm and executor is None:  # fails here, before any work, where Slurm is missing
        from saets_utils.effects.executors import slurm_executor

        s = run.effects.slurm
        executor = slurm_executor(run, Path(s.log_folder) if s.log_folder else run.paths.work.slurm)
    with run_lock(run):
        plan = prepare_plan(run, model, sae, restart)
        remove_stale_tmp(wd, older_than_s=e.lease_s)  # left by writers killed mid-write
        remove_stale_tmp(run.results_dir, older_than_s=e.lease_s, recursive=False)
        attempt = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
        atomic_write_json(run.paths.work.attempt(attempt), {"plan_id": plan.plan_id, "inputs": plan.inputs})
        atomic_write_json(run.paths.work.run_config, json.loads(run.model_dump_json()))
        total = len(plan.vector_ids)
        todo = sum(len(b) for b in todo_blocks(run, plan))
        bar = progress_bar(total=total, initial=total - todo, desc="effects (vectors)", unit="vec")
        failures: list[str] = []
        if todo and not slurm and not devices:
            work_loop(run, attempt, f"{attempt}-main", model=model, sae=sae, progress=bar)
        elif todo:
            from saets_utils.effects.executors import LocalPool, SubmititPool

            pool: Any
            if slurm:
                s = e.slurm
                pool = SubmititPool(
                    executor,
                    EffectsTask(),
                    wd,
                    attempt,
                    tasks=s.tasks,
                    gpus_per_task=s.gpus_per_task,
                    threads=s.cpus_per_task or 1,
                )
            else:
                threads = max(1, (os.cpu_count() or 1) // len(devices)) if devices[0] == "cpu" else 1
                pool = LocalPool(wd, attempt, devices, threads)
            atomic_write_json(run.paths.work.attempt_workers(attempt), {"workers": pool.workers})
            failures = watch(run, plan, pool, bar, poll_s=poll_s)
        bar.close()
        left = total - len(done_ids(run, plan) & set(plan.vector_ids.tolist()))
        if left:
            msg = "\n\n".join(_given_up(run, plan, attempt) + failures) or "no worker error recorded"
            raise RuntimeError(
                f"{left} of {total} vectors unmeasured; finished ones are saved, re-run to resume.\n{msg}"
            )
        return merge_effects(run, plan)


class EffectsTask(submitit.helpers.Checkpointable):
    """A submitit task: a worker on its GPU (``gpus`` 0: on CPU), or one worker subprocess per GPU.
    Checkpointable: on preemption or time-out Slurm requeues it under the same worker name, so it
    takes its own claims back at once and the others wait for nothing."""

    def __call__(self, work: str, attempt: str, worker: str, gpus: int, threads: int) -> None:
        if gpus <= 1:
            device = "cuda:0" if gpus else "cpu"
            main(
                [
                    "--work",
                    work,
                    "--device",
                    device,
                    "--attempt",
                    attempt,
                    "--worker",
                    worker,
                    "--threads",
                    str(threads),
                ]
            )
            return
        names = [f"{worker}-g{g}" for g in range(gpus)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        procs = [
            subprocess.Popen(worker_command(Path(work), f"cuda:{g}", attempt, n, threads=threads), env=env)
            for g, n in enumerate(names)
        ]

        def stop(signum: int, frame: object) -> None:  # cancelled: take the workers along
            for p in procs:
                p.kill()
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"worker processes {names} of task {worker} exited with codes {codes}")


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: ``python -m saets_utils.effects.runner --work DIR --device D --attempt A --worker W``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--attempt", required=True)
    ap.add_argument("--worker", required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run = RunConfig.model_validate_json(WorkPaths(a.work).run_config.read_text())
    work_loop(run, a.attempt, a.worker, device=a.device, stop_with_parent=True)


if __name__ == "__main__":
    main()
