"""Where a cluster job's wall time goes: Dask's task stream of one write job, taken apart.

``run.py`` gives a cluster row as one ratio to the encode-only limit. This script
shows what the wall time beyond the limit is made of, for the same images on a
LocalCluster (2 processes x 1 thread by default), each job paired with a run of
the limit just before it (as ``run.py`` does):

- the task time of each kind of task (``imgsink-encode-write``: encoding and the
  run or the shard's bytes; ``imgsink-pack-shards``: the assembly groups of exact
  packing; the commit), and the time Dask spent moving results between workers;
- for each worker, its busy time (tasks computing) and its idle time;
- the *tail*: the seconds from the end of the last encoding task to the job's result.

Medians over ``--repeats`` jobs; ``--timeline`` also prints one job's tasks in
order on each worker (``12`` is partition 12's write task, ``3P`` assembly group 3).

Usage: ``python benchmarks/bench_timeline.py [--images 5000] [--partitions 24] [--repeats 4]
[--packing exact] [--workers 2 --threads 1] [--timeline]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import defaultdict

from distributed import Client, get_task_stream
from measure import median_seconds
from run import _photographs, limit_runner, spread_frame, write_job

from dask_imgsink.cluster import local_cluster


def _kind(key) -> str:
    """A task's kind: its key's name without the job's token."""
    name = key[0] if isinstance(key, tuple) else key
    return name.rsplit("-", 1)[0] if name.startswith("imgsink-") else name.split("-")[0]


def _label(key) -> str:
    index = key[1] if isinstance(key, tuple) and len(key) > 1 else ""
    return f"{index}P" if _kind(key) == "imgsink-pack-shards" else str(index)


def one_job(client: Client, job) -> tuple[float, dict]:
    """Run ``job`` once; return its wall time and its task stream, taken apart."""
    start = time.time()
    with get_task_stream(client) as stream:
        job()
    end = time.time()
    computing: dict[str, list] = defaultdict(list)
    by_kind: dict[str, float] = defaultdict(float)
    moving = 0.0
    for task in stream.data:
        for span in task["startstops"]:
            if span["action"] == "compute":
                computing[task["worker"]].append((span["start"], span["stop"], task["key"]))
                by_kind[_kind(task["key"])] += span["stop"] - span["start"]
            elif span["action"] == "transfer":
                moving += span["stop"] - span["start"]
    encoded = [stop for spans in computing.values() for _, stop, key in spans if _kind(key) == "imgsink-encode-write"]
    wall = end - start
    return wall, {"kinds": dict(by_kind), "transfer": moving, "tail": end - max(encoded),
                  "busy": {w: sum(b - a for a, b, _ in spans) for w, spans in computing.items()},
                  "order": {w: sorted(spans) for w, spans in computing.items()}, "start": start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--partitions", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--packing", default="exact", choices=["exact", "per_partition"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeline", action="store_true")
    args = parser.parse_args()
    images = _photographs(args.images)
    limit = limit_runner(images, args.workers * args.threads)
    with local_cluster(n_workers=args.workers, threads_per_worker=args.threads,
                       silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        job = write_job(spread_frame(client, args.images, args.partitions), args.packing)
        job()  # warm up: imports and pools in every process
        runs = []
        for _ in range(args.repeats):
            limit_seconds = median_seconds(limit, 1)
            wall, parts = one_job(client, job)
            runs.append((limit_seconds, wall, parts))
    _print(args, runs)


def _print(args, runs: list) -> None:
    med = statistics.median
    limit, wall = med(r[0] for r in runs), med(r[1] for r in runs)
    print(f"{args.images} photographs in {args.partitions} partitions, {args.packing} packing, LocalCluster "
          f"{args.workers} x {args.threads}; medians of {len(runs)} jobs, each after a run of the limit")
    print(f"{'the limit (encode only, no Dask)':<44}{limit:>8.2f} s")
    print(f"{'the job':<44}{wall:>8.2f} s   ratio {med(r[0] / r[1] for r in runs):.2f}")
    kinds = sorted({k for r in runs for k in r[2]["kinds"]}, key=lambda k: -runs[0][2]["kinds"].get(k, 0))
    for kind in kinds:
        seconds = med(r[2]["kinds"].get(kind, 0.0) for r in runs)
        if seconds >= 0.001:
            print(f"  task time, {kind:<32}{seconds:>8.2f} s")
    print(f"  {'moving results between workers':<42}{med(r[2]['transfer'] for r in runs):>8.2f} s")
    print(f"  {'idle, all workers (wall x workers - busy)':<42}"
          f"{med(r[1] * args.workers * args.threads - sum(r[2]['busy'].values()) for r in runs):>8.2f} s")
    print(f"  {'tail: last encoding task to the result':<42}{med(r[2]['tail'] for r in runs):>8.2f} s")
    if args.timeline:
        parts = runs[-1][2]
        print("one job's tasks on each worker (partition's write task; nP: assembly group n), seconds from its start:")
        for worker, spans in parts["order"].items():
            shown = [f"{_label(k)}@{a - parts['start']:.2f}-{b - parts['start']:.2f}" for a, b, k in spans
                     if _kind(k) in ("imgsink-encode-write", "imgsink-pack-shards")]
            print(f"  {worker}: {' '.join(shown)}")


if __name__ == "__main__":
    main()
