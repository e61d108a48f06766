"""Bench building blocks: statistics, interleaving order, drift-cancelling ratio, peak memory."""

from __future__ import annotations

import time

import numpy as np
import pytest

from maskattn_deploy.bench.memory import PeakMemory
from maskattn_deploy.bench.timing import (
    PairedStats,
    Stats,
    Switched,
    measure,
    measure_interleaved,
)


def test_stats_on_known_samples() -> None:
    stats = Stats((0.004, 0.001, 0.003, 0.002, 0.010))
    assert stats.median == 0.003 and stats.min == 0.001 and stats.max == 0.010 and stats.n == 5
    assert stats.ms() == "3.0 (1.0-10.0)"
    assert stats.as_dict()["median_ms"] == pytest.approx(3.0)


def test_measure_warms_up_then_times_each_repeat() -> None:
    calls = []
    stats = measure(lambda: calls.append(time.sleep(0.002)), repeats=3, warmup=2)
    assert len(calls) == 5 and stats.n == 3
    assert all(s >= 0.002 for s in stats.samples)
    with pytest.raises(ValueError):
        measure(lambda: None, repeats=0)


def test_interleaving_alternates_and_switches_before_each_run() -> None:
    log: list[str] = []
    state = {"variant": None}

    def switch(name: str):
        return lambda: state.update(variant=name)

    def run(name: str):
        def fn() -> None:
            assert state["variant"] == name  # the switch always ran before its variant
            log.append(name)

        return fn

    paired = measure_interleaved(
        Switched(run("a"), switch("a")), Switched(run("b"), switch("b")), repeats=4, warmup=1
    )
    assert log == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert paired.a.n == paired.b.n == 4


def test_settle_runs_each_variant_untimed_after_its_switch() -> None:
    log: list[str] = []
    # The first run after a switch is slow (cold), the next ones fast: with settle=1 only the
    # fast, steady-state runs are timed.
    state = {"last": None}

    def run(name: str, cold: float, warm: float):
        def fn() -> None:
            time.sleep(warm if state["last"] == name else cold)
            state["last"] = name
            log.append(name)

        return fn

    paired = measure_interleaved(
        run("a", 0.05, 0.01), run("b", 0.05, 0.01), repeats=2, warmup=0, settle=1
    )
    assert log == ["a", "a", "b", "b", "b", "b", "a", "a"]
    # Timed runs are the warm ones (10 ms; the cold ones take 50 ms): sleep overshoot only.
    assert max(paired.a.samples + paired.b.samples) < 0.04


def test_paired_ratio_cancels_drift() -> None:
    # The machine slows down 3x during the run; A always costs 1.1x B at the same moment.
    slowdown = np.linspace(1.0, 3.0, 8)
    a = Stats(tuple(0.011 * s for s in slowdown))
    b = Stats(tuple(0.010 * s for s in slowdown))
    paired = PairedStats(a, b)
    assert paired.ratio == pytest.approx(1.1)
    # Timing all of A before all of B would have mixed in the drift:
    sequential = (
        Stats(tuple(0.011 * s for s in slowdown[:4])).median
        / Stats(tuple(0.010 * s for s in slowdown[4:])).median
    )
    assert sequential < 0.7


def test_peak_memory_is_reset_per_block() -> None:
    with PeakMemory() as big:
        block = np.ones(40 * 2**20 // 8)  # 40 MiB, touched
        del block
    with PeakMemory() as small:
        pass
    assert big.result is not None and small.result is not None
    if big.result.rss_scope == "block":  # Linux with /proc/self/clear_refs
        assert big.result.rss_peak - small.result.rss_peak >= 30 * 2**20
    else:
        assert big.result.rss_peak >= 40 * 2**20


def test_cpu_time_counts_work_not_waiting() -> None:
    def busy(seconds: float = 0.02) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    paired = measure_interleaved(busy, lambda: time.sleep(0.02), repeats=4, warmup=0)
    # Same wall time (both ~20 ms); only the busy loop uses the CPU.
    assert 0.5 < paired.ratio < 2.0
    assert paired.cpu_ratio is not None and paired.cpu_ratio > 5
    assert paired.a.as_dict()["cpu_median_ms"] > 10


def test_measure_uses_the_given_clock_for_every_timed_run() -> None:
    seen: list[str] = []

    def clock(fn):
        fn()
        seen.append("timed")
        return 0.5, 0.25  # wall, CPU seconds of one run

    calls = []
    stats = measure(lambda: calls.append(1), repeats=3, warmup=2, clock=clock)
    assert len(calls) == 5 and seen == ["timed"] * 3
    assert stats.samples == (0.5, 0.5, 0.5) and stats.cpu_samples == (0.25, 0.25, 0.25)
    paired = measure_interleaved(lambda: None, lambda: None, repeats=2, warmup=0, clock=clock)
    assert paired.a.samples == paired.b.samples == (0.5, 0.5)


def test_measure_stops_early_after_max_s_with_at_least_two_runs() -> None:
    calls = []
    stats = measure(lambda: calls.append(time.sleep(0.02)), repeats=50, warmup=0, max_s=0.03)
    assert stats.n == 2 and len(calls) == 2  # the second run crossed 0.03 s
    stats = measure(lambda: time.sleep(0.02), repeats=50, warmup=0, max_s=0.0)
    assert stats.n == 2  # never fewer than two, even with no time at all
    assert measure(lambda: None, repeats=4, warmup=0, max_s=60.0).n == 4
