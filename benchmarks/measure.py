"""What the benchmarks share: median wall time, and peak memory of worker processes."""

from __future__ import annotations

import statistics
import threading
import time

import psutil


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class PeakRSS:
    """Samples the RSS of some processes every 10 ms in a background thread.

    ``growth``: how far their summed RSS rose above its value at the start;
    ``largest``: the largest RSS any one of them reached.
    """

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.base = self._total()
        self.peak = self.base
        self.largest = 0
        self.largest_each: dict[int, int] = {p.pid: 0 for p in self.procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        return sum(p.memory_info().rss for p in self.procs)

    def _run(self) -> None:
        while not self._stop.is_set():
            each = [p.memory_info().rss for p in self.procs]
            self.peak = max(self.peak, sum(each))
            self.largest = max([self.largest, *each])
            for proc, rss in zip(self.procs, each):
                self.largest_each[proc.pid] = max(self.largest_each[proc.pid], rss)
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base
