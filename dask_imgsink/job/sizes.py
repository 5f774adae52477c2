"""What Dask counts the job's task results as: the bytes they hold.

Dask sizes every task result with :func:`dask.sizeof.sizeof`, which falls back to
``sys.getsizeof``: for a dataclass that is the object alone. A write result
holding a 12 MB run counted as 56 bytes, and a carry of 24 MB of runs as 560.
With sizes that wrong, the scheduler placed each assembly group with no regard to
where its runs were (moving a run costs 20-30 ms of CPU), work stealing moved
tasks away from their data as if it cost nothing to follow them, and a worker's
memory accounting, which decides what it spills to disk under pressure, missed
every run. Registered here for the job's result types, Dask sees the bytes.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
from dask.sizeof import sizeof

from ..core.writer import WrittenShard
from .head import Head
from .results import PartitionResult
from .unique import KeyLog
from .window import PlanWindow

#: Bytes counted for each skipped row's record (partition, row, key, reason).
_SKIPPED_ROW_BYTES = 300


def _array_bytes(value: np.ndarray | pa.Array | pa.Table | None) -> int:
    return 0 if value is None else int(value.nbytes)


@sizeof.register(WrittenShard)
def _written_shard(shard: WrittenShard) -> int:
    """A shard's facts, and for an exact-packing run its tar bytes and index (held in memory)."""
    size = sys.getsizeof(shard) + 1000  # its target, checksums and formats
    if shard.run_blocks is not None:
        size += shard.tar_bytes + 100 * len(shard.run_blocks)  # each sample's pieces and their objects
    if shard.sample_sizes is not None:
        size += 36 * len(shard.sample_sizes)
    return size + _array_bytes(shard.run_index) + _array_bytes(shard.run_keys)


@sizeof.register(PartitionResult)
def _partition_result(result: PartitionResult) -> int:
    return (sys.getsizeof(result) + sum(map(_written_shard, result.shards))
            + _SKIPPED_ROW_BYTES * len(result.skipped)
            + _array_bytes(result.key_hashes) + _array_bytes(result.written_rows))


@sizeof.register(KeyLog)
def _key_log(log: KeyLog) -> int:
    return sys.getsizeof(log) + sum(_array_bytes(array) for chunk in log.chunks for array in chunk)


@sizeof.register(PlanWindow)
def _plan_window(window: PlanWindow) -> int:
    dropped = sum(36 * len(rows) for rows in window.dropped.values())
    keys = 0 if window.keys is None else _key_log(window.keys)
    return sys.getsizeof(window) + sum(map(_partition_result, window.summaries)) + dropped + keys


@sizeof.register(Head)
def _head(head: Head) -> int:
    return sys.getsizeof(head) + 1000 + _array_bytes(head.index)
