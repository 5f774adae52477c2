"""Duplicate sample keys across partitions: found from 16-byte key hashes, decided in row order.

Each write task returns the XXH3-128 hash of every key it wrote (16 bytes a
row, so a plan task holds 10 million rows' hashes in 160 MB; a collision
between different keys is about as likely as 10^-25). The first written row of
a key in row order is kept (a row left out for another reason takes no key); a
later one is a duplicate:

- ``unique_keys="shard"``: only a duplicate that would land in the same shard as
  an earlier copy (WebDataset readers would merge the two samples);
- ``unique_keys="dataset"``: any duplicate in the job, or of a key already in the
  dataset when appending.

With exact packing the plan drops duplicates before it cuts shards, so each
shard still holds exactly ``images_per_tar`` images; ``on_error="skip"``
records them, ``"raise"`` fails the job naming both rows. Within one
partition the writer itself finds duplicates, as bad rows, except under
``"shard"`` with exact packing: only the plan knows where the shards are cut, so
it decides for every row, within a partition as across (see
:func:`~dask_imgsink.job.write._repeat_rule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import xxhash

from ..core.tarshard import content_limit
from ..core.writer import SkippedRow
from ..errors import BadRowError
from ..format.index import read_index
from ..format.layout import index_layout, parquet_name
from ..storage import join, resolve

UNIQUE_KEYS_CHOICES = ("dataset", "shard")


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """The XXH3-128 hash of each key, as an ``(n, 2)`` uint64 array."""
    digest = b"".join(xxhash.xxh3_128_digest(k.encode("utf-8")) for k in keys)
    return np.frombuffer(digest, dtype=np.uint64).reshape(-1, 2) if keys else np.zeros((0, 2), np.uint64)


def duplicate_groups(hashes: np.ndarray) -> list[np.ndarray]:
    """Positions of rows sharing a hash, one ascending array per key seen more than once."""
    n = len(hashes)
    if n < 2:
        return []
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))  # stable: equal keys stay in row order
    ordered = hashes[order]
    same = np.all(ordered[1:] == ordered[:-1], axis=1)
    if not same.any():
        return []
    starts = np.flatnonzero(np.r_[True, ~same])
    bounds = np.r_[starts, n]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b - a > 1]


@dataclass(frozen=True)
class Duplicate:
    """Row ``position`` repeats the key of row ``first`` (positions in job row order; ``first`` < 0: in the dataset)."""

    position: int
    first: int


def find_duplicates(hashes: np.ndarray, policy: str, images_per_tar: int,
                    existing: np.ndarray | None = None, sizes: np.ndarray | None = None,
                    max_shard_bytes: int | None = None) -> list[Duplicate]:
    """The rows to leave out so that keys are unique per ``policy``, in row order.

    ``existing`` holds the hashes of keys already in the dataset (appending);
    they count only for ``"dataset"``. With ``max_shard_bytes``, ``sizes`` holds
    each row's tar bytes, and shards are cut as :func:`~dask_imgsink.job.packing.cut_shards` cuts them.
    """
    offset = 0 if existing is None or policy != "dataset" else len(existing)
    combined = hashes if offset == 0 else np.concatenate([existing, hashes])
    groups = duplicate_groups(combined)
    if not groups:
        return []
    if policy == "dataset":
        found = [Duplicate(int(p) - offset, int(g[0]) - offset) for g in groups for p in g[1:]
                 if p >= offset]
        return sorted(found, key=lambda d: d.position)
    if max_shard_bytes is not None:
        return _same_shard_duplicates_by_bytes(groups, sizes, images_per_tar, content_limit(max_shard_bytes))
    return _same_shard_duplicates(groups, images_per_tar)


def _same_shard_duplicates_by_bytes(groups: list[np.ndarray], sizes: np.ndarray, images_per_tar: int,
                                    limit: int) -> list[Duplicate]:
    """The same walk when shards are also cut by bytes: every row's size moves the cuts, so every row is walked."""
    group_of = {int(p): gi for gi, g in enumerate(groups) for p in g}
    in_shard: dict[int, int] = {}  # group -> position of its copy in the open shard
    found: list[Duplicate] = []
    count = content = 0
    for position, size in enumerate(sizes.tolist()):
        if count and (count >= images_per_tar or content + size > limit):
            in_shard, count, content = {}, 0, 0  # this row would start the next shard
        group = group_of.get(position)
        if group is not None and group in in_shard:
            found.append(Duplicate(position, in_shard[group]))
            continue
        count, content = count + 1, content + size
        if group is not None:
            in_shard[group] = position
    return found


def _same_shard_duplicates(groups: list[np.ndarray], images_per_tar: int) -> list[Duplicate]:
    """Walk the rows of duplicate groups in row order, dropping a row whose key is already in its shard.

    A dropped row moves every later row one place earlier, so each row's shard is
    computed from its position minus the rows dropped before it.
    """
    group_of = {int(p): gi for gi, g in enumerate(groups) for p in g}
    kept_in: dict[int, tuple[int, int]] = {}  # group -> (shard, position) of its last kept row
    found: list[Duplicate] = []
    for position in sorted(group_of):
        shard = (position - len(found)) // images_per_tar
        group = group_of[position]
        last = kept_in.get(group)
        if last is not None and last[0] == shard:
            found.append(Duplicate(position, last[1]))
        else:
            kept_in[group] = (shard, position)
    return found


# --------------------------------------------------------------------------- a group's check, from what came before


class KeyLog:
    """The hash of every key kept so far, with where its first copy is (partition, row; -1: in the dataset).

    Held as sorted chunks, merged when one is no more than twice the size of the next:
    adding ``n`` keys costs ``O(n log n)``, and looking up a group's keys
    ``O(k log n)``, so the keys of a job of any size are checked group by group
    in ``O(n log n)`` in all (re-sorting every key so far at every group was
    ``O(groups x n log n)``). Immutable: :meth:`adding` returns a new log sharing
    the old chunks, so a task Dask reruns from the same input finds it unchanged.
    """

    def __init__(self, chunks: tuple = ()) -> None:
        self.chunks = chunks  # each (hashes (n, 2) sorted by (high, low), partitions, rows)

    def adding(self, hashes: np.ndarray, partitions: np.ndarray, rows: np.ndarray) -> KeyLog:
        """This log with ``hashes`` added (their first copies at ``partitions``, ``rows``)."""
        if not len(hashes):
            return self
        chunks = [*self.chunks, _sorted_chunk(hashes, partitions, rows)]
        while len(chunks) > 1 and len(chunks[-2][0]) <= 2 * len(chunks[-1][0]):
            newer, older = chunks.pop(), chunks.pop()
            chunks.append(_sorted_chunk(*(np.concatenate(pair) for pair in zip(older, newer))))
        return KeyLog(tuple(chunks))

    def first_copies(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The partition and row of each hash's first copy; partition -2 where the key is new."""
        partitions = np.full(len(hashes), -2, np.int64)
        rows = np.zeros(len(hashes), np.int64)
        for known, known_partitions, known_rows in self.chunks:
            lo = np.searchsorted(known[:, 0], hashes[:, 0], "left")
            hi = np.searchsorted(known[:, 0], hashes[:, 0], "right")
            for q in np.flatnonzero(hi > lo):  # the high 64 bits match: a duplicate, or (rarely) only those bits
                same = np.flatnonzero(known[lo[q]:hi[q], 1] == hashes[q, 1])
                if len(same):
                    partitions[q], rows[q] = known_partitions[lo[q] + same[0]], known_rows[lo[q] + same[0]]
        return partitions, rows


def _sorted_chunk(hashes: np.ndarray, partitions: np.ndarray, rows: np.ndarray) -> tuple:
    order = np.lexsort((hashes[:, 1], hashes[:, 0]))
    return hashes[order], np.asarray(partitions, np.int64)[order], np.asarray(rows, np.int64)[order]


def dataset_log(existing: np.ndarray | None) -> KeyLog:
    """A log holding the keys already in the dataset (``existing``, when appending), before the job's."""
    if existing is None or not len(existing):
        return KeyLog()
    minus_one = np.full(len(existing), -1, np.int64)
    return KeyLog().adding(existing, minus_one, minus_one)


class _NewRows:
    """The rows of a group's new runs, in order: their hashes, and each one's run and partition row."""

    def __init__(self, results: list) -> None:
        self.hashes = np.concatenate([r.key_hashes for r in results]) if results else np.zeros((0, 2), np.uint64)
        self.starts = np.cumsum([0] + [len(r.key_hashes) for r in results])
        self.partitions = np.repeat([r.partition for r in results], np.diff(self.starts)).astype(np.int64)
        self.rows = (np.concatenate([np.asarray(r.written_rows, np.int64) for r in results]) if results
                     else np.zeros(0, np.int64))

    def locate(self, position: int) -> tuple[int, int]:
        """(index of the result, row in its run) of row ``position``."""
        i = int(np.searchsorted(self.starts, position, side="right")) - 1
        return i, position - int(self.starts[i])


def drop_new_duplicates(plan, first_new_run: int, new_results: list, opts, keys: KeyLog | None,
                        open_shard: tuple[np.ndarray, np.ndarray, list, int, int] | None = None) -> KeyLog | None:
    """Leave out the duplicate keys among a group's new runs, decided from the rows before them only.

    ``plan.runs[first_new_run:]`` are the runs of ``new_results``. ``unique_keys="dataset"``:
    ``keys`` holds every key kept before them; returns it with theirs added.
    ``"shard"``: ``open_shard`` is (hashes, sizes, their (partition, row)s, count, bytes) of the
    kept rows of the shard still open before them. Same decisions as :func:`drop_duplicate_keys`
    over the whole prefix: a row is decided by the rows before it.
    """
    if opts.key_column is None:
        return keys
    new = _NewRows(new_results)
    if opts.unique_keys == "dataset":
        found = _dataset_duplicates(new, keys)
    else:
        found = _open_shard_duplicates(new, plan, first_new_run, opts, open_shard)
    left_out = set()
    for position, first in found:
        result, run_row = new.locate(position)
        _leave_out(plan, first_new_run + result, run_row, int(new.partitions[position]), int(new.rows[position]),
                   first, opts)
        left_out.add(position)
    if opts.unique_keys != "dataset":
        return keys
    kept = np.array([i not in left_out for i in range(len(new.hashes))], dtype=bool)
    return keys.adding(new.hashes[kept], new.partitions[kept], new.rows[kept])


def _dataset_duplicates(new: _NewRows, keys: KeyLog) -> list[tuple[int, tuple[int, int]]]:
    """(position, first copy) of each new row whose key was kept before it, in row order."""
    partitions, rows = keys.first_copies(new.hashes)
    found = {int(i): (int(partitions[i]), int(rows[i])) for i in np.flatnonzero(partitions != -2)}
    for group in duplicate_groups(new.hashes):
        head = int(group[0])
        first = found.get(head, (int(new.partitions[head]), int(new.rows[head])))
        found.update((int(p), first) for p in group[1:])
    return sorted(found.items())


def _open_shard_duplicates(new: _NewRows, plan, first_new_run: int, opts,
                           open_shard) -> list[tuple[int, tuple[int, int]]]:
    """(position, first copy) of each new row whose key is already in its shard: the shards are
    walked from the one still open, cut by count (and bytes) as :func:`~dask_imgsink.job.packing.cut_shards` cuts."""
    hashes, sizes, places, count, content = open_shard
    in_shard = {h.tobytes(): place for h, place in zip(hashes, places)}
    limit = None if opts.max_shard_bytes is None else content_limit(opts.max_shard_bytes)
    new_sizes = [size for _, run in plan.runs[first_new_run:] for size in run.sample_sizes]
    found = []
    for position, size in enumerate(new_sizes):
        if count and (count >= opts.images_per_tar or (limit is not None and content + size > limit)):
            in_shard, count, content = {}, 0, 0  # this row starts the next shard
        key = new.hashes[position].tobytes()
        if key in in_shard:
            found.append((position, in_shard[key]))
            continue
        in_shard[key] = (int(new.partitions[position]), int(new.rows[position]))
        count, content = count + 1, content + size
    return found


# --------------------------------------------------------------------------- the job's check


def existing_key_hashes(fs, root: str, job_id: str) -> np.ndarray | None:
    """Hashes of the keys of the dataset in ``root`` (read from its Parquet ``key`` columns), or ``None``.

    Shards of job ``job_id`` itself are left out: Dask may rerun the check after
    that job committed.
    """
    index = read_index(fs, root)
    if not index or not index.get("shardlist"):
        return None
    own = [job.get("shard_range", [0, 0]) for job in index.get("jobs", []) if job.get("job_id") == job_id]
    layout = index_layout(index)
    keys: list[str] = []
    for position, entry in enumerate(index["shardlist"]):
        if any(lo <= position < hi for lo, hi in own):
            continue
        with fs.open(join(root, parquet_name(entry["url"], layout)), "rb") as f:
            keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    return key_hashes(keys)


def needs_dataset_keys(opts) -> bool:
    """Whether the job checks its keys against the keys already in the dataset."""
    return opts.key_column is not None and opts.unique_keys == "dataset" and opts.mode == "append"


def dataset_key_hashes(claim, opts) -> np.ndarray | None:
    """The job's one read of the dataset's keys (its own task, shared by the plans), or ``None`` when not needed."""
    if claim.done or not needs_dataset_keys(opts):
        return None
    fs, root = resolve(opts.url, opts.storage_options)
    return existing_key_hashes(fs, root, opts.job_id)


def _run_key(run, row: int) -> str:
    """The key of row ``row`` of a run (its keys travel with its summary)."""
    keys = run.run_keys if run.run_keys is not None else run.run_index.column("key")
    return keys[row].as_py()


def drop_duplicate_keys(plan, results: list, opts, existing: np.ndarray | None) -> None:
    """Leave duplicate keys out of ``plan`` (recorded as skipped), or raise for the first one.

    ``results`` are the write results whose runs are ``plan.runs``, in order;
    ``existing`` the hashes of the keys already in the dataset (:func:`dataset_key_hashes`).

    Raises
    ------
    BadRowError
        A duplicate, with ``on_error="raise"``; names both rows.
    """
    if opts.key_column is None:
        return  # generated keys are unique in the dataset by construction
    hashes = [r.key_hashes for r in results]
    if not hashes:
        return
    sizes = None
    if opts.max_shard_bytes is not None and opts.unique_keys == "shard":
        sizes = np.concatenate([np.asarray(run.sample_sizes, np.int64) for _, run in plan.runs])
    found = find_duplicates(np.concatenate(hashes), opts.unique_keys, opts.images_per_tar, existing, sizes,
                            opts.max_shard_bytes)
    if not found:
        return
    where = _Locator(results)
    for dup in found:
        run, run_row = where.run_row(dup.position)
        partition, row = where.partition_row(dup.position)
        first = (-1, -1) if dup.first < 0 else where.partition_row(dup.first)
        _leave_out(plan, run, run_row, partition, row, first, opts)


def _duplicate_reason(first: tuple[int, int], policy: str) -> str:
    """Why a row is left out whose key's first copy is at ``first`` (partition, row; partition -1: in the dataset)."""
    if first[0] < 0:
        reason = "the key is already in the dataset this job appends to"
    else:
        reason = f"the key is used twice (first at partition {first[0]}, row {first[1]})"
    if policy == "shard":
        reason += "; both would land in one shard, where WebDataset readers would merge the two samples"
    return reason


def _leave_out(plan, run: int, run_row: int, partition: int, row: int, first: tuple[int, int], opts) -> None:
    """Leave row ``run_row`` of ``plan``'s run ``run`` out as a duplicate key (recorded), or raise for it."""
    key = _run_key(plan.runs[run][1], run_row)
    reason = _duplicate_reason(first, opts.unique_keys)
    if opts.on_error == "raise":
        raise BadRowError(reason, fix=DUPLICATE_FIX, partition=partition, row=row, key=key, column=opts.key_column)
    plan.skipped.append(SkippedRow(partition, row, key, reason, opts.key_column))
    plan.dropped.setdefault(run, []).append(run_row)


DUPLICATE_FIX = ("make keys unique, e.g. ddf = ddf.drop_duplicates(subset='key'); on_error='skip' leaves "
                 "later copies out and records them; unique_keys='shard' only requires keys unique per shard")

#: on_error="skip" cannot help a per-partition job: its shards are written when the repeat is found.
PER_PARTITION_DUPLICATE_FIX = ("make keys unique, e.g. ddf = ddf.drop_duplicates(subset='key'); use "
                               "packing='exact', where on_error='skip' leaves later copies out and records them; "
                               "or unique_keys='shard', which only requires keys unique per shard")


class _Locator:
    """Job row position -> (run, row in run) and -> (partition, row in partition)."""

    def __init__(self, results: list) -> None:
        self.starts = np.cumsum([0] + [len(r.key_hashes) for r in results])
        self.results = results

    def _find(self, position: int) -> tuple[int, int]:
        i = int(np.searchsorted(self.starts, position, side="right")) - 1
        return i, position - int(self.starts[i])

    def run_row(self, position: int) -> tuple[int, int]:
        return self._find(position)

    def partition_row(self, position: int) -> tuple[int, int]:
        i, offset = self._find(position)
        return self.results[i].partition, int(self.results[i].written_rows[offset])

    def reason(self, dup: Duplicate) -> str:
        """Why ``dup`` is left out, naming the first copy."""
        return _duplicate_reason((-1, -1) if dup.first < 0 else self.partition_row(dup.first), "dataset")


def cross_partition_duplicate(results: list, opts) -> BadRowError | None:
    """With per-partition packing and ``unique_keys="dataset"``: the first key repeated across partitions.

    Each partition's shards are already written, so a duplicate cannot be left
    out: it fails the job whatever ``on_error`` says.
    """
    if opts.key_column is None or opts.unique_keys != "dataset":
        return None
    results = [r for r in results if r.key_hashes is not None and len(r.key_hashes)]
    if not results:
        return None
    fs, root = resolve(opts.url, opts.storage_options)
    existing = existing_key_hashes(fs, root, opts.job_id) if opts.mode == "append" else None
    found = find_duplicates(np.concatenate([r.key_hashes for r in results]), "dataset", opts.images_per_tar,
                            existing)
    if not found:
        return None
    where = _Locator(results)
    dup = found[0]
    partition, row = where.partition_row(dup.position)
    return BadRowError(
        f"{where.reason(dup)}; with packing='per_partition' the shards are written independently, so the copy "
        "cannot be left out, whatever on_error says", fix=PER_PARTITION_DUPLICATE_FIX,
        partition=partition, row=row, column=opts.key_column)
