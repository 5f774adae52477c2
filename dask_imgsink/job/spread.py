"""Spreading the commit's copies over the cluster's worker processes.

On S3 each published file costs one CopyObject, and what bounds a commit of
many shards is not the store's latency (64 requests are in flight at once) but
the client's CPU: botocore signs, sends and parses each request in Python,
3-6 ms of one core per request on the project's machine, on one event loop
whose thread holds the GIL. A commit of 10,000 shards (30,000 copies) in one
process therefore takes minutes whatever the store. obstore
(:mod:`~dask_imgsink.s3copy`) cuts that to about 0.75 ms a copy, still 20 s of
one core for those 30,000. So when the commit runs on
a ``distributed`` worker and has enough files to give two workers at least
``imgsink.commit-spread-files`` each, it splits them into one share per worker
process (as many as hold that many files) and copies the shares as tasks on
those workers at once, on at most :data:`MAX_SHARES` of them (:data:`MAX_SHARES_OBSTORE`
through obstore, to stay below what S3 takes on one prefix; the commit's own
thread secedes meanwhile, so its worker copies a share too), then waits for all
of them.

Nothing else of the commit changes: copying a staged object to its final name
is idempotent (the staged object stays until the commit is over), so a share
Dask reruns after a worker died, or a whole commit Dask reruns, copies again
and leaves the same objects. A share that fails raises in the commit once
every share has ended, so the commit takes back what it published after the
last copy, not while others still land.
"""

from __future__ import annotations

import uuid

import dask

from ..s3copy import usable
from ..storage import publish_many

#: ``dask.config`` key: the fewest files a worker's share of the commit's copies holds.
SPREAD_FILES_KEY = "imgsink.commit-spread-files"
#: The default: two rounds of the 64 requests a process keeps in flight (about half a second of one
#: core's CPU); a commit of fewer than twice as many files publishes them all from its own process.
DEFAULT_SPREAD_FILES = 128
#: The most workers a commit spreads over. S3 serves about 3,500 writes (CopyObject counts as one) a
#: second per prefix before it answers "503 SlowDown", and one process sends up to about 300 a second
#: through botocore: eight stay below that, so a large cluster cannot throttle its own commit.
MAX_SHARES = 8
#: The same when the copies go through obstore, which sends about 1,300 a second from one process.
MAX_SHARES_OBSTORE = 2


def spread_files_setting() -> int | None:
    """The ``imgsink.commit-spread-files`` setting (``None``: never spread), read where the graph is built,
    since a ``dask.config.set`` in the client does not reach the workers that run the commit."""
    value = dask.config.get(SPREAD_FILES_KEY, DEFAULT_SPREAD_FILES)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"dask config {SPREAD_FILES_KEY}={value!r} must be a whole number of files >= 1, "
                         "or None to publish every file from the commit's own process")
    return value


def _worker_processes() -> list[str]:
    """The addresses of the cluster's workers, this one first, when this runs in a task on a
    ``distributed`` worker; else []."""
    try:
        from distributed import get_client, get_worker

        here = get_worker().address
    except (ImportError, ValueError):
        return []
    return [here, *sorted(set(get_client().nthreads()) - {here})]


def shares_for(moves: list, workers: list[str], spread_files: int | None,
               most: int = MAX_SHARES) -> list[tuple[str, list]]:
    """``(worker, share)`` pairs: as many shares as hold ``spread_files`` files each, at most one per
    worker and ``most``, dealt round robin (equal counts and sizes); ``[]`` when fewer than two."""
    count = 0 if spread_files is None else min(len(moves) // spread_files, len(workers), most)
    if count < 2:
        return []
    return [(worker, moves[i::count]) for i, worker in enumerate(workers[:count])]


def most_shares(fs, fast: bool) -> int:
    """How many workers may copy at once: fewer when each sends through obstore (S3's rate per prefix)."""
    return MAX_SHARES_OBSTORE if fast and usable(fs) else MAX_SHARES


def publish_spread(fs, moves: list[tuple[str, str, int]], spread_files: int | None, fast: bool = True) -> None:
    """:func:`~dask_imgsink.storage.publish_many`, spread over the cluster's worker processes when
    the commit runs on a ``distributed`` worker and at least two of them get ``spread_files`` files.

    Parameters
    ----------
    fs : fsspec filesystem
        An s3fs filesystem (it pickles as its storage options).
    moves : list of (staged, final, size)
    spread_files : int or None
        The fewest files a worker's share holds; ``None`` never spreads.
    fast : bool
        Copy through obstore where it can (:func:`~dask_imgsink.storage.publish_many`).
    """
    enough = spread_files is not None and len(moves) >= 2 * spread_files  # else ask no scheduler for workers
    shares = shares_for(moves, _worker_processes(), spread_files, most_shares(fs, fast)) if enough else []
    if not shares:
        return publish_many(fs, moves, fast)
    from distributed import wait, worker_client

    tag = uuid.uuid4().hex[:12]
    with worker_client() as client:  # secedes: this worker's thread is free for its own share
        futures = [client.submit(publish_many, fs, share, fast, key=f"imgsink-publish-share-{tag}-{i}",
                                 workers=[worker], allow_other_workers=True, pure=False)
                   for i, (worker, share) in enumerate(shares)]
        wait(futures)  # every share ends, failed or not, before the commit goes on (or takes back its copies)
        client.gather(futures)
