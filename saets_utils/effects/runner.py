"""Run notebook 01's effects measurement: plan, workers, durable shards, resume, merge.

Layout under ``results/<run>/effects_work/``: ``run_config.json`` and ``plan.safetensors`` (vector
ids, unit vectors, loss chunks, baseline, fingerprint), ``shards/*.safetensors`` (one per finished
block of vectors, written atomically), ``claims/`` (which attempt took which block), ``logs/``.
A re-run with the same settings skips every vector already in a shard; the merged result does
not depend on how vectors were grouped, since every rollout is seeded by its own vector id.

``gpus = 0`` runs in-process; ``gpus = N`` starts N worker subprocesses (``cuda:0..N-1``, or N CPU
workers where no GPU exists, so the orchestration is testable without one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from saets_utils.config import ConfigError, RunConfig
from saets_utils.effects.calibration import (
    Calibration,
    calibrate_scales,
    check_loss_target,
    resid_at_hook,
    steered_losses,
)
from saets_utils.effects.measure import KEEP_SAMPLES, RolloutSpec, measure_baseline, measure_effects, prompt_token_ids
from saets_utils.effects.plan import Plan, fingerprint, work_dir
from saets_utils.io_utils import atomic_save_safetensors, atomic_write_json


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
    )


def prepare_plan(run: RunConfig, model, sae, restart: bool = False) -> Plan:
    """Load the run's plan, or build it (vectors, loss chunks, unsteered baseline) once and save it.

    Fails if an existing plan was made with other settings, unless ``restart`` (which deletes the
    old work folder).
    """
    import shutil

    from saets_utils.effects.vector_sources import build_vectors
    from saets_utils.models.loading import bos_id, load_texts, tokenize_chunks
    from saets_utils.models.sae_loading import load_sae_from

    wd = work_dir(run)
    fp = fingerprint(run)
    plan_path = wd / "plan.safetensors"
    if plan_path.is_file():
        plan = Plan.load(plan_path)
        if plan.fingerprint == fp and not restart:
            return plan
        if not restart:
            raise ConfigError(
                f"{wd} holds work made with other effects settings (fingerprint {plan.fingerprint} "
                f"!= {fp}); re-run with restart=True to discard it, or use another params file"
            )
    if restart and wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True, exist_ok=True)
    ids, vectors = build_vectors(run, sae, model.cfg.d_model, lambda c: load_sae_from(c, run, "cpu"))
    bos = bos_id(model, run.model)
    spec = rollout_spec(run, model, bos)
    # Chunks start at document starts, as the SAE's training chunks do (a chunk starting mid-sentence
    # makes position 1 a second attention sink on SmolLM2).
    loss_tokens = tokenize_chunks(
        model,
        load_texts(run.text),
        run.effects.loss_chunk_tokens,
        run.effects.loss_chunks,
        bos,
        seed=run.seed + 1,
        align_docs=True,
    )
    hook = run.sae.hook_name
    resid = resid_at_hook(model, hook, loss_tokens)
    unsteered = float(steered_losses(model, hook, loss_tokens, resid, torch.zeros(1, model.cfg.d_model))[0])
    check_loss_target(run.effects.loss_target, unsteered, run.effects.scale_grid.values())  # before any vector
    base = measure_baseline(
        model,
        sae,
        hook,
        spec,
        run.effects.baseline_multiplier,
        run.seed,
        max_rows=run.effects.vectors_per_batch * run.effects.samples_per_prompt,
    )
    plan = Plan(ids, vectors, loss_tokens, base.mean, base.density, base.half_means, unsteered, base.n, fp)
    plan.save(plan_path)
    return plan


def done_ids(run: RunConfig, seen: dict[Path, list[int]] | None = None) -> set[int]:
    """Vector ids already recorded in finished shards (``seen`` caches shards read before)."""
    seen = {} if seen is None else seen
    for p in (work_dir(run) / "shards").glob("*.safetensors"):
        if p not in seen:
            with safe_open(str(p), "pt") as f:
                seen[p] = f.get_tensor("vector_ids").tolist()
    return {v for ids in seen.values() for v in ids}


def todo_blocks(run: RunConfig, plan: Plan) -> list[list[int]]:
    """Row indices into the plan of vectors still to measure, in blocks of ``vectors_per_batch``."""
    done = done_ids(run)
    rows = [i for i, v in enumerate(plan.vector_ids.tolist()) if v not in done]
    k = run.effects.vectors_per_batch
    return [rows[i : i + k] for i in range(0, len(rows), k)]


@dataclass
class BlockEffects:
    """A block of vectors calibrated and measured: the ``calibration``, ``effects [v, d_sae]`` and
    ``halves [v, 2, d_sae]`` (NaN for vectors that got no scale) and ``sample_tokens [v, k, total_tokens]``
    (zeros for those)."""

    calibration: Calibration
    effects: Tensor
    halves: Tensor
    sample_tokens: Tensor


def calibrate_and_measure(
    run: RunConfig,
    model,
    sae,
    plan: Plan,
    resid: Tensor,
    spec: RolloutSpec,
    vectors: Tensor,
    vector_ids: Sequence[int],
    keep_samples: int = KEEP_SAMPLES,
) -> BlockEffects:
    """01's recipe for unit ``vectors [v, d_model]`` (on the model's device): calibrate a scale each to
    the run's loss target on the plan's loss chunks (``resid``: their activations at the hook), then
    measure the effects of those that got one against the plan's baseline. Targeting uses it too."""
    hook = run.sae.hook_name
    e = run.effects
    cal = calibrate_scales(
        model, hook, plan.loss_tokens, resid, vectors, e.scale_grid.values(), e.loss_target, plan.unsteered_loss
    )
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
            vectors[ok],
            [vector_ids[i] for i in ok.nonzero()[:, 0].tolist()],
            cal.scales[ok].to(vectors.device),
            plan.baseline_mean,
            run.seed,
            keep_samples=keep_samples,
            baseline_halves=plan.baseline_halves,
        )
        effects[ok] = blk.effects.float().cpu()
        halves[ok] = blk.halves.float().cpu()
        samples[ok, : blk.sample_tokens.shape[1]] = blk.sample_tokens
    return BlockEffects(cal, effects, halves, samples)


def compute_block(
    run: RunConfig, model, sae, plan: Plan, resid: Tensor, spec: RolloutSpec, rows: list[int], shard_path: Path
) -> None:
    """Calibrate scales and measure effects for plan rows ``rows``; write one shard atomically."""
    t0 = time.perf_counter()
    ids = plan.vector_ids[rows]
    res = calibrate_and_measure(
        run, model, sae, plan, resid, spec, plan.vectors[rows].to(model.cfg.device), ids.tolist()
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
        {"status": json.dumps(cal.status), "seconds": repr(seconds), "target": repr(cal.target)},
    )


def _claim(wd: Path, attempt: str, k: int) -> bool:
    (wd / "claims").mkdir(exist_ok=True)
    try:
        os.close(os.open(wd / "claims" / f"{attempt}_{k:05d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def work_loop(run: RunConfig, attempt: str, device: str = "cpu", model=None, sae=None, progress=None) -> None:
    """Measure claimed blocks of this attempt until none is left (loading the model and SAE on
    ``device`` unless given)."""
    from saets_utils.models.loading import bos_id, load_model
    from saets_utils.models.sae_loading import load_sae

    wd = work_dir(run)
    blocks = json.loads((wd / f"attempt_{attempt}.json").read_text())
    model = model if model is not None else load_model(run.model, device)
    sae = sae if sae is not None else load_sae(run, device)
    plan = Plan.load(wd / "plan.safetensors")
    spec = rollout_spec(run, model, bos_id(model, run.model))
    resid = resid_at_hook(model, run.sae.hook_name, plan.loss_tokens)
    (wd / "shards").mkdir(exist_ok=True)
    for k, rows in enumerate(blocks):
        if _claim(wd, attempt, k):
            compute_block(run, model, sae, plan, resid, spec, rows, wd / "shards" / f"{attempt}_{k:05d}.safetensors")
            if progress is not None:
                progress.update(len(rows))


def available_devices(gpus: int) -> list[str]:
    """``cuda:0..gpus-1`` (error if fewer exist), or ``gpus`` CPU workers where no GPU exists."""
    if gpus < 0:
        raise ConfigError("gpus must be >= 0")
    n = torch.cuda.device_count()
    if n == 0:
        return ["cpu"] * gpus
    if gpus > n:
        raise ConfigError(f"gpus={gpus} but only {n} CUDA device(s) are visible; use gpus <= {n}")
    return [f"cuda:{i}" for i in range(gpus)]


def _spawn_worker(run: RunConfig, device: str, attempt: str, index: int, threads: int) -> subprocess.Popen:
    wd = work_dir(run)
    (wd / "logs").mkdir(exist_ok=True)
    log = open(wd / "logs" / f"{attempt}_worker{index}.log", "w")  # noqa: SIM115 - the worker writes to it
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "saets_utils.effects.runner",
        "--work",
        str(wd),
        "--device",
        device,
        "--attempt",
        attempt,
        "--threads",
        str(threads),
    ]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_effects(run: RunConfig, model, sae, gpus: int = 0, restart: bool = False, poll_s: float = 0.5) -> Path:
    """Measure all planned vectors (resuming), then merge; returns ``results/<run>/effects.safetensors``.

    ``model``/``sae`` (already loaded) build the plan and, with ``gpus = 0``, do the work in-process.
    Raises after reporting each failed worker if any vector is left unmeasured (re-run to resume).
    """
    from saets_utils.progress import progress as progress_bar

    devices = available_devices(gpus)
    plan = prepare_plan(run, model, sae, restart)
    blocks = todo_blocks(run, plan)
    wd = work_dir(run)
    attempt = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
    atomic_write_json(wd / f"attempt_{attempt}.json", blocks)
    atomic_write_json(wd / "run_config.json", json.loads(run.model_dump_json()))
    total = len(plan.vector_ids)
    bar = progress_bar(total=total, initial=total - sum(len(b) for b in blocks), desc="effects (vectors)", unit="vec")
    failures: list[str] = []
    if blocks and not devices:
        work_loop(run, attempt, model=model, sae=sae, progress=bar)
    elif blocks:
        threads = max(1, (os.cpu_count() or 1) // len(devices)) if devices[0] == "cpu" else 1
        procs = [_spawn_worker(run, d, attempt, i, threads) for i, d in enumerate(devices)]
        atomic_write_json(wd / "workers.json", {"attempt": attempt, "pids": [p.pid for p in procs]})
        running = set(range(len(procs)))
        seen: dict[Path, list[int]] = {}
        while running:
            time.sleep(poll_s)
            bar.update(len(done_ids(run, seen)) - bar.n)
            for i in list(running):
                rc = procs[i].poll()
                if rc is None:
                    continue
                running.discard(i)
                if rc != 0:
                    tail = (wd / "logs" / f"{attempt}_worker{i}.log").read_text()[-2000:]
                    failures.append(f"worker {i} ({devices[i]}) exited with code {rc}:\n{tail}")
                    bar.write(f"effects: worker {i} on {devices[i]} died (code {rc}); others continue")
        bar.update(len(done_ids(run, seen)) - bar.n)
    bar.close()
    left = total - len(done_ids(run) & set(plan.vector_ids.tolist()))
    if left:
        msg = "\n\n".join(failures) or "no worker error recorded"
        raise RuntimeError(f"{left} of {total} vectors unmeasured; finished ones are saved, re-run to resume.\n{msg}")
    from saets_utils.effects.store import merge_effects

    return merge_effects(run, plan)


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: ``python -m saets_utils.effects.runner --work DIR --device D --attempt A``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--attempt", required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run = RunConfig.model_validate_json((Path(a.work) / "run_config.json").read_text())
    work_loop(run, a.attempt, device=a.device)


if __name__ == "__main__":
    main()
