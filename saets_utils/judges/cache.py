"""Persistent cache of judge scores, so a re-run of notebook 03 pays for no call twice.

Keys are a sha256 of everything that decides a score (judge kind, model, prompt-template
version, criterion kind and text, prompt, generated text); values are small JSON-able dicts.
Only successful scores are stored: an error is retried on the next run.
``diskcache`` (SQLite underneath) is safe across threads and processes sharing one folder; its
eviction is switched off (no size limit), so a score once paid for is never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_key(
    *,
    judge_kind: str,
    model: str,
    template_version: str,
    criterion_kind: str,
    criterion: str,
    prompt: str,
    text: str,
    extra: str = "",
) -> str:
    """Hex sha256 identifying one score; ``extra`` holds judge-specific inputs (e.g. the
    offline judge's calibration and the hash of a task's contrastive examples)."""
    fields = [judge_kind, model, template_version, criterion_kind, criterion, prompt, text, extra]
    blob = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Score cache in a folder (e.g. ``results/<run>/eval/judge_cache``), or in memory when
    ``path`` is None (tests, one-off scoring).

    Example:
        >>> with JudgeCache("results/demo/eval/judge_cache") as cache:
        ...     cache.set(key, {"score": 7}); cache.get(key)
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._mem: dict[str, dict[str, Any]] | None = None
        self._disk = None
        if self.path is None:
            self._mem = {}
        else:
            import diskcache

            self.path.mkdir(parents=True, exist_ok=True)
            # Paid scores are never evicted: diskcache's default is a 1 GiB limit with
            # least-recently-stored eviction. The settings persist in the folder, so opening an
            # older cache here also switches it to no eviction.
            self._disk = diskcache.Cache(str(self.path), eviction_policy="none", size_limit=2**62)

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored record for ``key``, or None."""
        if self._mem is not None:
            rec = self._mem.get(key)
        else:
            rec = self._disk.get(key)  # type: ignore[union-attr]
        return dict(rec) if isinstance(rec, dict) else None

    def set(self, key: str, record: dict[str, Any]) -> None:
        """Store a successful score; a record without an integer ``score`` is refused."""
        if not isinstance(record.get("score"), int):
            raise ValueError("JudgeCache stores successful scores only (record needs an int 'score')")
        if self._mem is not None:
            self._mem[key] = dict(record)
        else:
            self._disk.set(key, dict(record))  # type: ignore[union-attr]

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __bool__(self) -> bool:  # an empty cache is still a cache (``cache or default`` must keep it)
        return True

    def __len__(self) -> int:
        return len(self._mem) if self._mem is not None else len(self._disk)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the SQLite handle (reopened transparently by diskcache on next use)."""
        if self._disk is not None:
            self._disk.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "memory"
        return f"JudgeCache({where!r}, entries={len(self)})"
