"""The process-wide encoder thread pool and an ordered map with a bounded window.

One pool per process (per size), shared by every partition that process writes,
so a Dask worker running several write tasks at once still encodes on a fixed
number of threads. Results come back in input order; at most ``window`` items
are in flight, so memory holds a window of encoded images, never a whole shard.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}
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


def get_encoder_pool(threads: int | None = None) -> ThreadPoolExecutor:
    """Return this process's encoder pool with ``threads`` threads (created once)."""
    size = int(threads) if threads else default_encode_threads()
    if size < 1:
        raise ValueError(f"encode_threads={threads!r} must be at least 1")
    return _process_pool("encode", size)


def _process_pool(name: str, size: int) -> ThreadPoolExecutor:
    """This process's pool ``name`` of ``size`` threads, created once (again in a forked child)."""
    global _POOLS_PID
    with _LOCK:
        if _POOLS_PID != os.getpid():  # a forked child does not inherit the threads
            _POOLS.clear()
            _POOLS_PID = os.getpid()
        pool = _POOLS.get((name, size))
        if pool is None:
            pool = ThreadPoolExecutor(size, thread_name_prefix=f"imgsink-{name}-{size}")
            _POOLS[(name, size)] = pool
        return pool


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
    """Run ``fn`` over ``items`` on the encoder pool; yield finished futures in order.

    Parameters
    ----------
    fn : callable
        Called once per item on a pool thread.
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
    pool = get_encoder_pool(threads)
    window = window or 4 * pool._max_workers
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                fut = pending.popleft()
                fut.exception()  # wait
                yield fut
        while pending:
            fut = pending.popleft()
            fut.exception()
            yield fut
    finally:
        for fut in pending:
            fut.cancel()
