"""Explicit timers for the benchmarks.

A :class:`Phases` adds up wall-clock and process-CPU seconds per named phase around the calls a
benchmark makes; each phase is also a ``torch.profiler.record_function`` span, so it shows under its
name in a profiler trace, and on CUDA the device is synchronised at its edges (kernels run
asynchronously). Counters sit beside the timers for the work done (e.g. tokens through the model).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.profiler import record_function


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Phases:
    """Wall and process-CPU seconds per named phase, and named counters.

    Example:
        >>> p = Phases("cpu")
        >>> with p.phase("calibration"):
        ...     pass
        >>> p.count["grid_points"] += 3
    """

    def __init__(self, device: str):
        self.device = device
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.count: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        sync(self.device)
        w, c = time.perf_counter(), time.process_time()
        try:
            with record_function(name):
                yield
        finally:
            sync(self.device)
            self.wall[name] += time.perf_counter() - w
            self.cpu[name] += time.process_time() - c

    def seconds(self, *names: str) -> float:
        """Wall seconds of ``names`` together (phases never entered count 0)."""
        return sum(self.wall.get(n, 0.0) for n in names)

    def cpu_seconds(self, *names: str) -> float:
        return sum(self.cpu.get(n, 0.0) for n in names)


def rate(n: float, seconds: float) -> float:
    """``n / seconds``, NaN when nothing was timed."""
    return n / seconds if seconds > 0 else float("nan")
