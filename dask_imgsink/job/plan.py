"""The plan of exact packing: which kept rows of which runs make each shard, from counts and sizes only.

Shards are cut greedily in row order: every ``images_per_tar`` kept rows, or
sooner where ``max_shard_bytes`` would be passed (:func:`cut_shards`). Duplicate
keys are left out first (:mod:`.unique`), so each shard still holds exactly
``images_per_tar`` images. A plan holds counts, sizes and key hashes, never
image bytes: :mod:`.packing` builds the shards it describes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..core.tarshard import content_limit
from ..core.writer import SkippedRow, WrittenShard
from ..errors import BadRowError
from ..storage import resolve
from .claim import Claim, committed_job
from .options import WriteOptions
from .results import PartitionResult, TaskFailed, failure, first_failure
from .unique import dataset_key_hashes, drop_duplicate_keys


@dataclass
class Piece:
    """Rows ``[start, stop)`` of run ``run`` (an index into ``ShardPlan.runs``)."""

    run: int
    start: int
    stop: int


@dataclass
class ShardPlan:
    """The cut of runs into shards; only counts and paths, O(runs) in size.

    The commit's plan covers every run of the job; an assembly group's, the runs
    from the shard left open before it (:mod:`.window`): its shard 0 is shard
    ``first_shard`` of the job (numbering included), its row 0 that shard's first.

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
    # kept row of each run's first kept image, counted from the start of the plan's shard 0 (an assembly
    # group's plan starts at the shard left open before it, which may begin inside its first run: then < 0)
    run_starts: list[int] = field(default_factory=list)
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

    def shard_start(self, shard: int) -> int:
        """The first kept row of ``shard``."""
        return self._shard_range(shard)[0]

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
        return [s for s in range(max(0, self._shard_holding(lo)), self._shard_holding(hi - 1) + 1)
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
        plan.shard_starts = cut_shards(kept_sizes(plan), opts.images_per_tar, opts.max_shard_bytes)
    return plan


def kept_sizes(plan: ShardPlan) -> np.ndarray:
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
