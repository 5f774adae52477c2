"""Exact packing against per-partition packing on the same filtered DataFrame.

A local cluster (worker processes) generates photo-like images in many small
partitions, a filter keeps about a third of them, and the result is persisted so
both writers read the same data from worker memory. Then each packing writes it,
alternating, ``--repeats`` times. Prints median wall time, the ratio
exact / per_partition, shard counts, and the peak RSS growth of the worker
processes during each write (sampled every 10 ms with psutil).

Usage: ``python benchmarks/bench_packing.py [--partitions 200] [--rows 20] [--images-per-tar 200]``
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time

from distributed import Client, LocalCluster
from measure import PeakRSS

from dask_imgsink import to_webdataset
from dask_imgsink.cli import demo_dataframe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=200)
    parser.add_argument("--rows", type=int, default=20, help="rows per partition before the filter")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images-per-tar", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="imgsink-packing-")
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        ddf = demo_dataframe(args.partitions * args.rows, args.partitions, args.size)
        ddf = ddf[ddf.aesthetic > 6.5].persist()
        rows = len(ddf)
        pids = list(client.run(lambda: __import__("os").getpid()).values())
        print(f"{args.partitions} partitions, {rows} images after the filter "
              f"({rows / args.partitions:.1f} per partition), {args.size}x{args.size}, "
              f"images_per_tar={args.images_per_tar}, {args.workers} worker processes, "
              f"median of {args.repeats}\n")
        times = {"exact": [], "per_partition": []}
        peaks = {"exact": [], "per_partition": []}
        shards = {}
        for r in range(args.repeats):
            order = ("exact", "per_partition") if r % 2 == 0 else ("per_partition", "exact")
            for packing in order:
                out = f"{tmp}/{packing}-{r}"
                with PeakRSS(pids) as mem:
                    start = time.perf_counter()
                    tasks = to_webdataset(ddf, out, key_column="key", text_column="caption",
                                          images_per_tar=args.images_per_tar, packing=packing, compute=True)
                    times[packing].append(time.perf_counter() - start)
                peaks[packing].append(mem.growth)
                shards[packing] = [t.metadata["num_images"] for t in tasks]
                shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'packing':15s} {'wall s':>8s} {'images/s':>9s} {'shards':>7s} {'imgs/shard':>11s} {'peak worker RSS growth':>23s}")
    for packing in ("exact", "per_partition"):
        t = statistics.median(times[packing])
        n = shards[packing]
        print(f"{packing:15s} {t:8.2f} {rows / t:9.0f} {len(n):7d} {statistics.mean(n):11.1f} "
              f"{statistics.median(peaks[packing]) / 1e6:20.1f} MB")
    ratio = statistics.median(times["exact"]) / statistics.median(times["per_partition"])
    print(f"\nexact / per_partition wall time: x{ratio:.2f}")
    print(f"exact shard sizes: {sorted(set(shards['exact']))}; per_partition: "
          f"{min(shards['per_partition'])}..{max(shards['per_partition'])}")


if __name__ == "__main__":
    main()
