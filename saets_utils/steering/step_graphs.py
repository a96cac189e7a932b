"""Run a decode step eagerly, or replay it from one CUDA graph per bucket.

:class:`~saets_utils.steering.engine.StaticDecoder`'s step reads everything it needs from buffers
at fixed addresses (the position from a 0-d tensor, the tokens, uniforms, steering and KV cache
from pre-allocated tensors) and writes its results into them, with no host sync. So on CUDA it can
be captured once per bucket (how many cached positions it attends over, and whether it is the
capture-only last step) and replayed for every other position of that bucket: a few hundred kernels
become one launch. Graphs of one runner share one memory pool (they replay one after another).

On the CPU :class:`StepRunner` just calls the step: graphs are off, nothing is captured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

Step = Callable[[Tensor, int, bool], Tensor | None]  # (position buffer, attended positions, last) -> logits


class Graph(Protocol):
    """What :class:`StepRunner` needs of a graph: run a function once for real (the warm-up, whose
    results count), record it, and replay the record."""

    def warm(self, fn: Callable[[], Any]) -> Any: ...

    def capture(self, fn: Callable[[], Any]) -> Any: ...

    def replay(self) -> None: ...


class CudaGraph:
    """A ``torch.cuda.CUDAGraph`` in the runner's pool; the warm-up runs on a side stream, as
    capture requires (lazy initialisation of cuBLAS workspaces and compiled kernels happens there)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.graph = torch.cuda.CUDAGraph()

    def warm(self, fn: Callable[[], Any]) -> Any:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self, fn: Callable[[], Any]) -> Any:
        with torch.cuda.graph(self.graph, pool=self.pool):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class StepRunner:
    """Calls ``step(position, attended, last)`` for one decode position; with ``graphs`` (CUDA), the
    first position of each ``(attended, last)`` bucket runs eagerly and is captured, later ones
    replay that capture after writing their position into the fixed buffer :attr:`pos`.

    The eager first run does the position's work (its results are kept); the capture itself runs
    nothing. ``graph_factory`` makes a :class:`Graph` (default: :class:`CudaGraph`); tests pass a
    recording stand-in to check the bucketing on the CPU.
    """

    def __init__(
        self,
        step: Step,
        device: torch.device | str,
        *,
        graphs: bool,
        graph_factory: Callable[[], Graph] | None = None,
    ) -> None:
        self.step = step
        self.graphs = graphs
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.captured: dict[tuple[int, bool], tuple[Graph, Tensor | None]] = {}
        if graph_factory is None and graphs:
            pool = torch.cuda.graph_pool_handle()
            graph_factory = lambda: CudaGraph(pool)
        self.graph_factory = graph_factory

    def __call__(self, pos: int, attended: int, last: bool) -> Tensor | None:
        self.pos.fill_(pos)  # a kernel with the value as argument on CUDA: no host sync
        if not self.graphs:
            return self.step(self.pos, attended, last)
        key = (attended, last)
        hit = self.captured.get(key)
        if hit is not None:
            graph, out = hit
            graph.replay()
            return out
        assert self.graph_factory is not None
        graph = self.graph_factory()
        out = graph.warm(lambda: self.step(self.pos, attended, last))
        static_out = graph.capture(lambda: self.step(self.pos, attended, last))
        self.captured[key] = (graph, static_out)
        return out


def attended_positions(pos: int, total: int, bucket: int) -> int:
    """How many cached positions the step at ``pos`` attends over: ``pos + 1`` rounded up to a
    multiple of ``bucket`` (at most ``total``); the positions past ``pos`` are masked. ``bucket`` 1:
    exactly the positions so far (one graph per position); ``bucket >= total``: one graph for all."""
    return min(total, -(-(pos + 1) // bucket) * bucket)
