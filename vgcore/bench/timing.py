"""Timing on a shared machine: one-call timer, ABBA rounds, medians, other processes' load, peak memory.

Every runner runs once as warm-up, then the timed runs come in ABBA order
(all runners in turn, then in reverse), so that a drift in the load from
other processes falls on all of them alike; the number of repeats adapts to
the job's duration (the budget).  :class:`OtherLoad` measures how much of
the machine other processes took meanwhile.

Memory: :func:`measure_peak` runs a call under :mod:`tracemalloc` (NumPy
reports its array allocations to it) and reads the peak resident-set growth
(Linux, ``VmHWM`` after a reset), which also sees C ``malloc`` workspaces.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

#: Runners faster than this get one untimed run before each block of timed runs.
SETTLE_BELOW_S = 1.0
#: Without a fixed repeat count, a runner whose warm-up took longer than this many budgets is timed once.
SLOW_FACTOR = 2.0
#: Other processes' share of the cores above which a job gets a note that the machine was busy.
BUSY_FRACTION = 0.05


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """One call with the garbage collector off (as timeit does): (seconds, result).

    No collection before the call: a full collection walks every object and
    leaves the caches cold (about 1 ms of a 3 ms job); the callers collect
    once per block of runs instead.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        result = function()
        elapsed = time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()
    return elapsed, result


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """The median of each label's timed runs (labels without runs left out)."""
    return {label: statistics.median(values) for label, values in times.items() if values}


class OtherLoad:
    """CPU time other processes take while a block of code runs, as a fraction of the machine.

    The machine's busy time (/proc/stat) minus this process's own CPU time
    (all its threads), over wall time x cores: 0 on a quiet machine, 1 when
    other processes could have had every core.  None where /proc/stat is absent.
    """

    def __enter__(self) -> OtherLoad:
        self.fraction: float | None = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc_info) -> None:
        end = self._sample()
        if self._start is None or end is None:
            return
        (busy0, own0, wall0), (busy1, own1, wall1) = self._start, end
        capacity = (wall1 - wall0) * (os.cpu_count() or 1)
        if capacity > 0:
            self.fraction = min(1.0, max(0.0, ((busy1 - busy0) - (own1 - own0)) / capacity))

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(value) for value in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        own = sum(os.times()[:2])
        return busy, own, time.monotonic()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the (possibly shared) machine was."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except OSError:
        return None


def threads_limited(threads: int | None):
    """Every thread pool (OpenMP: vgcore's kernels and PyTorch; BLAS) held to ``threads``."""
    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


def _read_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure_peak(function: Callable[[], Any]) -> tuple[float, Any, int, int | None]:
    """Run ``function`` once: (seconds, result, peak traced bytes, peak RSS growth in bytes or None).

    Peak traced bytes: tracemalloc's peak above what was traced before the
    call (NumPy arrays included).  Peak RSS growth: ``VmHWM`` after a reset
    minus ``VmRSS`` before the call, which also sees C ``malloc``.
    """
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    traced_before = tracemalloc.get_traced_memory()[0]
    rss_before = _read_status_kib("VmRSS")
    rss_ok = rss_before is not None and reset_peak_rss()
    try:
        elapsed, result = timed(function)
        peak_traced = tracemalloc.get_traced_memory()[1] - traced_before
    finally:
        if not was_tracing:
            tracemalloc.stop()
    peak_rss = None
    if rss_ok:
        high_water = _read_status_kib("VmHWM")
        if high_water is not None:
            peak_rss = max(0, high_water - rss_before) * 1024
    return elapsed, result, peak_traced, peak_rss


def repeat_count(warm_up_s: float, *, budget_s: float, min_repeats: int, max_repeats: int) -> int:
    """Timed runs per runner: the budget over one warm-up round, clipped to [min_repeats, max_repeats]."""
    round_s = max(warm_up_s, 1e-9)
    return int(min(max_repeats, max(min_repeats, budget_s // round_s)))


def abba_blocks(repeats: dict[str, int]) -> list[tuple[str, int]]:
    """(label, runs) blocks: every label in order, then in reverse; ceil and floor of half its repeats."""
    labels = list(repeats)
    return ([(label, (repeats[label] + 1) // 2) for label in labels]
            + [(label, repeats[label] // 2) for label in reversed(labels)])


def time_backends(runners: dict[str, Callable[[], Any]], *, budget_s: float, min_repeats: int,
                  max_repeats: int, repeats: int | None = None, memory_of: Sequence[str] = (),
                  log: Callable[[str], None] = lambda message: None):
    """Warm up every runner once, then time them in ABBA order; returns (times, results, memory).

    The timed runs come in two passes, the runners in order and then in
    reverse, each runner's runs back to back, so that a drift in the load of
    a shared machine falls on all runners alike, and a runner never starts
    with the threads of another still spinning (OpenMP and OpenBLAS workers
    busy-wait a while after their work: before each block of a short runner
    one untimed run absorbs that).

    ``times[label]`` lists the timed runs; ``results[label]`` is the warm-up's
    result; ``memory[label]`` is (peak traced, peak RSS growth) for the labels
    in ``memory_of``, whose warm-up runs under :func:`measure_peak`.  With
    ``repeats`` None the count comes from :func:`repeat_count`, except that a
    runner whose warm-up alone took over SLOW_FACTOR budgets is timed once.
    """
    with _frozen_heap():
        return _time_backends(runners, budget_s=budget_s, min_repeats=min_repeats, max_repeats=max_repeats,
                              repeats=repeats, memory_of=memory_of, log=log)


@contextlib.contextmanager
def _frozen_heap():
    """Objects alive now moved out of the collector's sight, for the duration.

    With PyTorch and JAX imported a full collection walks a few hundred
    thousand objects (0.2-0.5 s); the collections between blocks of timed
    runs then cost far more than a small job.  Nothing alive before the
    timing becomes garbage during it, so freezing it loses nothing.  (Left
    alone where the caller froze objects itself: ``gc.unfreeze`` would
    release theirs too.)
    """
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _time_backends(runners, *, budget_s, min_repeats, max_repeats, repeats, memory_of, log):
    results, memory, warm_up = {}, {}, {}
    for label, runner in runners.items():
        gc.collect()
        if label in memory_of:
            warm_up[label], results[label], *memory[label] = measure_peak(runner)
        else:
            warm_up[label], results[label] = timed(runner)
    counts = dict.fromkeys(runners, repeats)
    if repeats is None:
        count = repeat_count(sum(warm_up.values()), budget_s=budget_s, min_repeats=min_repeats,
                             max_repeats=max_repeats)
        # a row slower than twice the whole budget (a plain reference on a long job) runs once more only
        counts = {label: 1 if warm_up[label] > SLOW_FACTOR * budget_s else count for label in runners}
    runs = ", ".join(f"{label} {count}" for label, count in counts.items())
    log(f"  warm-up round {sum(warm_up.values()):.3g} s; timed runs: {runs}")
    times: dict[str, list[float]] = {label: [] for label in runners}
    for label, count in abba_blocks(counts):
        gc.collect()
        if count and warm_up[label] < SETTLE_BELOW_S:
            timed(runners[label])
        times[label] += [timed(runners[label])[0] for _ in range(count)]
    return times, results, memory
