"""Atomic file writes: a crash never leaves a half-written file that a later run would trust.

Temporary files and folders are created with the normal umask modes (not ``mkstemp``'s 0600 or
``mkdtemp``'s 0700), so colleagues sharing ``results/`` or the cache on a cluster can read them.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor

TMP_SUFFIX = ".tmp"


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # 0666 less the umask
    return tmp


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` with the umask's mode (``mkdtemp`` makes it 0700)."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = parent / f"{prefix}{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        try:
            tmp.mkdir(mode=0o777)
            return tmp
        except FileExistsError:
            continue


def remove_stale_tmp(folder: Path, older_than_s: float, recursive: bool = True) -> list[Path]:
    """Delete temporary files this module left (a writer killed mid-write) that are older than
    ``older_than_s`` (younger ones may still be being written); returns what was removed."""
    if not folder.is_dir():
        return []
    cutoff = time.time() - older_than_s
    found = folder.rglob(f".*{TMP_SUFFIX}") if recursive else folder.glob(f".*{TMP_SUFFIX}")
    removed = []
    for p in found:
        try:
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # another process removed or renamed it
            continue
    return removed


def remove_outputs(folder: Path, names: Iterable[str]) -> list[Path]:
    """Delete the files ``names`` in ``folder`` that an earlier run of a step wrote, when the step
    starts: if it then fails, none of them stands beside its partial output as if it were current.
    Returns what was removed."""
    removed = []
    for name in names:
        p = folder / name
        if p.is_file() or p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _commit(tmp: Path, path: Path, mode: int | None = None) -> None:
    if mode is not None:  # a writer that re-created the file (safetensors makes it 0600)
        os.chmod(tmp, mode)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_exclusive_text(path: str | os.PathLike[str], text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists (False then), in one step: the text goes to a
    temporary sibling that is hard-linked to ``path`` (``link`` fails if ``path`` exists), so a writer
    killed mid-write never leaves ``path`` empty. Where hard links are refused, an exclusive create,
    then the write."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        tmp.write_text(text)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to a temporary sibling, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        tmp.write_text(text)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """JSON (indented, NaN allowed as in Python's json) written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_save_safetensors(
    tensors: dict[str, Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` through a temporary sibling and an atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        mode = tmp.stat().st_mode & 0o777  # 0666 less the umask
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _commit(tmp, path, mode)
    finally:
        tmp.unlink(missing_ok=True)
