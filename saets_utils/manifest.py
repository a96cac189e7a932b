"""``results/<run>/manifest.json``: what produced a run's files (params, commit, versions, device).

Each notebook adds its own entry under ``steps``; nothing secret is written (API keys never
reach params, and the judge entry records only its kind, model and base URL).

A step's entry is also its stamp: :func:`begin_step` marks it started (not finished) before the step
writes anything, and :func:`record_step` records, once it succeeded, the digests of the files it wrote
(``outputs``) and of the earlier steps' files it read (``inputs``). :func:`check_current` refuses,
naming the step to re-run, files that are not the ones a finished step recorded (left by an
interrupted or failed run, or changed since) and a step whose inputs were replaced by a later run of
an earlier step; notebook 04 and the effect explorer call it before reading a run's files.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from saets_utils.config import REPO_ROOT, RunConfig
from saets_utils.io_utils import atomic_write_json
from saets_utils.paths import RunPaths

# The files each step writes in results/<run>/ (those that exist are recorded: the ``recorded`` files
# of saets_utils/paths.py, which 01's merge, 02's APPROX_OUTPUTS and 03's EVAL_OUTPUTS write) and the
# steps whose files it reads.
STEP_OUTPUTS: dict[str, tuple[str, ...]] = {
    s: RunPaths.written_by(s, recorded=True) for s in ("01_effects", "02_train", "03_eval")
}
STEP_READS: dict[str, tuple[str, ...]] = {
    "01_effects": (),
    "02_train": ("01_effects",),
    "03_eval": ("01_effects", "02_train"),
}


class StaleInputs(RuntimeError):
    """A run's files are not the ones its last finished step recorded; the message names the step to re-run."""


PACKAGES = ("torch", "transformer_lens", "sae_lens", "transformers", "numpy", "pandas", "openai", "papermill", "saets")


def git_commit() -> str | None:
    """The repo's HEAD commit (with ``-dirty`` if the tree has changes), or None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: str) -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _digest(path: Path) -> str | None:
    """sha256 of a file's bytes, None when it does not exist."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digests(run: RunConfig, files: Sequence[str]) -> dict[str, str]:
    """``{file: sha256}`` of those of ``files`` (relative to the run's results folder) that exist."""
    found = {f: _digest(run.results_dir / f) for f in files}
    return {f: d for f, d in found.items() if d is not None}


def _read(run: RunConfig) -> dict:
    path = run.paths.manifest
    return json.loads(path.read_text()) if path.is_file() else {}


def begin_step(run: RunConfig, step: str) -> None:
    """Mark ``steps[step]`` started and not finished, before the step writes anything: until
    :func:`record_step`, :func:`check_current` takes none of its files for a finished run's."""
    run.results_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read(run)
    manifest.setdefault("run", run.name)
    manifest.setdefault("steps", {})[step] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_json(run.paths.manifest, manifest)


def record_step(run: RunConfig, step: str, device: str, extra: dict | None = None) -> dict:
    """Add or replace ``steps[step]`` in the run's manifest (creating it) and return the manifest.
    The entry records the digests of the step's files (``outputs``) and of the earlier steps' files it
    read (``inputs``; :data:`STEP_OUTPUTS`, :data:`STEP_READS`): call it once all of them are written."""
    path = run.paths.manifest
    run.results_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read(run)
    manifest.update(
        {
            "run": run.name,
            "params": json.loads(run.model_dump_json()),
            "git_commit": git_commit(),
            "python": sys.version.split()[0],
            "packages": package_versions(),
            "judge": {
                "kind": run.eval.judge.kind,
                "model": run.eval.judge.model if run.eval.judge.kind == "openai" else "offline",
                "base_url": run.eval.judge.base_url,
            },
        }
    )
    manifest.setdefault("steps", {})[step] = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **device_info(device),
        **(extra or {}),
        "outputs": _digests(run, STEP_OUTPUTS.get(step, ())),
        "inputs": _digests(run, [f for s in STEP_READS.get(step, ()) for f in STEP_OUTPUTS[s]]),
    }
    atomic_write_json(path, manifest)
    return manifest


def _producer(file: str) -> str:
    return next(s for s, files in STEP_OUTPUTS.items() if file in files)


def check_current(run: RunConfig, steps: Sequence[str], reader: str) -> None:
    """Raise :class:`StaleInputs`, naming the step to re-run, unless the files of ``steps`` in the
    run's results folder are those each step recorded when it last finished, and what each read is
    still there unchanged. A step that never ran and left no file passes (a partial run).

    Checked in pipeline order, so the earliest step to re-run is named. Without a manifest (files
    written by library calls, not the notebooks) nothing is checked; an entry written before steps
    recorded their files passes with a notice. ``reader`` names who refuses (e.g. ``"notebook 04"``).
    """
    if not run.paths.manifest.is_file():
        return
    recorded = _read(run).get("steps", {})
    d = run.results_dir

    order = list(STEP_OUTPUTS)

    def refuse(why: str, step: str) -> NoReturn:
        after = [s for s in order[order.index(step) + 1 :] if s in recorded]
        then = f" (then {', '.join(after)}, which read its files)" if after else ""
        raise StaleInputs(f"{reader} refuses the files in {d}: {why}; re-run {step}{then}")

    for step in sorted(steps, key=order.index):
        entry = recorded.get(step)
        present = [f for f in STEP_OUTPUTS[step] if (d / f).is_file()]
        if entry is None:
            if present:
                refuse(
                    f"{present[0]} is there but no finished {step} recorded it (an earlier or interrupted run)", step
                )
            continue
        if "finished_at" not in entry:
            refuse(
                f"{step} started at {entry.get('started_at')} and has not finished (interrupted, failed or running)",
                step,
            )
        if "outputs" not in entry:
            print(f"saets: {step} was recorded before steps recorded their files; its files are not checked")
            continue
        when = entry["finished_at"]
        for f in STEP_OUTPUTS[step]:
            was, now = entry["outputs"].get(f), _digest(d / f)
            if was == now:
                continue
            if was is None:
                refuse(f"{f} was not written by {step}, which finished at {when} without it", step)
            refuse(f"{f}, written by {step} at {when}, " + ("is missing" if now is None else "has changed since"), step)
        for f, was in entry.get("inputs", {}).items():
            if _digest(d / f) != was:
                refuse(
                    f"{step} (finished at {when}) read an earlier {f}, which {_producer(f)} has replaced since", step
                )
