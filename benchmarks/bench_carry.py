"""The carry budget side by side: an assembly group writing its open shard ahead (0) against
carrying up to 64 MiB of its runs, on the same images in the same minutes.

The budget (``imgsink.carry-bytes``, README *Memory* under *How exact packing runs*) is 0
by default on a cluster of several workers and 64 MiB on one process. This script is the
evidence for that choice. For each setting it runs exact-packing jobs with the two budgets
alternated, each job paired with a run of the encode-only limit just before it, and prints
the median ratio to the limit for each budget and, on clusters, each worker's peak RSS rise
above what it held before the job (median and largest over the jobs).

Usage: ``python benchmarks/bench_carry.py [--images 5000] [--partitions 24] [--repeats 6]
[--settings threads 2x1 1x2]`` (``WxT``: a LocalCluster of W processes x T threads).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
from collections import defaultdict

import dask
import psutil
from distributed import Client
from measure import PeakRSS, median_seconds
from run import _photographs, _trim, frame, limit_runner, spread_frame, write_job

from dask_imgsink.cluster import local_cluster

BUDGETS = {"0 (write ahead)": 0, "64 MiB (carry)": 64 * 2**20}


def alternate(ddf, limit, repeats: int, client: Client | None) -> dict[str, tuple[list[float], list[float]]]:
    """For each budget: (ratios to the limit, peak RSS rises in MB of the largest worker) of ``repeats`` jobs."""
    job = write_job(ddf, "exact")
    job()  # warm up: imports and pools in every process
    pids = list(client.run(os.getpid).values()) if client is not None else []
    results: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for i in range(repeats):
        order = list(BUDGETS) if i % 2 == 0 else list(reversed(BUDGETS))  # neither side always goes first
        for label in order:
            ratios, rises = results[label]
            limit_seconds = median_seconds(limit, 1)
            if client is not None:
                client.run(_trim)
            held = {p: psutil.Process(p).memory_info().rss for p in pids}
            with dask.config.set({"imgsink.carry-bytes": BUDGETS[label]}), PeakRSS(pids) as peak:
                ratios.append(limit_seconds / median_seconds(job, 1))
            if pids:
                rises.append(max(peak.largest_each[p] - held[p] for p in pids) / 2**20)
    return dict(results)


def print_rows(setting: str, results: dict[str, tuple[list[float], list[float]]]) -> None:
    for label, (ratios, rises) in results.items():
        memory = (f"; largest worker's RSS rise median {statistics.median(rises):.0f} MB, most {max(rises):.0f}"
                  if rises else "")
        print(f"{setting:<10} carry {label:<16} ratio to the limit median {statistics.median(ratios):.2f} "
              f"({', '.join(f'{r:.2f}' for r in ratios)}){memory}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--partitions", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--settings", nargs="+", default=["threads", "2x1", "1x2"])
    args = parser.parse_args()
    images = _photographs(args.images)
    limit = limit_runner(images, os.cpu_count() or 1)
    print(f"{os.cpu_count()} cores; {args.images} images in {args.partitions} partitions, exact packing, "
          f"{args.repeats} jobs per budget, alternated")
    for setting in args.settings:
        if setting == "threads":
            with dask.config.set(scheduler="threads"):
                print_rows(setting, alternate(frame(args.images, args.partitions).persist(), limit,
                                              args.repeats, None))
            continue
        workers, threads = map(int, setting.split("x"))
        with local_cluster(n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            print_rows(setting, alternate(spread_frame(client, args.images, args.partitions), limit,
                                          args.repeats, client))


if __name__ == "__main__":
    main()
