"""Removing what a job staged: after it fails, and on demand (``dask_imgsink.clean``)."""

from __future__ import annotations

import logging
import posixpath
import re
import uuid
from dataclasses import dataclass, field

from ..format.layout import (
    BREAK_PREFIX,
    LEGACY_STAGING_DIR,
    WORK_DIR,
    job_dir,
    jobs_root,
    legacy_staging,
)
from ..storage import forget_listings, join, remove_empty_dir, remove_quietly, resolve
from .lock import (
    OutputLockedError,
    liveness,
    locked_error,
    new_lock,
    read_lock,
    release,
    try_claim,
)

logger = logging.getLogger("dask_imgsink")

#: Temporary small files of releases before 0.2, left in the dataset by a killed commit.
_LEGACY_TMP = re.compile(r"^\.(_SUCCESS|_index\.json|README\.md|_errors\.parquet)\.[0-9a-f]{32}\.tmp$")


def abort_job(url: str, storage_options: dict | None, job_id: str, run_id: str | None) -> None:
    """Remove a failed job's staging and free the directory (its own lock only); never raises."""
    try:
        fs, root = resolve(url, storage_options)
        if run_id is None:  # the lock of this job, whichever run took it
            holder = read_lock(fs, root)
            run_id = holder.run_id if holder is not None and holder.job_id == job_id else None
        if run_id is None:  # it never held the directory: it staged nothing, and must not touch it
            return
        from .commit import finish_job

        finish_job(fs, root, job_id, run_id)
    except Exception:
        logger.warning("could not remove the staging of failed job %s in %s", job_id, url, exc_info=True)


def sweep_dead_staging(fs, root: str, keep_job: str, keep_run: str) -> list[str]:
    """Remove staging of every job but ``keep_job`` (whose lock is held), and stale breaker markers."""
    removed = []
    forget_listings(fs, root)
    jobs = jobs_root(root)
    if fs.exists(jobs):
        for path in fs.ls(jobs, detail=False):
            if posixpath.basename(path.rstrip("/")) != keep_job:
                remove_quietly(fs, path, recursive=True)
                removed.append(path)
    work = join(root, WORK_DIR)
    if fs.exists(work):
        for info in fs.ls(work, detail=True):
            if _stale_in_work(info, keep_run):
                remove_quietly(fs, info["name"])
    return removed


def dead_files_below(root: str, listing: dict[str, dict], keep_job: str, keep_run: str) -> list[str]:
    """What :func:`sweep_dead_staging` removes, chosen from a listing of every file below the work
    folder (``fs.find(work, detail=True)``): the object-store commit lists once and deletes in one batch."""
    jobs, work = jobs_root(root).rstrip("/") + "/", join(root, WORK_DIR).rstrip("/")
    dead = []
    for path, info in listing.items():
        if path.startswith(jobs):
            if path[len(jobs):].split("/", 1)[0] != keep_job:
                dead.append(path)
        elif posixpath.dirname(path) == work and _stale_in_work(info, keep_run):
            dead.append(path)
    return dead


def _stale_in_work(info: dict, keep_run: str) -> bool:
    """Whether a file directly in the work folder is a dead breaker's marker or a lock's leftover content."""
    name = posixpath.basename(info["name"].rstrip("/"))
    if name.startswith(BREAK_PREFIX):
        return name != f"{BREAK_PREFIX}{keep_run}"
    return name.startswith(".") and name.endswith(".part") and _age(info) > 60  # its writer died before linking it


def _age(info: dict) -> float:
    """Seconds since ``info`` (an fsspec listing entry) was modified; 0 when unknown."""
    import time

    modified = info.get("mtime") or info.get("LastModified")
    if modified is None:
        return 0.0
    return time.time() - (modified.timestamp() if hasattr(modified, "timestamp") else float(modified))


def discard_staging(fs, root: str, job_id: str) -> None:
    """Remove a job's staging after the job was given up, and the work folders if they are empty."""
    remove_quietly(fs, job_dir(root, job_id), recursive=True)
    if read_lock(fs, root) is None:
        remove_empty_dir(fs, jobs_root(root))
        remove_empty_dir(fs, join(root, WORK_DIR))


@dataclass
class CleanReport:
    """What :func:`clean` did."""

    removed: list[str] = field(default_factory=list)
    broke_lock: str | None = None


def clean(path: str, *, break_lock: bool = False, storage_options: dict | None = None) -> CleanReport:
    """Remove staging and lock files that no live job owns from a dataset directory.

    Parameters
    ----------
    path : str
        The dataset directory (local path or fsspec URL).
    break_lock : bool, default False
        Also break a lock whose job cannot be shown dead (for example one run
        from another machine). A job known to be running is never broken.
    storage_options : dict, optional
        Passed to fsspec.

    Returns
    -------
    CleanReport

    Raises
    ------
    OutputLockedError
        A job holds the directory and is running, or may be (without ``break_lock``).
    FileNotFoundError
        ``path`` is not a directory.
    """
    fs, root = resolve(path, storage_options)
    forget_listings(fs, root)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{path!r} is not a directory")
    report = CleanReport()
    holder = read_lock(fs, root)
    if holder is not None:
        state, why = liveness(holder)
        if state == "running" or (state == "unknown" and not break_lock):
            raise locked_error(path, holder, state, why)
        from . import lock

        if lock.break_lock(fs, root, holder):
            report.broke_lock = f"{holder.describe()}: {why}"
    # hold the directory while sweeping, so that a job starting now cannot lose its staging
    mine = new_lock(uuid.uuid4().hex, "", "clean")
    if not try_claim(fs, root, mine):
        current = read_lock(fs, root)
        if current is None:
            raise OutputLockedError(f"{path!r} kept changing while clean ran; run clean again")
        raise locked_error(path, current, *liveness(current))
    try:
        report.removed += sweep_dead_staging(fs, root, mine.job_id, mine.run_id)
        remove_empty_dir(fs, jobs_root(root))
        legacy = join(root, LEGACY_STAGING_DIR)
        if legacy_staging(fs, legacy):
            remove_quietly(fs, legacy, recursive=True)
            report.removed.append(legacy)
        for entry in fs.ls(root, detail=False):
            if _LEGACY_TMP.match(posixpath.basename(entry.rstrip("/"))):
                remove_quietly(fs, entry)
                report.removed.append(entry)
    finally:
        release(fs, root, mine.run_id)
        remove_empty_dir(fs, join(root, WORK_DIR))
    return report


__all__ = ["CleanReport", "abort_job", "clean"]
