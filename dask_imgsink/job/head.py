"""The head of an open shard, written ahead so that no group carries more than a budget of bytes.

An assembly group hands the next one the runs of the shard still open at its end
(:mod:`~dask_imgsink.job.packing`). With large shards, that can be a whole shard in
memory. Once those bytes pass the *carry budget*, the group writes them ahead into
the shard's staged tar, from the start (where they go is known), and hands on a
:class:`Head`: where the bytes are, how many rows they hold, and those rows' index.
A later group writes more after them the same way; the group where the shard ends
writes the rest, the end-of-archive marker, and takes the SHA-256, reading the
head back (:func:`~dask_imgsink.core.tarshard.continue_archive`). Every write is at
a known offset, so a rerun writes the same bytes to the same place.

Only on local and POSIX filesystems: an object cannot be written into, so on
object stores the runs are carried in memory, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import pyarrow as pa

from ..core.argcheck import check_byte_size
from ..core.tarshard import write_members_at
from ..format.layout import new_attempt_dir, staged
from ..storage import is_local, resolve
from .claim import committed_job
from .cleanup import discard_staging
from .lock import aborted_here
from .options import WriteOptions
from .results import TaskFailed, cancelled, failure

#: Bytes of an open shard's runs an assembly group may carry before it writes them ahead,
#: by default, on one worker or without a Client.
DEFAULT_CARRY_BYTES = 64 * 2**20
#: The same on a cluster of several workers. Dask places each group where most of its
#: inputs' bytes are, so carried runs pull the next group to the worker holding them; that
#: worker, busy assembling, falls behind, and the other holds its runs of later groups meanwhile.
DEFAULT_CARRY_BYTES_SEVERAL_WORKERS = 0
CARRY_BYTES_KEY = "imgsink.carry-bytes"


def carry_budget(several_workers: bool = False) -> int | None:
    """The carry budget: ``dask.config`` ``imgsink.carry-bytes`` (bytes, or a string such as
    ``"64 MiB"``; ``None``: never write ahead), read where the graph is built; unset, it
    depends on whether ``several_workers`` will run the job."""
    default = DEFAULT_CARRY_BYTES_SEVERAL_WORKERS if several_workers else DEFAULT_CARRY_BYTES
    value = dask.config.get(CARRY_BYTES_KEY, default)
    try:
        return check_byte_size(f"dask config {CARRY_BYTES_KEY}", value, low=0, optional=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{exc} (the bytes of an open shard's runs an assembly group carries before "
                         "it writes them ahead; None carries every run)") from None


@dataclass(frozen=True)
class Head:
    """The first ``rows`` kept rows of shard ``shard`` (its global index), already in ``path``."""

    shard: int
    path: str  # the shard's staged tar, in the attempt folder of the group that began it
    rows: int
    size: int  # bytes written: whole members, no end-of-archive marker yet
    index: pa.Table  # their rows, at their places in the shard (the shard schema + LAYOUT_COLUMN)
    sources: tuple[int, ...]  # the partitions they came from


def ahead_of(head: Head | None, shard: int) -> tuple[int, int]:
    """Kept rows and bytes of ``shard`` already written ahead (none unless ``head`` is of it)."""
    return (head.rows, head.size) if head is not None and head.shard == shard else (0, 0)


def write_ahead(shard: int, head: Head | None, rows: int, blocks: list, index: pa.Table, sources: list[int],
                opts: WriteOptions) -> Head | None | TaskFailed:
    """Write the open ``shard``'s carried rows (``rows`` of them: ``blocks``, ``index``) after its
    ``head``; return the new head, or ``None`` if nothing was written (an object store: the caller
    carries the runs)."""
    fs, root = resolve(opts.url, opts.storage_options)
    if not is_local(fs) or committed_job(fs, root, opts.job_id) is not None:
        return None  # an object store; or Dask reran this after the commit: nothing will read it
    where = f"writing ahead the first rows of shard {shard}"
    if aborted_here(opts.job_id):
        return cancelled(where)
    start_rows, start = ahead_of(head, shard)
    if head is not None and head.shard == shard:
        path = head.path
    else:
        folder = new_attempt_dir(root, opts.job_id, f"head-{shard:06d}")
        fs.makedirs(folder, exist_ok=True)
        path = staged(folder, f"{opts.exact_stem(shard)}.tar")
    try:
        size = write_members_at(path, start, blocks)
    except Exception as exc:
        return failure(exc, where)
    if aborted_here(opts.job_id):  # the job failed and was cleaned up while this task wrote: leave nothing
        discard_staging(fs, root, opts.job_id)
        return cancelled(where)
    before = [head.index] if start_rows else []
    earlier = head.sources if start_rows else ()
    return Head(shard, path, start_rows + rows, size, pa.concat_tables([*before, index]),
                tuple(sorted({*earlier, *sources})))
