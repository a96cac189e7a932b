"""Progress bars that show both in JupyterLab and in papermill's log.

``tqdm.auto`` draws an ipywidgets bar inside a kernel, which papermill's log never sees; a text
bar on stderr renders in JupyterLab's cell output and streams into ``papermill --log-output`` and
CI logs alike. Updates are throttled (``mininterval``) so logs stay short.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.std import tqdm


def progress(
    *, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, initial: int = 0, **kw: Any
) -> tqdm:
    """A text progress bar on stderr (see module docstring)."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        initial=initial,
        file=sys.stderr,
        mininterval=0.5 if interactive else 5.0,
        dynamic_ncols=interactive,
        **kw,
    )
