"""What an assembly group plans from: the shard still open and its own partitions, not the job's prefix.

Each assembly group cuts into shards the rows written so far (:mod:`.packing`).
Planning the whole prefix again at every group cost ``O(partitions so far)`` per
group, and sorting every key hash so far for duplicates ``O(rows so far)``: the
chain of groups grew with the square of the job (4,000 partitions of 25 images
took 2.9 times as long as 2,000). But the shards before the open one are final:
shards are cut greedily in row order, and whether a key is a duplicate depends
only on the rows before it. So a group hands the next a :class:`PlanWindow`:
the write summaries of the runs holding rows of the open shard, the rows they
left out, and (``unique_keys="dataset"``) a :class:`~.unique.KeyLog` of the keys
kept so far. Each group's plan then covers only that window and its own
partitions, with rows and shards numbered as in the job's plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import BadRowError
from ..storage import resolve
from .claim import Claim, committed_job
from .options import WriteOptions
from .plan import ShardPlan, cut_shards, kept_sizes
from .results import PartitionResult, TaskFailed, failure, first_failure
from .unique import KeyLog, dataset_key_hashes, dataset_log, drop_new_duplicates


@dataclass
class PlanWindow:
    """Where the group before left off.

    ``first_shard`` is the job-wide index (numbering included) of the shard still
    open, or of the next shard when none is; ``summaries`` the write summaries of
    the runs holding its rows, in partition order; ``lead`` how many kept rows of
    the first of them belong to the shards before; ``dropped`` the rows those runs
    left out (partition -> rows); ``keys`` every key kept so far (``None``: none
    read yet, so the dataset's keys are read first).
    """

    first_shard: int
    summaries: list[PartitionResult] = field(default_factory=list)
    lead: int = 0
    dropped: dict[int, list[int]] = field(default_factory=dict)
    keys: KeyLog | None = None
    failed: TaskFailed | None = None


def first_window(claim: Claim) -> PlanWindow:
    """The window of the job's first group: nothing before it."""
    return PlanWindow(claim.first_shard)


def plan_group(window: PlanWindow, own: list, claim: Claim, opts: WriteOptions,
               existing_keys: np.ndarray | None = None) -> tuple[ShardPlan, KeyLog | None]:
    """The plan of the window and the group's own write summaries ``own``, and the keys kept so far.

    Local row 0 is the first row of the window's open shard, and local shard 0
    that shard: every shard this plan cuts is numbered, filled and cut as in the
    job's plan (:func:`~.plan.plan_shards` over every partition).
    """
    failed = first_failure([window.failed, *own] if window.failed else own)
    if failed is not None:
        return ShardPlan([], opts.images_per_tar, window.first_shard, 0, failed=failed), window.keys
    own = sorted(own, key=lambda r: r.partition)
    old = [(r.partition, run) for r in window.summaries for run in r.shards if run.num_images]
    new_results = [r for r in own if r.shards and r.num_images]
    plan = ShardPlan(runs=old + [(r.partition, run) for r in new_results for run in r.shards if run.num_images],
                     images_per_tar=opts.images_per_tar, first_shard=window.first_shard, rows_in=0)
    plan.dropped = {i: list(window.dropped[p]) for i, (p, _) in enumerate(old) if p in window.dropped}
    keys = window.keys
    try:
        if keys is None and opts.key_column is not None and opts.unique_keys == "dataset":
            keys = dataset_log(existing_keys if existing_keys is not None else dataset_key_hashes(claim, opts))
        shard_keys = _open_shard(window) if opts.key_column is not None and opts.unique_keys == "shard" else None
        keys = drop_new_duplicates(plan, len(old), new_results, opts, keys, shard_keys)
    except Exception as exc:
        fs, root = resolve(opts.url, opts.storage_options)
        if isinstance(exc, BadRowError) or committed_job(fs, root, opts.job_id) is None:
            plan.failed = failure(exc, "the check for duplicate keys")
            return plan, keys
    total = -window.lead
    for i in range(len(plan.runs)):
        plan.run_starts.append(total)
        total += plan.kept(i)
    if opts.max_shard_bytes is not None:
        plan.shard_starts = cut_shards(kept_sizes(plan)[window.lead:], opts.images_per_tar, opts.max_shard_bytes)
    return plan, keys


def _open_shard(window: PlanWindow) -> tuple[np.ndarray, np.ndarray, list, int, int] | None:
    """The open shard's kept rows for ``unique_keys="shard"``: hashes, sizes, (partition, row)s, count, bytes."""
    hashes, sizes, places = [], [], []
    for result in window.summaries:
        if result.key_hashes is None or not result.num_images:
            continue
        left_out = set(window.dropped.get(result.partition, ()))
        run_sizes = [size for run in result.shards for size in run.sample_sizes]
        for row in range(len(result.key_hashes)):
            if row not in left_out:
                hashes.append(result.key_hashes[row])
                sizes.append(run_sizes[row])
                places.append((result.partition, int(result.written_rows[row])))
    hashes, sizes, places = hashes[window.lead:], sizes[window.lead:], places[window.lead:]
    return hashes, np.asarray(sizes, np.int64), places, len(places), int(sum(sizes))


def next_window(plan: ShardPlan, window: PlanWindow, own: list, keys: KeyLog | None) -> PlanWindow:
    """What the next group plans from, once ``plan`` (of ``window`` and ``own``) is built."""
    if plan.failed is not None:
        return PlanWindow(window.first_shard, failed=plan.failed)
    final = plan.open_shard()
    if final is None:
        return PlanWindow(plan.first_shard + plan.num_shards, keys=keys)
    open_from = plan.shard_start(final)
    first = next(i for i in range(len(plan.runs)) if plan.run_starts[i] + plan.kept(i) > open_from)
    by_partition = {r.partition: r for r in [*window.summaries, *own]}
    partitions = [p for p, _ in plan.runs[first:]]
    return PlanWindow(
        first_shard=plan.first_shard + final,
        summaries=[by_partition[p] for p in partitions],
        lead=open_from - plan.run_starts[first],
        dropped={p: plan.dropped[i] for i, p in enumerate(partitions, start=first) if i in plan.dropped},
        keys=keys,
    )
