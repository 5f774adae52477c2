"""Duplicate sample keys across partitions: found from 16-byte key hashes, decided in row order.

Each write task returns the XXH3-128 hash of every key it wrote (16 bytes a
row, so a plan task holds 10 million rows' hashes in 160 MB; a collision
between different keys is about as likely as 10^-25). The first occurrence of
a key in row order is kept; a later one is a duplicate:

- ``unique_keys="shard"``: only a duplicate that would land in the same shard as
  an earlier copy (WebDataset readers would merge the two samples);
- ``unique_keys="dataset"``: any duplicate in the job, or of a key already in the
  dataset when appending.

With exact packing the plan drops duplicates before it cuts shards, so each
shard still holds exactly ``images_per_tar`` images; ``on_error="skip"``
records them, ``"raise"`` fails the job naming both rows. Within one
partition the writer itself finds duplicates, as bad rows.
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
        key = _run_key(plan.runs[run][1], run_row)
        reason = where.reason(dup)
        if opts.unique_keys == "shard":
            reason += "; both would land in one shard, where WebDataset readers would merge the two samples"
        if opts.on_error == "raise":
            raise BadRowError(reason, fix=DUPLICATE_FIX, partition=partition, row=row, key=key,
                              column=opts.key_column)
        plan.skipped.append(SkippedRow(partition, row, key, reason, opts.key_column))
        plan.dropped.setdefault(run, []).append(run_row)


DUPLICATE_FIX = ("make keys unique, e.g. ddf = ddf.drop_duplicates(subset='key'); on_error='skip' leaves "
                 "later copies out and records them; unique_keys='shard' only requires keys unique per shard")


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
        if dup.first < 0:
            return "the key is already in the dataset this job appends to"
        partition, row = self.partition_row(dup.first)
        return f"the key is used twice (first at partition {partition}, row {row})"


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
        "cannot be left out", fix=DUPLICATE_FIX + "; or use packing='exact', which can skip it",
        partition=partition, row=row, column=opts.key_column)
