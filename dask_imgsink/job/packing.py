"""Exact packing: per-partition runs in memory -> contiguous shards of exactly N images.

Each write task encodes its partition once into a *run*: its samples' tar bytes
(one block per sample) and a small Arrow table of their offsets, sizes and
metadata, kept in memory as the task's result (no file). Each assembly task (one
per group of contiguous partitions, :func:`assemble_group`) waits only for its
own write tasks and the group before it, which hands it a :class:`Carry`: the
summaries of every write so far (counts, sizes, key hashes) and the runs of the
shard still open. From the summaries it cuts the job's prefix into shards of
``images_per_tar`` (:func:`plan_shards`), writes the shards whose *last* image is
in its group from the samples' blocks (no re-encoding, each byte written once),
and carries on the runs of its own open shard: at most one shard's rows plus a
partition. So the shards of early partitions are written while later partitions
still encode, and no task waits for the whole job but the commit.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.tarshard import content_limit, continue_archive, write_archive
from ..core.writer import (
    LAYOUT_COLUMN,
    ShardTarget,
    SkippedRow,
    WrittenShard,
    format_counts,
    write_idx,
)
from ..errors import BadRowError
from ..format.dali import idx_line
from ..format.layout import new_attempt_dir, staged
from ..format.schema import shard_schema, write_parquet
from ..storage import remove_quietly, resolve
from .claim import Claim, committed_job
from .cleanup import discard_staging
from .head import Head, ahead_of, write_ahead
from .lock import aborted_here
from .options import WriteOptions
from .results import PartitionResult, TaskFailed, cancelled, failure, first_failure
from .unique import dataset_key_hashes, drop_duplicate_keys


@dataclass
class Piece:
    """Rows ``[start, stop)`` of run ``run`` (an index into ``ShardPlan.runs``)."""

    run: int
    start: int
    stop: int


@dataclass
class ShardPlan:
    """The cut of all runs into shards; only counts and paths, O(partitions) in size.

    ``dropped`` lists, per run, the rows left out as duplicate keys (see
    :mod:`~dask_imgsink.job.unique`); shards are cut over the rows kept, so each
    still holds exactly ``images_per_tar`` images. With ``max_shard_bytes``,
    ``shard_starts`` holds where each shard begins (kept rows, in order): the
    greedy cut of :func:`cut_shards`; without, shards start every ``images_per_tar``.
    """

    runs: list[tuple[int, WrittenShard]]  # (partition, run) for runs holding images
    images_per_tar: int
    first_shard: int
    rows_in: int
    skipped: list[SkippedRow] = field(default_factory=list)
    run_starts: list[int] = field(default_factory=list)  # global kept row of each run's first kept image
    failed: TaskFailed | None = None  # a write task failed: nothing to assemble
    dropped: dict[int, list[int]] = field(default_factory=dict)  # run index -> its rows left out
    shard_starts: list[int] | None = None  # cut by bytes: first kept row of each shard

    @cached_property
    def run_of(self) -> dict[int, int]:
        """Partition -> index of its run in ``runs``."""
        return {p: i for i, (p, _) in enumerate(self.runs)}

    def kept(self, run: int) -> int:
        """Images of run ``run`` that go into shards."""
        return self.runs[run][1].num_images - len(self.dropped.get(run, ()))

    @property
    def num_images(self) -> int:
        if not self.runs:
            return 0
        return self.run_starts[-1] + self.kept(len(self.runs) - 1)

    @property
    def num_shards(self) -> int:
        if self.shard_starts is not None:
            return len(self.shard_starts)
        return -(-self.num_images // self.images_per_tar)

    def _shard_range(self, shard: int) -> tuple[int, int]:
        """Kept rows ``[start, stop)`` of shard ``shard``."""
        if self.shard_starts is None:
            n = self.images_per_tar
            return shard * n, min((shard + 1) * n, self.num_images)
        starts = self.shard_starts
        return starts[shard], starts[shard + 1] if shard + 1 < len(starts) else self.num_images

    def shards_ending_in(self, partition: int) -> list[int]:
        """The shards (local indexes) whose last image is in ``partition``'s run."""
        run = self.run_of.get(partition)
        if run is None or not self.kept(run):
            return []
        lo = self.run_starts[run]
        hi = lo + self.kept(run)
        # shard s ends in [lo, hi) when its last row s_end - 1 is: s_end in (lo, hi]
        return [s for s in range(self._shard_holding(lo), self._shard_holding(hi - 1) + 1)
                if lo < self._shard_range(s)[1] <= hi]

    def _shard_holding(self, row: int) -> int:
        if self.shard_starts is None:
            return row // self.images_per_tar
        return bisect.bisect_right(self.shard_starts, row) - 1

    def rows_before(self, partition: int) -> int:
        """Kept rows in the runs of the partitions before ``partition``."""
        total = 0
        for run, (part, _) in enumerate(self.runs):
            if part >= partition:
                break
            total = self.run_starts[run] + self.kept(run)
        return total

    def shard_left_before(self, partition: int) -> int | None:
        """The shard that ends right before ``partition``'s rows but that an earlier group may have left.

        A group whose plan covers a prefix of the job leaves its last shard unless
        it is full by count: later rows may join it. When they do not (the next
        sample would break ``max_shard_bytes``), that shard still ends in the
        earlier group's partitions; the first group whose plan shows it closed
        builds it.
        """
        before = self.rows_before(partition)
        if before == 0:
            return None
        shard = self._shard_holding(before - 1)
        if self._shard_range(shard)[1] != before or self.shard_is_full(shard):
            return None  # it continues past ``partition`` (built where it ends), or it was full and built
        return shard

    def shard_is_full(self, shard: int) -> bool:
        """Whether ``shard`` holds ``images_per_tar`` images."""
        start, stop = self._shard_range(shard)
        return stop - start == self.images_per_tar

    def shard_is_complete(self, shard: int) -> bool:
        """Whether more rows after this plan's could not join ``shard`` (it is not the last, or it is full)."""
        return shard < self.num_shards - 1 or self.shard_is_full(shard)

    def pieces(self, shard: int, skip: int = 0) -> list[Piece]:
        """Where the kept rows of ``shard`` are, in order, leaving out its first ``skip``."""
        start, stop = self._shard_range(shard)
        return self._pieces(start + skip, stop)

    def open_shard(self) -> int | None:
        """The last shard if more rows could still join it (it is not full), else ``None``."""
        final = self.num_shards - 1
        return None if final < 0 or self.shard_is_full(final) else final

    def _pieces(self, start: int, stop: int) -> list[Piece]:
        pieces = []
        run = bisect.bisect_right(self.run_starts, start) - 1
        while start < stop:
            while self.kept(run) == 0 or start >= self.run_starts[run] + self.kept(run):
                run += 1
            base = self.run_starts[run]
            end = min(stop, base + self.kept(run))
            pieces += self._row_ranges(run, start - base, end - base)
            start = end
            run += 1
        return pieces

    def _row_ranges(self, run: int, first: int, stop: int) -> list[Piece]:
        """Kept images ``[first, stop)`` of ``run`` as contiguous row ranges, around its dropped rows."""
        dropped = self.dropped.get(run)
        if not dropped:
            return [Piece(run, first, stop)]
        pieces, row, kept = [], 0, 0
        dropped_set = set(dropped)
        start_row = None
        while kept < stop:
            if row not in dropped_set:
                if kept >= first and start_row is None:
                    start_row = row
                kept += 1
            elif start_row is not None:
                pieces.append(Piece(run, start_row, row))
                start_row = None
            row += 1
        if start_row is not None:
            pieces.append(Piece(run, start_row, row))
        return pieces


def plan_shards(results: list[PartitionResult | TaskFailed], claim: Claim, opts: WriteOptions,
                existing_keys: np.ndarray | None = None) -> ShardPlan:
    """Cut the runs of all partitions, in partition order, into shards (duplicate keys left out first).

    ``existing_keys``: the dataset's key hashes when appending (the job reads them
    once, in its own task); read here when not given.
    """
    failed = first_failure(results)
    if failed is not None:
        return ShardPlan([], opts.images_per_tar, claim.first_shard, 0, failed=failed)
    runs: list[tuple[int, WrittenShard]] = []
    results = sorted(results, key=lambda r: r.partition)
    for res in results:
        runs += [(res.partition, run) for run in res.shards if run.num_images]
    plan = ShardPlan(runs=runs, images_per_tar=opts.images_per_tar, first_shard=claim.first_shard,
                     rows_in=sum(r.rows_in for r in results), skipped=[s for r in results for s in r.skipped])
    try:
        if existing_keys is None:
            existing_keys = dataset_key_hashes(claim, opts)
        drop_duplicate_keys(plan, [r for r in results if r.shards and r.num_images], opts, existing_keys)
    except Exception as exc:
        fs, root = resolve(opts.url, opts.storage_options)
        if isinstance(exc, BadRowError) or committed_job(fs, root, opts.job_id) is None:
            plan.failed = failure(exc, "the check for duplicate keys")
            return plan
        # Dask reran the plan after the job committed (its runs are gone): the commit returns what it wrote
    total = 0
    for i in range(len(runs)):
        plan.run_starts.append(total)
        total += plan.kept(i)
    if opts.max_shard_bytes is not None:
        plan.shard_starts = cut_shards(_kept_sizes(plan), opts.images_per_tar, opts.max_shard_bytes)
    return plan


def _kept_sizes(plan: ShardPlan) -> np.ndarray:
    """The tar bytes of every kept sample, in row order."""
    parts = []
    for i, (_, run) in enumerate(plan.runs):
        sizes = np.asarray(run.sample_sizes, dtype=np.int64)
        dropped = plan.dropped.get(i)
        parts.append(np.delete(sizes, dropped) if dropped else sizes)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def cut_shards(sizes: np.ndarray, images_per_tar: int, max_shard_bytes: int) -> list[int]:
    """Where each shard starts when samples of these tar ``sizes`` fill shards greedily, in order.

    A shard takes samples while it has fewer than ``images_per_tar`` and its tar
    stays within ``max_shard_bytes``; a sample larger than that alone gets a shard
    of its own. Deterministic: every shard but the last is as full as the limits allow.
    """
    ends = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    limit = content_limit(max_shard_bytes)
    starts, start, total = [], 0, len(sizes)
    while start < total:
        starts.append(start)
        by_bytes = int(np.searchsorted(ends, ends[start] + limit, side="right")) - 1
        start = min(start + images_per_tar, total, max(by_bytes, start + 1))
    return starts


def shards_to_build(plan: ShardPlan, partitions: range, *, prefix: bool, last: bool) -> list[int]:
    """The shards (local indexes) the assembly task of ``partitions`` builds; see :func:`assemble_shards`.

    Over all groups of a job, every shard is built exactly once (``test_packing.py`` checks it
    for any partition sizes, sample sizes and limits).
    """
    todo = [s for p in partitions for s in plan.shards_ending_in(p)
            if not prefix or plan.shard_is_complete(s)]
    left = plan.shard_left_before(partitions.start)
    if left is not None and (not prefix or plan.shard_is_complete(left)):
        todo.insert(0, left)
    final = plan.num_shards - 1
    if last and final >= 0 and final not in todo and not plan.shard_is_full(final):
        todo.append(final)  # it ends in an earlier group, which left it open (a full one it built)
    return todo


def assemble_shards(plan: ShardPlan, partitions: range, opts: WriteOptions, runs: dict[int, WrittenShard], *,
                    prefix: bool = False, last: bool = False, head: Head | None = None
                    ) -> list[tuple[int, WrittenShard, list[int]]] | TaskFailed:
    """Build the shards whose last image is in the runs of ``partitions``.

    ``runs`` maps each partition whose samples these shards hold to its run
    (bytes in memory). ``prefix``: ``plan`` covers only the partitions up to
    these (the job is still encoding later ones), so its last shard is left for
    a later group unless it is full. ``last``: this is the job's last group,
    which also builds the job's last shard wherever it ends (the partitions
    after it may hold no image). ``head``: the first rows of a shard, written
    ahead by an earlier group (:mod:`~dask_imgsink.job.head`); that shard is
    finished after them.

    Returns ``(index, shard, source partitions)`` for each, or the
    :class:`TaskFailed` of this task (an I/O error, say). Files go to a fresh
    staging folder of this attempt; the commit publishes them. Rerun by Dask
    after the job committed, it returns nothing.
    """
    if plan.failed is not None:
        return []
    todo = shards_to_build(plan, partitions, prefix=prefix, last=last)
    if not todo:
        return []
    where = f"the assembly of the shards ending in partitions {partitions.start}-{partitions.stop - 1}"
    if aborted_here(opts.job_id):  # the job failed and was cleaned up while this task waited: write nothing
        return cancelled(where)
    fs, root = resolve(opts.url, opts.storage_options)
    if committed_job(fs, root, opts.job_id) is not None:
        return []  # Dask reran it after the commit had finished: nothing to do
    attempt = new_attempt_dir(root, opts.job_id, f"assemble-{partitions[0]:06d}")
    try:
        fs.makedirs(attempt, exist_ok=True)
        built = [_assemble_one(fs, attempt, runs, plan, s, opts, head) for s in todo]
    except Exception as exc:
        remove_quietly(fs, attempt, recursive=True)
        return failure(exc, where)
    if aborted_here(opts.job_id):  # the job failed and was cleaned up while this task wrote: leave nothing
        discard_staging(fs, root, opts.job_id)
        return cancelled(where)
    return built


def summarize(result: PartitionResult | TaskFailed) -> PartitionResult | TaskFailed:
    """A write result without its run's bytes: what plans and the commit need (counts, sizes, keys, skips)."""
    if isinstance(result, TaskFailed):
        return result
    return replace(result, shards=[run.without_run_data() for run in result.shards])


def runs_by_partition(results: list) -> dict[int, WrittenShard]:
    """Partition -> its run (bytes in memory), for the write results that made one."""
    return {r.partition: run for r in results if isinstance(r, PartitionResult) for run in r.shards
            if run.run_blocks is not None and run.num_images}


def carried_runs(plan: ShardPlan, runs: dict[int, WrittenShard], last: bool,
                 head: Head | None = None) -> dict[int, WrittenShard]:
    """The runs later groups still need: those holding rows of the plan's last shard, unless it is built.

    Every shard but a prefix plan's last is complete and built by the group it
    ends in (or the next one, :meth:`ShardPlan.shard_left_before`); a full last
    shard is built too. So what later groups need of the runs seen so far is the
    open last shard's rows (past those written ahead in ``head``): at most one shard's worth.
    """
    if last or plan.failed is not None:
        return {}
    final = plan.open_shard()
    if final is None:
        return {}
    open_from = plan._shard_range(final)[0] + ahead_of(head, plan.first_shard + final)[0]
    needed = {part for run, (part, _) in enumerate(plan.runs)
              if plan.run_starts[run] + plan.kept(run) > open_from}
    return {part: run for part, run in runs.items() if part in needed}


class Carry(NamedTuple):
    """What one assembly group hands the next: the write summaries so far (every plan starts from
    them), the runs of the shard still open at its end, and that shard's rows written ahead."""

    summaries: list
    runs: dict[int, WrittenShard]
    head: Head | None = None


def assemble_group(carried: Carry | TaskFailed | None, own: list, claim: Claim, partitions: range,
                   existing_keys: np.ndarray | None = None, *, opts: WriteOptions, last: bool,
                   carry_bytes: int | None = None
                   ) -> tuple[list[tuple[int, WrittenShard, list[int]]] | TaskFailed, Carry | TaskFailed]:
    """One assembly task: plan from the write summaries up to ``partitions`` (a prefix of the job) and
    build the shards ending there, from this group's write results (``own``, runs in memory) and the
    runs ``carried`` from the group before (the rows of its open last shard). It waits only for its
    own partitions and the group before, so it runs while later partitions encode.

    Once the open shard's carried runs pass ``carry_bytes``, their rows are written ahead into
    its staged tar and only a :class:`~dask_imgsink.job.head.Head` is carried (local filesystems).

    Returns the shards built and what to carry to the next group (or a :class:`TaskFailed` for
    either, which the commit raises). The plan of a prefix agrees with the job's plan on every
    complete shard: shards are cut greedily in row order, and a duplicate key is always the later copy.
    """
    if isinstance(carried, TaskFailed):
        return [], carried  # an earlier group failed; the commit raises its error
    carried = carried or Carry([], {})  # None: the first group
    summaries = [*carried.summaries, *map(summarize, own)]
    plan = plan_shards(summaries, claim, opts, existing_keys)
    runs = {**carried.runs, **runs_by_partition(own)}
    built = assemble_shards(plan, partitions, opts, runs, prefix=not last, last=last, head=carried.head)
    if isinstance(built, TaskFailed):
        return built, built
    final = None if last or plan.failed is not None else plan.open_shard()  # the shard left open, if any
    head = carried.head if final is not None and ahead_of(carried.head, plan.first_shard + final)[0] else None
    runs = carried_runs(plan, runs, last, head)
    if runs and carry_bytes is not None:
        written = _write_open_shard_ahead(plan, final, head, runs, opts, carry_bytes)
        if isinstance(written, TaskFailed):
            return built, written
        if written is not None:
            head, runs = written, {}
    return built, Carry(summaries, runs, head)


def _write_open_shard_ahead(plan: ShardPlan, final: int, head: Head | None, runs: dict[int, WrittenShard],
                            opts: WriteOptions, budget: int) -> Head | None | TaskFailed:
    """Write the open shard's carried rows after its head once they pass ``budget`` (see :mod:`.head`)."""
    index = plan.first_shard + final
    skip, position = ahead_of(head, index)
    pieces = plan.pieces(final, skip)
    carried = sum(len(block) for p in pieces for block in runs[plan.runs[p.run][0]].run_blocks[p.start:p.stop])
    if carried <= budget:
        return None  # carried as runs: cheaper than a write and a read back
    blocks, tables, sources = _gather(plan, runs, pieces, position, f"{opts.exact_stem(index)}.tar")
    rows = sum(p.stop - p.start for p in pieces)
    return write_ahead(index, head, rows, blocks, pa.concat_tables(tables), sources, opts)


def _assemble_one(fs, attempt: str, runs: dict[int, WrittenShard], plan: ShardPlan, local_index: int,
                  opts: WriteOptions, head: Head | None = None) -> tuple[int, WrittenShard, list[int]]:
    """Write one shard from its samples' bytes in the runs (after its ``head``, if written ahead);
    write its Parquet and DALI index."""
    index = plan.first_shard + local_index
    stem = opts.exact_stem(index)
    skip, position = ahead_of(head, index)
    target = ShardTarget(head.path if skip else staged(attempt, f"{stem}.tar"), staged(attempt, f"{stem}.parquet"),
                         f"{stem}.tar", idx_path=staged(attempt, f"{stem}.idx") if opts.dali_index else None)
    blocks, tables, sources = _gather(plan, runs, plan.pieces(local_index, skip), position, target.tar_file)
    if skip:
        size, tar_sha256 = continue_archive(target.tar_path, position, blocks)
        tables.insert(0, head.index)
        sources = sorted({*head.sources, *sources})
    else:
        with fs.open(target.tar_path, "wb") as out:
            size, tar_sha256 = write_archive(out, blocks)
    moved = pa.concat_tables(tables)
    layouts = moved.column(LAYOUT_COLUMN).to_pylist()
    table = pa.Table.from_arrays(moved.drop_columns([LAYOUT_COLUMN]).columns, schema=shard_schema(opts.user_schema))
    parquet_size, parquet_sha = write_parquet(table, fs, target.parquet_path)
    shard = WrittenShard(target, table.num_rows, size, tar_sha256, parquet_size, parquet_sha,
                         formats=format_counts(table.column("format").to_pylist()))
    if target.idx_path is not None:
        starts = table.column("sample_offset").to_pylist()
        shard.idx_bytes, shard.idx_sha256 = write_idx(fs, target.idx_path, map(idx_line, starts, layouts))
    return index, shard, sources


def _gather(plan: ShardPlan, runs: dict[int, WrittenShard], pieces: list[Piece], position: int,
            tar_file: str) -> tuple[list, list[pa.Table], list[int]]:
    """The samples' blocks of ``pieces``, their index rows moved to start at ``position`` of
    ``tar_file``, and the partitions they came from."""
    tables, blocks = [], []
    for piece in pieces:
        run = runs[plan.runs[piece.run][0]]
        rows = run.run_index.slice(piece.start, piece.stop - piece.start)
        tables.append(_moved_rows(rows, position - rows.column("sample_offset")[0].as_py(), tar_file))
        piece_blocks = run.run_blocks[piece.start:piece.stop]
        blocks += piece_blocks
        position += sum(map(len, piece_blocks))
    return blocks, tables, sorted({plan.runs[p.run][0] for p in pieces})


def _moved_rows(rows: pa.Table, shift: int, tar_file: str) -> pa.Table:
    """Run index rows as they read in the assembled shard: byte ranges moved by ``shift``."""
    for name in ("offset", "sample_offset"):
        moved = pc.add(rows.column(name), pa.scalar(shift, pa.int64()))
        rows = rows.set_column(rows.schema.get_field_index(name), name, moved)
    names = pa.array([tar_file] * rows.num_rows, pa.string())
    return rows.set_column(rows.schema.get_field_index("tar_file"), "tar_file", names)
