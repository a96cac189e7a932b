"""``results/<run>/manifest.json``: what produced a run's files (params, commit, versions, device).

Each notebook adds its own entry under ``steps``; nothing secret is written (API keys never
reach params, and the judge entry records only its kind, model and base URL).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata

from saets_utils.config import REPO_ROOT, RunConfig
from saets_utils.io_utils import atomic_write_json

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


def record_step(run: RunConfig, step: str, device: str, extra: dict | None = None) -> dict:
    """Add or replace ``steps[step]`` in the run's manifest (creating it) and return the manifest."""
    path = run.results_dir / "manifest.json"
    run.results_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(path.read_text()) if path.is_file() else {}
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
    }
    atomic_write_json(path, manifest)
    return manifest
