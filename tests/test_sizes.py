"""Dask's ``sizeof`` sees the bytes our task results hold (a run's encoded samples), not the few
dozen bytes of the objects around them: Dask places tasks, steals work and spills by these figures."""

from __future__ import annotations

import pickle

import dask
import dask.dataframe as dd
from dask.sizeof import sizeof
from helpers import claimed_job
from test_packing import _noise_partition

from dask_imgsink.job.packing import assemble_group
from dask_imgsink.job.write import PartitionWriter


def _run_bytes(result) -> int:
    return sum(len(block) for run in result.shards for block in (run.run_blocks or []))


def _write_results(tmp_path, partitions: int, rows: int, **options):
    frames = [_noise_partition(p, rows) for p in range(partitions)]
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frames[0], npartitions=1)
    opts, claim = claimed_job(ddf, tmp_path / "out", key_column="key", **options)
    return [PartitionWriter(opts)(frame, p, claim) for p, frame in enumerate(frames)], opts, claim


def test_a_write_result_counts_its_runs_bytes_before_and_after_a_move(tmp_path):
    (result,), _, _ = _write_results(tmp_path, 1, 20)
    held = _run_bytes(result)
    assert held > 100_000
    assert held <= sizeof(result) <= 1.1 * held + 20_000
    moved = pickle.loads(pickle.dumps(result, protocol=5))  # as Dask moves it: blocks become memoryviews
    assert held <= sizeof(moved) <= 1.1 * held + 20_000


def test_what_a_group_carries_counts_its_runs(tmp_path):
    results, opts, claim = _write_results(tmp_path, 3, 4, images_per_tar=10)
    built, carried = assemble_group(None, results, claim, range(3), opts=opts, last=False)
    held = sum(_run_bytes(r) for r in results if r.partition in carried.runs)
    assert carried.runs and held > 0  # 12 rows in shards of 10: the open shard's runs are carried
    assert held <= sizeof(carried) <= 1.1 * held + 50_000
    assert sizeof(built) < 50_000  # shards built: facts only, their bytes are on disk


def test_a_worker_counts_a_run_it_holds_at_its_size(client, tmp_path):
    """Registered where the worker unpickles our objects: it imports the job package then."""
    (result,), _, _ = _write_results(tmp_path, 1, 20)
    future = client.submit(pickle.loads, pickle.dumps(result, protocol=5), pure=False)
    future.result()
    held = client.run(lambda dask_worker, key=future.key: getattr(dask_worker.state.tasks.get(key), "nbytes", None))
    counted = [n for n in held.values() if n is not None]
    assert counted and _run_bytes(result) <= counted[0] <= 1.1 * _run_bytes(result) + 20_000
