"""The process-wide encoder thread pool and an ordered map with a bounded window.

One pool per process (per size), shared by every partition that process writes,
so a Dask worker running several write tasks at once still encodes on a fixed
number of threads. Results come back in input order; at most ``window`` items
are in flight, so memory holds a window of encoded images, never a whole shard.

A pool of one thread is not a pool: the items run on the calling thread, one
at a time in the process. That is what a Dask worker of one thread gets (the
usual ``--nthreads 1`` process per core). Handing each image to another thread
and back cost it two thread wake-ups and GIL hand-offs per image, about 9 % of a
job (``benchmarks/run.py``, LocalCluster 2 x 1).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POOLS: dict[tuple[str, int], Any] = {}  # the pools, and the single-thread lock
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


def _one_at_a_time() -> threading.Lock:
    """This process's lock for encoding on callers' threads, one item at a time."""
    return _per_process(("inline", 1), threading.Lock)


def _process_pool(name: str, size: int) -> ThreadPoolExecutor:
    """This process's pool ``name`` of ``size`` threads, created once."""
    return _per_process((name, size), lambda: ThreadPoolExecutor(size, thread_name_prefix=f"imgsink-{name}-{size}"))


def _per_process(key: tuple[str, int], make: Callable[[], Any]) -> Any:
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
    """Run ``fn`` over ``items`` on the encoder pool; yield finished futures in order.

    Parameters
    ----------
    fn : callable
        Called once per item on a pool thread (with one thread, on the caller's).
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
    if size == 1:
        yield from _map_here(fn, items)
        return
    pool = get_encoder_pool(size)
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


def _map_here(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[Future]:
    """:func:`map_ordered` with one thread: each item runs on the calling thread, one at a time per process."""
    one_at_a_time = _one_at_a_time()
    for item in items:
        fut: Future = Future()
        with one_at_a_time:
            try:
                fut.set_result(fn(item))
            except Exception as exc:
                fut.set_exception(exc)
        yield fut
