"""Pass-through of encoded images against a raw write of the same bytes, with the CPU each one uses.

``run.py`` prints the pass-through row as one ratio of wall times. Here each job
of the accessor (exact packing, threaded scheduler, the images already encoded
as JPEG) is paired with a raw sequential write + fsync of the same bytes just
before it (``raw_write`` of ``run.py``), and each prints its wall time, the
process's user and system CPU seconds, and its minor page faults (new anonymous
memory). On this project's machine the job's system time moves from run to run
far more than the raw write's (a virtual machine that hands freed memory back to
its host; see the README), and this shows it apart from the writer's own work.

Usage: ``python benchmarks/bench_passthrough.py [--images 5000] [--partitions 24] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import dask
from run import frame, raw_write, write_job


def measured(fn) -> dict[str, float]:
    """Wall seconds, user and system CPU seconds and minor page faults of one call of ``fn``."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, start = os.times(), time.perf_counter()
    fn()
    wall, after = time.perf_counter() - start, os.times()
    return {"wall": wall, "user": after.user - cpu.user, "system": after.system - cpu.system,
            "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--partitions", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ddf = frame(args.images, args.partitions, encoded=True).persist(scheduler="threads")
    blobs = list(ddf["image"].compute(scheduler="threads"))

    job = write_job(ddf, "exact")
    pairs = []
    with dask.config.set(scheduler="threads"):
        job()  # warm up: imports and pools
        for _ in range(args.repeats):
            pairs.append((measured(lambda: raw_write(blobs)), measured(job)))
    megabytes = sum(map(len, blobs)) / 1e6
    print(f"{args.images} photographs encoded ({megabytes:.0f} MB) in {args.partitions} partitions, "
          f"{os.cpu_count()} cores; each job after a raw write of the same bytes")
    print(f"{'':8} {'raw wall':>9} {'job wall':>9} {'ratio':>6} {'job user':>9} {'job sys':>8} {'raw sys':>8} "
          f"{'job faults':>11}")
    for raw_run, job_run in pairs:
        print(f"{'':8} {raw_run['wall']:9.3f} {job_run['wall']:9.3f} {raw_run['wall'] / job_run['wall']:6.2f} "
              f"{job_run['user']:9.2f} {job_run['system']:8.2f} {raw_run['system']:8.2f} {job_run['faults']:11d}")

    def median(side: int, name: str) -> float:
        return statistics.median(pair[side][name] for pair in pairs)

    ratio = statistics.median(r["wall"] / j["wall"] for r, j in pairs)
    print(f"{'medians':8} {median(0, 'wall'):9.3f} {median(1, 'wall'):9.3f} {ratio:6.2f} {median(1, 'user'):9.2f} "
          f"{median(1, 'system'):8.2f} {median(0, 'system'):8.2f} {median(1, 'faults'):11.0f}")


if __name__ == "__main__":
    main()
