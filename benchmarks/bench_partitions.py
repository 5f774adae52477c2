"""Time against the number of partitions: does the job's own work per partition stay constant?

Exact packing chains its assembly groups (about one per 8 partitions): each
hands the next where its plan left off. If a group's work grew with the
partitions before it, the chain would grow with the square of the job and,
being a chain, run on one core. This script writes small images (so that the
per-partition work shows, not the encoding) in ``--per`` images per partition,
for each partition count, on the threaded scheduler (and with ``--cluster``, on
a LocalCluster of 2 processes x 1 thread), the sizes alternated, with a key
column (so every group checks keys for duplicates, ``unique_keys="dataset"``).

It prints, for each count, the median seconds, the milliseconds per partition,
and that figure against the smallest count's: about 1.0 when the job is linear in
its partitions, rising with the count when some step is not.

Usage: ``python benchmarks/bench_partitions.py [--partitions 500 1000 2000 4000] [--per 25] [--repeats 2]
[--cluster]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
from run import scratch

import dask_imgsink  # noqa: F401


def small_images(count: int, side: int = 16) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)]
    return pd.DataFrame({"key": [f"k{i:09d}" for i in range(count)], "image": pd.Series(images, dtype=object)})


def one_job(ddf) -> float:
    start = time.perf_counter()
    with scratch() as folder:
        ddf.imgsink.to_webdataset(f"{folder}/out", key_column="key", images_per_tar=1000, compute=True)
    return time.perf_counter() - start


def measure(partition_counts: list[int], per: int, repeats: int, persist) -> dict[int, float]:
    """Median seconds of a job per partition count, the counts alternated."""
    frames = {}
    for count in partition_counts:
        with dask.config.set({"dataframe.convert-string": False}):
            frames[count] = persist(dd.from_pandas(small_images(count * per), npartitions=count))
    one_job(frames[partition_counts[0]])  # warm up: imports and pools
    times: dict[int, list[float]] = {count: [] for count in partition_counts}
    for _ in range(repeats):
        for count in partition_counts:
            times[count].append(one_job(frames[count]))
    return {count: statistics.median(seconds) for count, seconds in times.items()}


def print_rows(title: str, seconds: dict[int, float], per: int) -> None:
    print(f"\n{title}: {per} images of 16x16 per partition, exact packing, key column (unique_keys='dataset')")
    print(f"{'partitions':>10}{'images':>9}{'seconds':>9}{'ms/partition':>14}{'vs fewest':>11}")
    base = None
    for count, value in seconds.items():
        per_partition = value / count * 1000
        base = base or per_partition
        print(f"{count:>10}{count * per:>9}{value:>9.2f}{per_partition:>14.2f}{per_partition / base:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    parser.add_argument("--per", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cluster", action="store_true", help="also on a LocalCluster of 2 processes x 1 thread")
    args = parser.parse_args()
    with dask.config.set(scheduler="threads"):
        seconds = measure(args.partitions, args.per, args.repeats, lambda ddf: ddf.persist())
    print_rows("threaded scheduler", seconds, args.per)
    if args.cluster:
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            seconds = measure(args.partitions, args.per, args.repeats, client.persist)
        print_rows("LocalCluster 2 processes x 1 thread", seconds, args.per)


if __name__ == "__main__":
    main()
