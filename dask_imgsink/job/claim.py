"""The first task of a job: take the output directory, check it against the mode, decide numbering.

Every write task depends on the claim, so nothing is staged before the job
owns the directory. The claim:

1. returns at once if this job already committed (Dask recomputing a lost result);
2. takes the lock (:mod:`~dask_imgsink.job.lock`); finds its own lock when Dask
   reruns it; breaks a dead job's lock; refuses a live or unknown holder, naming it;
3. checks the directory against ``mode`` (:mod:`~dask_imgsink.job.output`);
4. removes staging that no live lock owns (jobs that died before their cleanup);
5. decides where shard and partition numbering start and records it in the lock,
   so a rerun of the claim decides the same even after the commit has begun.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from ..format.index import next_numbers, read_index
from ..format.layout import SUCCESS_FILE, job_dir
from ..format.schema import shard_schema
from ..storage import forget_listings, join, remove_quietly, resolve
from .cleanup import discard_staging, sweep_dead_staging
from .lock import (
    LockInfo,
    aborted_here,
    break_lock,
    liveness,
    locked_error,
    new_lock,
    read_lock,
    release,
    try_claim,
    update_lock,
    wait_briefly,
)
from .options import WriteOptions
from .output import check_output

logger = logging.getLogger("dask_imgsink")


@dataclass(frozen=True)
class Claim:
    """What the claim decided: the lock's run, where numbering starts, or that the job is done."""

    job_id: str
    run_id: str
    first_shard: int
    first_partition: int
    done: bool = False


def committed_job(fs, root: str, job_id: str) -> dict | None:
    """This job's record in the dataset's index, if the job committed (``_SUCCESS`` present)."""
    forget_listings(fs, root)
    if not fs.exists(join(root, SUCCESS_FILE)):
        return None
    try:
        index = read_index(fs, root)
    except ValueError:
        return None
    for job in (index or {}).get("jobs", []):
        if job.get("job_id") == job_id:
            return job
    return None


def _take_lock(fs, root: str, opts: WriteOptions, token: str) -> LockInfo:
    """Hold the directory's lock for this job, or raise :class:`OutputLockedError`."""
    for attempt in range(20):
        holder = read_lock(fs, root)
        if holder is not None and holder.job_id == opts.job_id:
            return holder  # this claim ran before (Dask reran it)
        if holder is None:
            mine = new_lock(opts.job_id, token, opts.mode)
            if try_claim(fs, root, mine):
                return mine
            continue  # another job won the race; look at its lock
        state, why = liveness(holder)
        if state != "dead":
            raise locked_error(opts.url, holder, state, why)
        logger.warning("breaking the lock of %s on %s: %s", holder.describe(), opts.url, why)
        if break_lock(fs, root, holder):
            remove_quietly(fs, job_dir(root, holder.job_id), recursive=True)
        else:
            wait_briefly(attempt)
    raise locked_error(opts.url, holder, "unknown", "the lock kept changing hands while this job tried to take it")


def _let_go_if_stopped(fs, root: str, opts: WriteOptions, lock: LockInfo) -> None:
    """If this process gave up on the job while its claim ran (its local computation failed),
    free the directory and stop.

    Checked after each write of the claim. The give-up sets its flag before it cleans up,
    so either its clean-up sees what the claim wrote, or the claim sees the flag here: a
    lock the claim rewrites after the clean-up released it is released again.
    """
    if aborted_here(opts.job_id):
        release(fs, root, lock.run_id)
        discard_staging(fs, root, opts.job_id)
        raise RuntimeError(f"job {opts.job_id} was stopped: another of its tasks failed")


def claim_output(opts: WriteOptions, token: str) -> Claim:
    """Take the output directory for the job (see the module docstring).

    Raises
    ------
    OutputLockedError
        Another job holds the directory and is not known to be dead.
    FileExistsError, ValueError
        The directory does not suit ``opts.mode`` (nothing was changed).
    """
    fs, root = resolve(opts.url, opts.storage_options)
    done = committed_job(fs, root, opts.job_id)
    if done is not None:
        return Claim(opts.job_id, done.get("run_id", ""), done.get("first_shard", 0),
                     done.get("first_partition", 0), done=True)
    lock = _take_lock(fs, root, opts, token)
    _let_go_if_stopped(fs, root, opts, lock)
    if lock.numbering is None:
        try:
            index = check_output(fs, root, opts.url, opts.mode, shard_schema(opts.user_schema))
            first_shard, first_partition = (0, 0)
            if opts.mode == "append" and index is not None:
                first_shard, first_partition = next_numbers(index, opts.name_prefix)
            sweep_dead_staging(fs, root, opts.job_id, lock.run_id)
            lock = replace(lock, numbering={"first_shard": first_shard, "first_partition": first_partition})
            update_lock(fs, root, lock, job_dir(root, opts.job_id))
        except BaseException:
            release(fs, root, lock.run_id)
            discard_staging(fs, root, opts.job_id)
            raise
        _let_go_if_stopped(fs, root, opts, lock)  # after its last write: the lock rewritten above
    return Claim(opts.job_id, lock.run_id, lock.numbering["first_shard"], lock.numbering["first_partition"])
