"""Local Dask clusters for our CLI and benchmarks, with the worker setting our encoder wants.

Dask's nanny starts each worker process with ``MALLOC_TRIM_THRESHOLD_=65536``, so
glibc hands freed memory back to the OS after every large free. Encoding frees
and allocates large buffers for every image: measured here (1,000 photographs
512x512, JPEG q92, 2 encoder threads, medians of 2), a worker encoded in 0.47-0.50 s
with it and 0.40-0.41 s with 16 MiB, as fast as a plain process (0.39-0.41 s);
128 KiB was as slow as 64 KiB. 16 MiB keeps at most that much freed memory per
process. For your own clusters, set the same before they start::

    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 16 * 2**20})

or start ``dask worker`` with ``MALLOC_TRIM_THRESHOLD_=16777216`` in its environment
(the nanny keeps a variable already set). Not
``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_``: Dask lower-cases
the names of ``DASK_*`` variables, so that sets ``malloc_trim_threshold_``, which glibc
ignores (``tests/test_deployed_cluster.py`` checks what the workers get).

The nanny sets its ``pre-spawn-environ`` variables in *its own* process's
``os.environ`` before spawning, and leaves them there; it also prefers a value
already in ``os.environ`` to its config. So in one Python process the first
cluster's setting silently applied to every later one: a plain ``LocalCluster``
started first gave ours 65536, and ours gave later plain clusters 16 MiB (which
made an earlier benchmark row "with the nanny's default" run with ours).
:func:`local_cluster` therefore sets the variable only while its workers start,
and restores the process's own value afterwards.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import dask

#: glibc's trim threshold for our worker processes (see the module docstring).
MALLOC_TRIM_THRESHOLD = 16 * 2**20

WORKER_ENVIRON = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD)}


def local_cluster(**kwargs):
    """A ``distributed.LocalCluster`` of worker processes with :data:`WORKER_ENVIRON`, no dashboard, no fixed port."""
    from distributed import LocalCluster

    kwargs.setdefault("processes", True)
    kwargs.setdefault("dashboard_address", None)
    if kwargs["dashboard_address"] is None:
        # With no dashboard the scheduler still serves its HTTP routes (health, metrics), on
        # port 8787 by default: "Port 8787 is already in use" whenever another cluster runs.
        scheduler_kwargs = dict(kwargs.get("scheduler_kwargs") or {})
        scheduler_kwargs.setdefault("dashboard_address", "127.0.0.1:0")
        kwargs["scheduler_kwargs"] = scheduler_kwargs
    kwargs.setdefault("silence_logs", logging.ERROR)
    with dask.config.set(WORKER_ENVIRON), _environ("MALLOC_TRIM_THRESHOLD_", str(MALLOC_TRIM_THRESHOLD)):
        return LocalCluster(**kwargs)


@contextmanager
def _environ(name: str, value: str):
    """``os.environ[name] = value`` inside, this process's own value (or none) again after."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
