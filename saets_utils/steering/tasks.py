"""Steering goals ("tasks") read from ``params/tasks/<name>.yaml``.

A task holds what the judge asks (behavioural and coherence criteria), the instruction used by
the ``prompt`` baseline, matched positive/negative texts (for CAA, FGAA and target discovery) and,
per SAE, the target features (``targets`` keyed by ``sae.targets_key``). Files are validated once,
with messages naming the file and the field, so a typo fails before any model is loaded.

Example:
    >>> task = load_task("anger")
    >>> task.targets_for("gemma-scope-2b-16k-l0_82", "SAE-TS")
    [(4111, 1.0)]
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saets_utils.config import REPO_ROOT, read_yaml
from saets_utils.registry import METHODS

TASKS_DIR = REPO_ROOT / "params" / "tasks"

Target = tuple[int, float]


class TaskError(ValueError):
    """A task file is missing or invalid; the message names the file, the field and the fix."""


def _check_targets(targets: list[Target]) -> list[Target]:
    if not targets:
        raise ValueError("list of [feature_id, weight] must not be empty")
    seen: set[int] = set()
    for i, (fid, w) in enumerate(targets):
        if fid < 0:
            raise ValueError(f"entry {i}: feature id {fid} is negative; ids start at 0")
        if not math.isfinite(w) or w == 0:
            raise ValueError(f"entry {i} (feature {fid}): weight {w} must be finite and non-zero")
        if fid in seen:
            raise ValueError(f"entry {i}: feature {fid} is listed twice; merge the weights")
        seen.add(fid)
    return [(int(f), float(w)) for f, w in targets]


class Discover(BaseModel):
    """How target features are found for an SAE the task file lists no ids for.

    ``contrast``: mean SAE activation on ``positive`` minus mean on ``negative``, features denser
    than ``eval.fgaa_density_max`` dropped, top ``k`` positive entries kept, weights L1-normalised.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(1, gt=0)
    how: Literal["contrast"] = "contrast"


class Task(BaseModel):
    """One steering goal; see the module docstring and ``params/tasks/anger.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    behaviour: str = Field(min_length=1)
    coherence: str = Field(min_length=1)
    steering_prompt: str = Field(min_length=1)
    positive: list[str] = Field(min_length=8)
    negative: list[str] = Field(min_length=8)
    # targets_key -> [[id, weight], ...]  or  targets_key -> {method or "default": [[id, weight], ...]}
    targets: dict[str, list[Target] | dict[str, list[Target]]] = Field(default_factory=dict)
    discover: Discover = Discover()

    @field_validator("positive", "negative")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        for i, t in enumerate(v):
            if not t.strip():
                raise ValueError(f"text {i} is empty")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: dict) -> dict:
        out: dict = {}
        for key, entry in v.items():
            if isinstance(entry, dict):
                if "default" not in entry:
                    raise ValueError(f"{key}: a per-method mapping needs a 'default' list")
                unknown = set(entry) - set(METHODS) - {"default"}
                if unknown:
                    raise ValueError(f"{key}: unknown method(s) {sorted(unknown)}; use {list(METHODS)} or 'default'")
                try:
                    out[key] = {m: _check_targets(t) for m, t in entry.items()}
                except ValueError as e:
                    raise ValueError(f"{key}: {e}") from None
            else:
                try:
                    out[key] = _check_targets(entry)
                except ValueError as e:
                    raise ValueError(f"{key}: {e}") from None
        return out

    @model_validator(mode="after")
    def _matched(self) -> Task:
        if len(self.positive) != len(self.negative):
            raise ValueError(
                f"positive has {len(self.positive)} texts but negative has {len(self.negative)}; "
                "write one matched negative per positive"
            )
        return self

    def targets_for(self, targets_key: str | None, method: str) -> list[Target] | None:
        """Target features ``[(id, weight), ...]`` of ``method`` for the SAE ``targets_key``.

        None when the key is None or not listed: the caller then discovers targets (``discover``).
        """
        if targets_key is None or targets_key not in self.targets:
            return None
        entry = self.targets[targets_key]
        if isinstance(entry, dict):
            return list(entry.get(method, entry["default"]))
        return list(entry)


def join_prompt(prefix: str, prompt: str) -> str:
    """The ``prompt`` baseline's input: the task's instruction, a space, then the prompt."""
    return " ".join(p for p in (prefix.strip(), prompt) if p)


def check_target_ids(targets: list[Target], d_sae: int, where: str) -> None:
    """Raise :class:`TaskError` if a feature id is outside ``[0, d_sae)``; ``where`` names the source."""
    bad = [fid for fid, _ in targets if not 0 <= fid < d_sae]
    if bad:
        raise TaskError(
            f"{where}: feature id(s) {bad} out of range for an SAE with d_sae={d_sae}; "
            "check that sae.targets_key matches the SAE the ids were chosen for"
        )


def available_tasks(tasks_dir: str | os.PathLike[str] = TASKS_DIR) -> list[str]:
    """Names of the task files in ``tasks_dir`` (sorted)."""
    return sorted(p.stem for p in Path(tasks_dir).glob("*.yaml"))


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"invalid task file {path}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling against saets_utils/steering/tasks.py (Task)"
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def load_task(name_or_path: str | os.PathLike[str], tasks_dir: str | os.PathLike[str] = TASKS_DIR) -> Task:
    """Read and validate one task: a name in ``tasks_dir`` (e.g. ``"anger"``) or a path to a YAML file."""
    s = str(name_or_path)
    if s.endswith((".yaml", ".yml")) or os.sep in s or "/" in s:
        path = Path(s)
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        if not path.is_file():
            raise TaskError(f"task file {s!r} not found")
    else:
        path = Path(tasks_dir) / f"{s}.yaml"
        if not path.is_file():
            raise TaskError(
                f"unknown task {s!r}; available in {tasks_dir}: {', '.join(available_tasks(tasks_dir)) or '(none)'}"
            )
    raw = read_yaml(path)  # a syntax error names the file, line and column
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: top level must be a mapping of fields (name, behaviour, ...)")
    if raw.get("name") != path.stem:
        raise TaskError(f"{path}: name {raw.get('name')!r} must equal the file stem {path.stem!r}")
    try:
        return Task.model_validate(raw)
    except ValidationError as err:
        raise TaskError(_format_errors(path, err)) from None


def load_tasks(names: list[str], tasks_dir: str | os.PathLike[str] = TASKS_DIR) -> list[Task]:
    """Load several tasks in the given order (e.g. ``cfg.eval.tasks``); the first bad one raises."""
    return [load_task(n, tasks_dir) for n in names]
