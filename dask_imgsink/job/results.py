"""What the job's tasks hand each other, failures included.

A task of ours that fails returns a :class:`TaskFailed` instead of raising, so
the commit, the job's one barrier, always runs: it removes the job's staging,
frees the directory, and then raises the original error. (A task that raises
would stop Dask from ever running the commit, leaving both behind.) The first
failing task also leaves a marker that makes the job's remaining write tasks
return at once, so a failed job still stops early.
"""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..core.writer import SkippedRow, WrittenShard


@dataclass
class PartitionResult:
    """What one write task produced: its shards (or run), its skipped rows, its row count.

    With a key column, ``key_hashes`` holds the XXH3-128 hash of each written
    key and ``written_rows`` its row in the partition, in the order written,
    for the job's duplicate-key check (:mod:`~dask_imgsink.job.unique`).
    """

    partition: int
    rows_in: int
    shards: list[WrittenShard]
    skipped: list[SkippedRow]
    key_hashes: np.ndarray | None = None
    written_rows: np.ndarray | None = None
    #: metadata column -> [values that fit its type, values that do not, why the first did not] (``user_table``)
    fitting: dict[str, list] | None = None

    @property
    def num_images(self) -> int:
        return sum(s.num_images for s in self.shards)


@dataclass
class TaskFailed:
    """A task's error, carried to the commit as a value."""

    where: str
    error: Exception
    trace: str
    cancelled: bool = False

    def reraise(self) -> None:
        if not self.cancelled:
            self.error.add_note(f"(raised by {self.where}; its traceback there:\n{self.trace.rstrip()})")
        raise self.error


def failure(exc: Exception, where: str) -> TaskFailed:
    """Wrap ``exc``; an error that cannot travel between processes is replaced by its text."""
    trace = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return TaskFailed(where, exc, trace)


def cancelled(where: str) -> TaskFailed:
    return TaskFailed(where, RuntimeError(f"{where} was skipped: another task of the job failed"), "",
                      cancelled=True)


def first_failure(items: Iterable) -> TaskFailed | None:
    """The first real failure among ``items`` (else the first cancellation), or ``None``."""
    found = [item for item in items if isinstance(item, TaskFailed)]
    real = [f for f in found if not f.cancelled]
    return (real or found or [None])[0]
