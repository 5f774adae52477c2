"""The process-wide encoder thread pool and an ordered map with a bounded window.

One pool per process (per size), shared by every partition that process writes,
so a Dask worker running several write tasks at once still encodes on a fixed
number of threads. Results come back in input order; at most ``window`` items
are in flight, so memory holds a window of encoded images, never a whole shard.

Threads are not handed work they need not take. When a process has at least
as many callers encoding at once as encoder threads (a Dask worker of one
thread, or N write tasks running on a worker or threaded scheduler of N
threads), each caller encodes its own items on its own thread, at most N at a
time in the process (a caller arriving while the pool still works through
another's window adds to it briefly); the pool serves only the fewer callers it
would otherwise leave cores idle for (one partition alone, the engine-free
stage, the last partition of a job). A caller counts until its iterator is
closed or exhausted, so callers close it even when they fail (``write_rows``).
Handing each image to a pool thread and back costs two thread wake-ups and GIL
hand-offs per image: about 9 % of a job on a LocalCluster of 2 x 1 threads,
4-6 % under the threaded scheduler (``benchmarks/run.py``; the side-by-side
table in ``benchmarks/HISTORY.md``).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POOLS: dict[tuple[str, int], Any] = {}  # the pools, and the callers of each pool size
_POOLS_PID: int | None = None
_LOCK = threading.Lock()


def default_encode_threads() -> int:
    """Encoder threads for this process.

    Inside a Dask worker, the worker's thread count (its share of the machine's
    CPUs, as ``LocalCluster`` or ``dask worker --nthreads`` set it); elsewhere,
    the CPUs this process may run on.
    """
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _pool_size(threads: int | None) -> int:
    size = int(threads) if threads else default_encode_threads()
    if size < 1:
        raise ValueError(f"encode_threads={threads!r} must be at least 1")
    return size


def get_encoder_pool(threads: int | None = None) -> ThreadPoolExecutor:
    """Return this process's encoder pool with ``threads`` threads (created once)."""
    return _process_pool("encode", _pool_size(threads))


class _Callers:
    """This process's callers of :func:`map_ordered` for one pool size, and the slots they encode in."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.count = 0
        self._count_lock = threading.Lock()
        self._slots = threading.Semaphore(size)

    def enter(self) -> None:
        with self._count_lock:
            self.count += 1

    def leave(self) -> None:
        with self._count_lock:
            self.count -= 1

    def crowded(self) -> bool:
        """Whether the callers alone can keep every encoder slot busy."""
        return self.count >= self.size

    def run_here(self, fn: Callable[[T], R], item: T) -> Future:
        """``fn(item)`` on the calling thread, in one of the slots, as a done future."""
        fut: Future = Future()
        with self._slots:
            try:
                fut.set_result(fn(item))
            except Exception as exc:
                fut.set_exception(exc)
        return fut


def _process_pool(name: str, size: int) -> ThreadPoolExecutor:
    """This process's pool ``name`` of ``size`` threads, created once."""
    return per_process((name, size), lambda: ThreadPoolExecutor(size, thread_name_prefix=f"imgsink-{name}-{size}"))


def per_process(key: tuple[str, int], make: Callable[[], Any]) -> Any:
    """What ``make()`` made for ``key`` in this process (again in a forked child, which inherits no threads)."""
    global _POOLS_PID
    with _LOCK:
        if _POOLS_PID != os.getpid():
            _POOLS.clear()
            _POOLS_PID = os.getpid()
        if key not in _POOLS:
            _POOLS[key] = make()
        return _POOLS[key]


def run_beside(fn: Callable[..., R], *args) -> Future:
    """Run ``fn(*args)`` on this process's helper thread (not the encoder pool, whose queue may be long).

    For work that releases the GIL alongside the caller's own, such as hashing
    bytes while the caller writes them.
    """
    return _process_pool("helper", 1).submit(fn, *args)


def map_ordered(
    fn: Callable[[T], R],
    items: Iterable[T],
    threads: int | None = None,
    window: int | None = None,
) -> Iterator[Future]:
    """Run ``fn`` over ``items`` on the encoder threads; yield finished futures in order.

    Parameters
    ----------
    fn : callable
        Called once per item: on a pool thread, or on the caller's own thread
        while this process has at least ``threads`` callers (see the module's
        docstring).
    items : iterable
        Consumed lazily: at most ``window`` items are submitted ahead of the consumer.
    threads : int, optional
        Pool size; default :func:`default_encode_threads`.
    window : int, optional
        Items in flight at most; default four per thread.

    Yields
    ------
    concurrent.futures.Future
        Done futures, in the order of ``items``; call ``.result()`` to get the value
        or the exception ``fn`` raised.
    """
    size = _pool_size(threads)
    callers = per_process(("callers", size), lambda: _Callers(size))
    window = window or 4 * size
    pending: deque[Future] = deque()
    callers.enter()
    try:
        for item in items:
            if callers.crowded():
                yield from _drain(pending)  # earlier items first: order is kept
                yield callers.run_here(fn, item)
                continue
            pending.append(get_encoder_pool(size).submit(fn, item))
            if len(pending) >= window:
                yield _waited(pending.popleft())
        yield from _drain(pending)
    finally:
        callers.leave()
        for fut in pending:
            fut.cancel()


def _waited(fut: Future) -> Future:
    fut.exception()  # wait, without raising
    return fut


def _drain(pending: deque[Future]) -> Iterator[Future]:
    while pending:
        yield _waited(pending.popleft())
