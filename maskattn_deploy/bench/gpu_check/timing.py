"""How the GPU check times things, on top of :mod:`maskattn_deploy.bench.timing`.

On CUDA a sample is read from CUDA events around the call (:func:`cuda_event_clock`), and short
kernels are timed as a CUDA graph of ``inner`` launches (:mod:`maskattn_deploy.cuda_graphs`), so
launch gaps between them stay out of the numbers; on the CPU (dry run) ``perf_counter`` is the
clock.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from typing import Any

import torch

from maskattn_deploy.bench.gpu_check.results import CallTiming
from maskattn_deploy.bench.timing import Clock, Stats, cuda_event_clock, measure
from maskattn_deploy.cuda_graphs import capture

logger = logging.getLogger(__name__)


class Timer:
    """Per-call times: CUDA events (CUDA-graph replays when capture works) or perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.clock: Clock | None = cuda_event_clock(device) if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def once_ms(self, fn: Callable[[], object]) -> float:
        """Time one call of ``fn`` (already warm) in milliseconds."""
        return measure(fn, 1, warmup=0, sync=self.sync, clock=self.clock).median * 1e3

    def measure(
        self, fn: Callable[[], object], samples: int, warmup: int, max_s: float | None = None
    ) -> Stats:
        """``samples`` timed calls after ``warmup`` untimed ones (see :func:`measure`)."""
        return measure(fn, samples, warmup, sync=self.sync, clock=self.clock, max_s=max_s)

    def per_call_us(
        self, calls: list[Callable[[], object]], inner: int, samples: int
    ) -> CallTiming:
        """Median/min microseconds per call; each sample runs ``inner`` calls cycling ``calls``."""
        for fn in calls:  # warm-up: compilation and allocation stay out of the numbers
            fn()
        self.sync()

        def loop() -> None:
            for i in range(inner):
                calls[i % len(calls)]()

        run, method = loop, "perf_counter" if not self.cuda else "cuda-events"
        if self.cuda:
            graph = self._capture(loop)
            if graph is not None:
                run, method = graph.replay, "cuda-graph"
        stats = self.measure(run, samples, warmup=1)
        per_call = [s * 1e6 / inner for s in stats.samples]
        return CallTiming(statistics.median(per_call), min(per_call), samples, inner, method)

    def _capture(self, loop: Callable[[], None]) -> Any:
        """A CUDA graph of ``loop`` (hides launch gaps between short kernels), or None."""
        try:
            return capture(loop, warmup=1, device=self.device)
        except Exception as exc:  # capture is an optimisation: fall back to events
            logger.warning("CUDA graph capture failed (%s); timing eager launches", exc)
            return None
