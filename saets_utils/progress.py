"""Progress bars that show both in JupyterLab and in papermill's log.

``tqdm.auto`` draws an ipywidgets bar inside a kernel, which papermill's log never sees; a text
bar on stderr renders in JupyterLab's cell output and streams into ``papermill --log-output`` and
CI logs alike. Updates are throttled (``mininterval``) so logs stay short.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
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


@contextmanager
def console_bars(module: ModuleType, unit: str = "it") -> Iterator[None]:
    """Within the block, a library module's ``tqdm`` (usually ``tqdm.auto``: an ipywidget inside a
    kernel, which papermill's log and ``make demo`` never show) draws :func:`progress` bars instead.

    Example:
        >>> from sae_lens.training import sae_trainer
        >>> with console_bars(sae_trainer, unit="tok"):
        ...     runner.run()
    """
    original = module.tqdm

    def bar(iterable: Any = None, *args: Any, **kw: Any) -> tqdm:
        return progress(
            iterable=iterable,
            total=kw.get("total"),
            desc=kw.get("desc") or "",
            initial=kw.get("initial") or 0,
            unit=kw.get("unit", unit),
            disable=kw.get("disable", False),
        )

    module.tqdm = bar  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.tqdm = original  # type: ignore[attr-defined]
