"""How a benchmark hands back its result: a JSON file, and ratios printed alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path | None, result: Any) -> None:
    """``result`` as indented JSON at ``path`` (its folder made; values JSON cannot hold as strings);
    nothing when ``path`` is None."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=str))


def format_ratio(r: dict) -> str:
    """``{"ratio": x, "ci": [lo, hi]}`` as ``x [lo, hi]``."""
    return f"{r['ratio']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
