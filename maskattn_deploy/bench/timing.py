"""Latency measurement: warm-up, repeats, robust statistics, and interleaved A/B pairs.

On a shared or thermally throttled machine the speed drifts during a run. Comparing two
variants (masked vs unmasked UNet) by timing all of A and then all of B folds that drift into
the ratio; here A and B alternate within each repeat (A B, then B A, ...) and the ratio is the
median of the per-pair ratios, so slow drift cancels pair by pair.

A variant timed right after the other one does not run in its steady state: its caches are cold
and, on the CPU, ONNX Runtime's worker threads of the *other* session are still spin-waiting on
the same cores while its own are parked (on two cores that alone made every first run after a
switch ~1.5x slower). ``settle`` untimed runs after each switch put every timed run in the state
a denoising loop sees: the same UNet back to back.

Each run also records the process CPU time (all threads). On a CPU shared with other jobs the
wall clock includes time spent waiting for a core; CPU time counts only the work done, so the
CPU-time ratio of two variants stays meaningful when the wall-clock one is noisy. (On a GPU it
is meaningless: the host mostly waits.)

How one run is timed is a :data:`Clock`: by default the host's ``perf_counter`` around the call
with ``sync`` on both sides; :func:`cuda_event_clock` times the GPU work between two CUDA events
instead (what a CUDA-graph replay costs the device, without the host's synchronisation).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# One timed call: ``clock(fn) -> (wall seconds, process CPU seconds)``.
Clock = Callable[[Callable[[], Any]], tuple[float, float]]


@dataclass(frozen=True)
class Stats:
    """Wall-clock seconds (and process CPU seconds) of repeated runs of one thing."""

    samples: tuple[float, ...]
    cpu_samples: tuple[float, ...] = field(default=(), compare=False)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_samples) if self.cpu_samples else None

    def ms(self) -> str:
        """``median (min-max) ms`` for tables."""
        return f"{self.median * 1e3:.1f} ({self.min * 1e3:.1f}-{self.max * 1e3:.1f})"

    def as_dict(self) -> dict[str, Any]:
        cpu = self.cpu_median
        return {
            "median_ms": self.median * 1e3,
            "min_ms": self.min * 1e3,
            "max_ms": self.max * 1e3,
            "repeats": self.n,
            "samples_ms": [s * 1e3 for s in self.samples],
            "cpu_median_ms": None if cpu is None else cpu * 1e3,
        }


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, float]:
    sync()
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start, time.process_time() - cpu


def _no_sync() -> None:
    pass


def cuda_event_clock(device: Any = None) -> Clock:
    """A :data:`Clock` reading CUDA events recorded around the call on the current stream.

    The device finishes earlier work first (one synchronisation before the call); the
    elapsed time is the GPU's between the two events, so host-side synchronisation stays out.
    """
    import torch

    def clock(fn: Callable[[], Any]) -> tuple[float, float]:
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        cpu = time.process_time()
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3, time.process_time() - cpu

    return clock


def _stats(runs: list[tuple[float, float]]) -> Stats:
    return Stats(tuple(w for w, _ in runs), tuple(c for _, c in runs))


def measure(
    fn: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = _no_sync,
    clock: Clock | None = None,
    max_s: float | None = None,
) -> Stats:
    """Time ``fn`` ``repeats`` times after ``warmup`` untimed calls (``sync`` waits for devices).

    ``clock`` times one call (default: ``perf_counter`` with ``sync``). With ``max_s``, timing
    stops early once at least two runs are in and the timed runs took longer than ``max_s``
    of wall time (a slow variant gets fewer samples instead of eating a time budget).
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    timed = clock or (lambda f: _timed(f, sync))
    for _ in range(warmup):
        fn()
    sync()
    runs: list[tuple[float, float]] = []
    start = time.perf_counter()
    while len(runs) < repeats:
        runs.append(timed(fn))
        if max_s is not None and len(runs) >= 2 and time.perf_counter() - start > max_s:
            break
    return _stats(runs)


def _median_ratio(a: tuple[float, ...], b: tuple[float, ...]) -> float | None:
    if not a or not b:
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class PairedStats:
    """Interleaved timings of variants ``a`` and ``b`` (e.g. masked and unmasked)."""

    a: Stats
    b: Stats

    @property
    def ratio(self) -> float:
        """Median over repeats of a_i / b_i (drift-cancelling wall-clock ratio of a to b)."""
        return _median_ratio(self.a.samples, self.b.samples)  # type: ignore[return-value]

    @property
    def cpu_ratio(self) -> float | None:
        """The same ratio in process CPU time (robust to waiting for a shared CPU)."""
        return _median_ratio(self.a.cpu_samples, self.b.cpu_samples)

    @property
    def ratio_of_medians(self) -> float:
        return self.a.median / self.b.median

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a.as_dict(),
            "b": self.b.as_dict(),
            "ratio": self.ratio,
            "cpu_ratio": self.cpu_ratio,
            "ratio_of_medians": self.ratio_of_medians,
        }


@dataclass(frozen=True)
class Switched:
    """A variant of a model shared with the other variant of a pair: ``switch`` puts the model
    into this variant (untimed), ``run`` is the call that is timed. Like a UNet with its gates
    installed or removed."""

    run: Callable[[], Any]
    switch: Callable[[], None] = _no_sync


def measure_interleaved(
    a: Callable[[], Any] | Switched,
    b: Callable[[], Any] | Switched,
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] = _no_sync,
    settle: int = 0,
    clock: Clock | None = None,
) -> PairedStats:
    """Alternate A and B (AB, BA, AB, ...) ``repeats`` times after ``warmup`` rounds of each.

    A variant is a callable, or a :class:`Switched` run whose switch is called before each of
    its runs (warm-up included), for variants that share one module.
    ``settle`` untimed runs follow each switch before the timed run (see the module docstring).
    ``clock`` times one run (default: ``perf_counter`` with ``sync``).
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    timed = clock or (lambda f: _timed(f, sync))
    first, second = (v if isinstance(v, Switched) else Switched(v) for v in (a, b))
    for _ in range(warmup):
        for variant in (first, second):
            variant.switch()
            variant.run()
    runs: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])
    for i in range(repeats):
        order = ((first, runs[0]), (second, runs[1]))
        for variant, sink in order if i % 2 == 0 else order[::-1]:
            variant.switch()
            for _ in range(settle):
                variant.run()
            sink.append(timed(variant.run))
    return PairedStats(_stats(runs[0]), _stats(runs[1]))
