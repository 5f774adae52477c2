"""Exact packing: per-partition runs in memory -> contiguous shards of exactly N images.

Each write task encodes its partition once into a *run*: its samples' tar bytes
(one block per sample) and a small Arrow table of their offsets, sizes and
metadata, kept in memory as the task's result (no file). Each assembly task (one
per group of contiguous partitions, :func:`assemble_group`) waits only for its
own write tasks and the group before it, which hands it a :class:`Carry`: where
its plan left off (the shard still open, :mod:`.window`) and that shard's runs.
From them and its own writes' summaries (counts, sizes, key hashes) it cuts
shards of ``images_per_tar`` (:mod:`.plan`), writes the shards whose *last*
image is in its group from the samples' blocks (no re-encoding, each byte
written once), and carries on the runs of its own open shard: at most one
shard's rows plus a partition. So the shards of early partitions are written
while later partitions still encode, no task waits for the whole job but the
commit, and each group's work does not grow with the partitions before it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.tarshard import continue_archive, write_archive
from ..core.writer import LAYOUT_COLUMN, ShardTarget, WrittenShard, format_counts, write_idx
from ..format.dali import idx_line
from ..format.layout import new_attempt_dir, staged
from ..format.schema import shard_schema, write_parquet
from ..storage import remove_quietly, resolve
from .claim import Claim, committed_job
from .cleanup import discard_staging
from .head import Head, ahead_of, write_ahead
from .lock import aborted_here
from .options import WriteOptions
from .plan import Piece, ShardPlan, shards_to_build
from .results import PartitionResult, TaskFailed, cancelled, failure, first_failure
from .window import PlanWindow, first_window, next_window, plan_group
from .write import mark_failed


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
    open_from = plan.shard_start(final) + ahead_of(head, plan.first_shard + final)[0]
    needed = {part for run, (part, _) in enumerate(plan.runs)
              if plan.run_starts[run] + plan.kept(run) > open_from}
    return {part: run for part, run in runs.items() if part in needed}


class Carry(NamedTuple):
    """What one assembly group hands the next: where its plan left off (:class:`~.window.PlanWindow`:
    the open shard's write summaries and the keys kept so far), the runs of that shard, and its
    rows written ahead."""

    window: PlanWindow
    runs: dict[int, WrittenShard]
    head: Head | None = None


Built = list[tuple[int, WrittenShard, list[int]]]


def assemble_group(carried: Carry | TaskFailed | None, own: list, claim: Claim, partitions: range,
                   existing_keys: np.ndarray | None = None, *, opts: WriteOptions, last: bool,
                   carry_bytes: int | None = None) -> tuple[Built | TaskFailed, Carry | TaskFailed, list]:
    """One assembly task: plan the shard left open by the group before and this group's partitions,
    and build the shards ending there, from this group's write results (``own``, runs in memory) and
    the runs ``carried`` from the group before (the rows of its open last shard). It waits only for
    its own partitions and the group before, so it runs while later partitions encode.

    Once the open shard's carried runs pass ``carry_bytes``, their rows are written ahead into
    its staged tar and only a :class:`~dask_imgsink.job.head.Head` is carried (local filesystems).

    Returns the shards built, what to carry to the next group (or a :class:`TaskFailed` for
    either, which the commit raises), and the summaries of ``own`` (the commit plans from every
    group's). A group's plan agrees with the job's plan on every shard it builds: shards are cut
    greedily in row order, and a duplicate key is always the later copy.
    """
    summaries = [summarize(result) for result in own]
    own_failure = first_failure(own)
    if own_failure is not None and not own_failure.cancelled and not claim.done and not aborted_here(opts.job_id):
        mark_failed(opts)  # the job's write tasks not yet started stop early (they may not wait for the claim)
    if isinstance(carried, TaskFailed):
        return [], carried, summaries  # an earlier group failed; the commit raises its error
    carried = carried or Carry(first_window(claim), {})  # None: the first group
    plan, keys = plan_group(carried.window, summaries, claim, opts, existing_keys)
    runs = {**carried.runs, **runs_by_partition(own)}
    built = assemble_shards(plan, partitions, opts, runs, prefix=not last, last=last, head=carried.head)
    if isinstance(built, TaskFailed):
        return built, built, summaries
    final = None if last or plan.failed is not None else plan.open_shard()  # the shard left open, if any
    head = carried.head if final is not None and ahead_of(carried.head, plan.first_shard + final)[0] else None
    runs = carried_runs(plan, runs, last, head)
    if runs and carry_bytes is not None:
        written = _write_open_shard_ahead(plan, final, head, runs, opts, carry_bytes)
        if isinstance(written, TaskFailed):
            return built, written, summaries
        if written is not None:
            head, runs = written, {}
    window = next_window(plan, carried.window, summaries, keys)
    return built, Carry(window, runs, head), summaries


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
            size, tar_sha256 = write_archive(out, blocks, wait=False)  # the commit takes the digest
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
