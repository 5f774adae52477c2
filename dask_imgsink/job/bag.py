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
import weakref
from collections.abc import Mapping

import dask
import dask.bag as db
import dask.threaded
from dask.system import CPU_COUNT
from dask.threaded import ContextAwareThreadPoolExecutor

from .cleanup import abort_job
from .lock import _ACTIVE_LOCK, ACTIVE_LOCAL_JOBS

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


def _abort(tokens: list[str]) -> None:
    for token in tokens:
        opts = _JOBS.get(token)
        if opts is not None:
            abort_job(opts.url, opts.storage_options, opts.job_id, None)


def local_get(dsk, keys, **kwargs):
    """``dask.threaded.get`` that tracks our jobs and cleans up after a failed one."""
    if not isinstance(dsk, Mapping):  # an expression: materialise it once, as dask.local would
        dsk = dsk.__dask_graph__()
    tokens = [t for t in list(_JOBS) if claim_key(t) in dsk]
    own_pool = None
    if tokens and kwargs.get("pool") is None and dask.config.get("pool", None) is None:
        # A pool of this computation's own, so that after a failure we can wait for the
        # tasks still running (dask returns at the first error) before removing staging.
        workers = kwargs.pop("num_workers", None) or dask.config.get("num_workers", None) or CPU_COUNT
        own_pool = ContextAwareThreadPoolExecutor(workers)
        kwargs["pool"] = own_pool
    with _ACTIVE_LOCK:
        ACTIVE_LOCAL_JOBS.update(tokens)
    try:
        return dask.threaded.get(dsk, keys, **kwargs)
    except BaseException:
        if own_pool is not None:
            own_pool.shutdown(wait=True, cancel_futures=True)
        _abort(tokens)
        raise
    finally:
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
    ``WriteBag``; reductions return :class:`WriteItem`. A failed
    ``.compute()`` removes the job's staging and frees the directory,
    whichever scheduler ran it.
    """

    __dask_optimize__ = staticmethod(_delayed_optimize)
    __dask_scheduler__ = staticmethod(local_get)

    def reduction(self, *args, **kwargs):
        out = super().reduction(*args, **kwargs)
        return WriteItem(out.dask, out.key) if isinstance(out, db.Item) else out

    def compute(self, **kwargs):
        try:
            return super().compute(**kwargs)
        except BaseException:
            graph = self.__dask_graph__()
            _abort([t for t in list(_JOBS) if claim_key(t) in graph])
            raise
