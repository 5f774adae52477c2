"""``WriteBag``: the lazy result of ``to_webdataset``, computed on threads by default.

A plain Bag defaults to the multiprocessing scheduler, which would ship every
partition of images to subprocesses; ours runs on threads unless a
``distributed.Client`` (or ``scheduler=``) says otherwise.

Its local scheduler also knows which jobs it is computing: while it runs a job,
the job's lock counts as live (see :mod:`~dask_imgsink.job.lock`), and when the
computation fails for any reason, upstream errors included, the job's staging
and lock are removed before the error reaches the caller. Under ``distributed``
the job's own commit does that for errors of our tasks, and the next job on the
directory (asking the scheduler) for anything else.
"""

from __future__ import annotations

import importlib
import threading
import weakref
from collections.abc import Mapping

import dask
import dask.bag as db
import dask.threaded
from dask.callbacks import Callback
from dask.system import CPU_COUNT
from dask.threaded import ContextAwareThreadPoolExecutor

from .cleanup import abort_job
from .lock import _ACTIVE_LOCK, ABORTED_LOCAL_JOBS, ACTIVE_LOCAL_JOBS

#: Jobs built in this process, by graph token (their graphs keep them alive).
_JOBS: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()

# Bag's own graph optimisation (linear fusion) breaks graphs built over a
# ``dd.from_delayed`` DataFrame with dask 2026.8 ("Missing dependency
# ('fromdelayed-...')", or a cycle under distributed), while Delayed's (cull only)
# computes them fine; our collections use Delayed's for every source.
_delayed_optimize = importlib.import_module("dask.delayed").optimize


def claim_key(token: str) -> str:
    return f"imgsink-claim-{token}"


def register_job(token: str, opts) -> None:
    _JOBS[token] = opts
    _TRACKER.register()  # again: dask's local schedulers can drop global callbacks when run concurrently


def _abort(tokens: list[str]) -> None:
    jobs = [opts for opts in (_JOBS.get(t) for t in tokens) if opts is not None]
    with _ACTIVE_LOCK:
        ABORTED_LOCAL_JOBS.update(opts.job_id for opts in jobs)  # first: tasks finishing now see it
    for opts in jobs:
        abort_job(opts.url, opts.storage_options, opts.job_id, None)


def _tokens_in(dsk) -> list[str]:
    return [t for t in list(_JOBS) if claim_key(t) in dsk]


_MANAGED = threading.local()


class _LocalJobTracker(Callback):
    """The same for jobs computed on dask's own local schedulers (``scheduler="threads"`` or ``"sync"``).

    Registered once for the process; it acts only on graphs holding a job
    built here, and stays out of :func:`local_get`'s way. After a failure it
    cannot wait for tasks still running in dask's shared pool; a task of ours
    finishing after the clean-up leaves its files under ``.imgsink``, which the
    next job removes.
    """

    def _start(self, dsk) -> None:
        if not getattr(_MANAGED, "on", False):
            with _ACTIVE_LOCK:
                ACTIVE_LOCAL_JOBS.update(_tokens_in(dsk))

    def _finish(self, dsk, state, failed) -> None:
        if getattr(_MANAGED, "on", False):
            return
        tokens = _tokens_in(dsk)
        if failed:
            _abort(tokens)
        with _ACTIVE_LOCK:
            ACTIVE_LOCAL_JOBS.difference_update(tokens)


_TRACKER = _LocalJobTracker()
_TRACKER.register()


def local_get(dsk, keys, **kwargs):
    """``dask.threaded.get`` that tracks our jobs and cleans up after a failed one."""
    if not isinstance(dsk, Mapping):  # an expression: materialise it once, as dask.local would
        dsk = dsk.__dask_graph__()
    if kwargs.get("pool") is not None or dask.config.get("pool", None) is not None:
        # the caller's pool: we cannot wait for its tasks after a failure (the tracker does what it can)
        return dask.threaded.get(dsk, keys, **kwargs)
    tokens = _tokens_in(dsk)
    own_pool = None
    if tokens:
        # A pool of this computation's own, so that after a failure we can wait for the
        # tasks still running (dask returns at the first error) before removing staging.
        workers = kwargs.pop("num_workers", None) or dask.config.get("num_workers", None) or CPU_COUNT
        own_pool = ContextAwareThreadPoolExecutor(workers)
        kwargs["pool"] = own_pool
    with _ACTIVE_LOCK:
        ACTIVE_LOCAL_JOBS.update(tokens)
    _MANAGED.on = True
    try:
        return dask.threaded.get(dsk, keys, **kwargs)
    except BaseException:
        if own_pool is not None:
            own_pool.shutdown(wait=True, cancel_futures=True)
        _abort(tokens)
        raise
    finally:
        _MANAGED.on = False
        if own_pool is not None:
            own_pool.shutdown(wait=False)
        with _ACTIVE_LOCK:
            ACTIVE_LOCAL_JOBS.difference_update(tokens)


class WriteItem(db.Item):
    """A reduction of a :class:`WriteBag` (``count()``, ``sum()``, ...), optimised the same way."""

    __dask_optimize__ = staticmethod(_delayed_optimize)
    __dask_scheduler__ = staticmethod(local_get)


class WriteBag(db.Bag):
    """A ``dask.bag.Bag`` of :class:`~dask_imgsink.FileGroupTask` that computes on threads by default.

    Under a ``distributed.Client`` (or with ``scheduler=``) the usual rules
    apply and the cluster runs it. Methods that return Bags return
    ``WriteBag``; reductions return :class:`WriteItem`.

    Nothing is cleaned up from the client under ``distributed``: tasks the
    scheduler releases after a failure, the commit among them, run on to their
    end on the workers, and removing their staging beneath them would break a
    commit in flight. The job's commit cleans up after its own tasks' errors;
    for anything else (a worker lost too often, the user's own partition
    function failing) the next job asks the scheduler and takes over.
    """

    __dask_optimize__ = staticmethod(_delayed_optimize)
    __dask_scheduler__ = staticmethod(local_get)

    def reduction(self, *args, **kwargs):
        out = super().reduction(*args, **kwargs)
        return WriteItem(out.dask, out.key) if isinstance(out, db.Item) else out
