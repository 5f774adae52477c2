"""How many bytes the job's task results hold, told to Dask's ``sizeof``.

A write task of exact packing returns its run: the encoded bytes of its
partition (tens of MB), inside our own classes. Dask's ``sizeof`` does not know
them and falls back to ``sys.getsizeof``, which counted a 3.7 MB run as 56
bytes. Dask decides with these figures:

- where a task runs: an assembly group goes to the worker that holds most of
  the bytes it needs, so fewer runs cross between workers;
- what work stealing moves: a task whose inputs are large is not worth moving;
- when a worker spills results to disk, and what its dashboard shows as memory.

Registered when the job package is imported (every worker that runs one of
its tasks imports it to unpickle the task).
"""

from __future__ import annotations

import sys

import numpy as np
from dask.sizeof import sizeof

from ..core.tarshard import RunBlocks
from ..core.writer import WrittenShard
from .head import Head
from .results import PartitionResult


@sizeof.register(RunBlocks)
def _run_blocks_size(blocks: RunBlocks) -> int:
    """The blocks' bytes (each a ``bytes`` or, after a move, a ``memoryview`` of received bytes)."""
    return sys.getsizeof(blocks) + sum(memoryview(block).nbytes + 64 for block in blocks)


@sizeof.register(WrittenShard)
def _written_shard_size(shard: WrittenShard) -> int:
    size = sys.getsizeof(shard) + 8 * len(shard.sample_sizes or ())
    for held in (shard.run_blocks, shard.run_index, shard.run_keys):
        if held is not None:
            size += sizeof(held)
    return size


@sizeof.register(PartitionResult)
def _partition_result_size(result: PartitionResult) -> int:
    arrays = sum(a.nbytes for a in (result.key_hashes, result.written_rows) if isinstance(a, np.ndarray))
    return sys.getsizeof(result) + sum(map(sizeof, result.shards)) + sizeof(result.skipped) + arrays


@sizeof.register(Head)
def _head_size(head: Head) -> int:
    return sys.getsizeof(head) + sizeof(head.index)
