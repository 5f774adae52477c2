"""What the benchmarks share: median wall time, peak memory of worker processes, peak bytes on disk."""

from __future__ import annotations

import os
import statistics
import threading
import time

import psutil


def write_gathered(path: str, blobs: list[bytes], fsync: bool = False, truncate: bool = True) -> None:
    """Write ``blobs`` to a new file at ``path`` in ``os.writev`` calls of 1,024 buffers: the cheapest
    plain write of many buffers (about half the CPU of one ``write`` each here), so baselines and
    ceilings built on it are not flattered. ``truncate=False`` writes over the file's old bytes,
    in pages the page cache already holds."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0), 0o644)
    try:
        for start in range(0, len(blobs), 1024):
            chunk = blobs[start:start + 1024]
            if os.writev(fd, chunk) != sum(map(len, chunk)):
                raise OSError(f"short write to {path}")
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Sampler:
    """Calls :meth:`sample` every ``interval`` seconds in a background thread while in a ``with`` block."""

    interval = 0.01

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class PeakRSS(_Sampler):
    """Samples the RSS of some processes every 10 ms.

    ``growth``: how far their summed RSS rose above its value at the start;
    ``largest``: the largest RSS any one of them reached; ``largest_each``: per pid.
    """

    def __init__(self, pids: list[int]) -> None:
        super().__init__()
        self.procs = [psutil.Process(p) for p in pids]
        self.base = sum(p.memory_info().rss for p in self.procs)
        self.peak = self.base
        self.largest = 0
        self.largest_each: dict[int, int] = {p.pid: 0 for p in self.procs}

    def sample(self) -> None:
        each = [p.memory_info().rss for p in self.procs]
        self.peak = max(self.peak, sum(each))
        self.largest = max([self.largest, *each])
        for proc, rss in zip(self.procs, each):
            self.largest_each[proc.pid] = max(self.largest_each[proc.pid], rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


class DiskPeak(_Sampler):
    """Samples the bytes below a folder every 20 ms; ``peak`` is the most seen."""

    interval = 0.02

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder, self.peak = folder, 0

    def size(self) -> int:
        total = 0
        for base, _, files in os.walk(self.folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(base, name)).st_size
                except FileNotFoundError:  # removed while we walked
                    pass
        return total

    def sample(self) -> None:
        self.peak = max(self.peak, self.size())
