"""Object-store figures, counted at a loopback S3 API server (moto behind :class:`s3proxy.S3Proxy`).

- Exact packing to S3: bytes uploaded and downloaded against the dataset's own
  bytes (its tars, Parquet, indexes and small files, as listed after the job),
  and the wall time against writing the same DataFrame to local disk.
- The commit: a job of ``shards`` one-image shards (tar, Parquet and DALI
  index each) staged in this process, then committed as a task on a
  LocalCluster of 2 processes x 1 thread with ``latency`` seconds added to every
  request at the server: requests per shard, wall time, and the CPU seconds of
  each process (both workers, the server, the proxy), with the commit's copies
  spread over the workers and from one process, sent through obstore (the
  default where it is installed) and through s3fs (botocore). The client's CPU
  per request is what bounds a commit of many shards against a real store.
- Disk space: the most bytes the output directory held while an exact-packed
  job ran, against the dataset's size at the end.

Usage: ``python benchmarks/bench_s3.py [--shards 400 [2000 10000 ...]] [--latency 0.02] [--repeats 1]
[--clients both|obstore|s3fs] [--spread both|on|off]``
(``run.py`` prints the same rows in its table). With several ``--shards`` sizes it
commits each size in turn and ends with how the commit scales, size by size: wall
time and requests per shard, and the server's and our client's CPU per request (a
commit that scales keeps them flat).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
import warnings
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import psutil
from distributed import Client, LocalCluster
from measure import DiskPeak, median_seconds
from s3proxy import S3Proxy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import staged_job  # noqa: E402  (the tests' own: claim, write, plan, assemble in-process)

import dask_imgsink  # noqa: E402, F401  (registers ddf.imgsink)
from dask_imgsink.job.spread import DEFAULT_SPREAD_FILES, SPREAD_FILES_KEY  # noqa: E402
from dask_imgsink.s3copy import OBSTORE_KEY  # noqa: E402


def _dataset_bytes(fs, root: str) -> int:
    return sum(info["size"] for info in fs.find(root, detail=True).values())


def s3_transfer(ddf, local_dir: str, repeats: int) -> dict:
    """Exact packing of ``ddf`` to loopback S3 and to ``local_dir``: bytes moved and times."""
    with S3Proxy() as proxy:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        proxy.make_bucket(bucket)
        options = proxy.storage_options()
        runs = []

        def to_s3():
            url = f"s3://{bucket}/out-{len(runs)}"
            proxy.reset()
            ddf.imgsink.to_webdataset(url, key_column="key", images_per_tar=500, storage_options=options,
                                      compute=True)
            counts = proxy.counts()
            runs.append((url, counts["bytes_up"], counts["bytes_down"]))

        to_s3()  # warm up
        s3_seconds = median_seconds(to_s3, repeats)
        import s3fs

        fs = s3fs.S3FileSystem(**options)
        url, up, down = runs[-1]
        size = _dataset_bytes(fs, url)
    count = [0]

    def to_disk():
        count[0] += 1
        ddf.imgsink.to_webdataset(f"{local_dir}/local-{count[0]}", key_column="key", images_per_tar=500,
                                  compute=True)
    to_disk()
    local_seconds = median_seconds(to_disk, repeats)
    return {"dataset_bytes": size, "put_ratio": up / size, "get_ratio": down / size, "s3_seconds": s3_seconds,
            "local_seconds": local_seconds}


def _staged_commit(url: str, options: dict, shards: int, spread_files: int | None, obstore: bool = True):
    """Stage a job of ``shards`` one-image shards in this process; return its commit, ready to call."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"key": [f"k{i:06d}" for i in range(shards)],
                          "image": pd.Series([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                                              for _ in range(shards)], dtype=object)})
    # staged by this process's own scheduler: the frame's arrays stay out of the cluster's graphs
    with dask.config.set({"dataframe.convert-string": False, SPREAD_FILES_KEY: spread_files, OBSTORE_KEY: obstore,
                          "scheduler": "sync"}):
        ddf = dd.from_pandas(frame, npartitions=4, sort=False)
        return staged_job(ddf, url, key_column="key", images_per_tar=1, storage_options=options)


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    times = {name: psutil.Process(pid).cpu_times() for name, pid in pids.items()}
    return {name: t.user + t.system for name, t in times.items()}


def commit_figures(shards: int, cases: list[tuple[float, bool, bool]]) -> list[dict]:
    """The commit of ``shards`` shards for each ``(latency, spread, obstore)`` case, run as a task on one
    LocalCluster of 2 processes x 1 thread (as a job's commit runs), with ``latency`` s added per
    request: wall time, requests, and the CPU seconds each process spent meanwhile (the workers,
    which send the requests; the server; the proxy). ``spread=False`` publishes every file from
    the commit's own process; ``obstore=False`` sends the copies through s3fs."""
    with S3Proxy() as proxy, LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                          dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        pids = {f"worker {i}": pid for i, pid in enumerate(client.run(os.getpid).values())}
        pids.update({"server": proxy.procs[0].pid, "proxy": proxy.procs[1].pid})
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        proxy.make_bucket(bucket)
        return [_one_commit(client, proxy, pids, f"s3://{bucket}/out-{i}", shards, *case)
                for i, case in enumerate(cases)]


def _one_commit(client, proxy, pids: dict[str, int], url: str, shards: int, latency: float, spread: bool,
                obstore: bool) -> dict:
    commit = _staged_commit(url, proxy.storage_options(), shards, DEFAULT_SPREAD_FILES if spread else None,
                            obstore)
    proxy.reset()
    proxy.set_latency(latency)
    before = _cpu_seconds(pids)
    start = time.perf_counter()
    with warnings.catch_warnings():  # the staged results travel inside the task: 3-4 kB a shard, not a slowdown here
        warnings.filterwarnings("ignore", message="Sending large graph")
        client.submit(commit, pure=False).result()
    seconds = time.perf_counter() - start
    after = _cpu_seconds(pids)
    counts = proxy.counts()
    proxy.set_latency(0)
    waited_alone = [r for r in counts["alone"] if not r.startswith("CopyObject")]
    copies_by = {c: ops["CopyObject"] for c, ops in counts["by_client"].items() if "CopyObject" in ops}
    assert list(copies_by) == (["dask-imgsink"] if obstore else ["aiobotocore"]), copies_by
    cpu = {name: after[name] - before[name] for name in pids}
    workers_cpu = [v for name, v in cpu.items() if name.startswith("worker")]
    return {"seconds": seconds, "requests": counts["total"], "per_shard": counts["total"] / shards,
            "by_operation": counts["requests"], "most_in_flight": counts["most_in_flight"],
            "fixed": counts["total"] - counts["requests"].get("CopyObject", 0),
            "waited_alone": len(waited_alone), "cpu": cpu, "busiest_client_cpu": max(workers_cpu),
            "client_ms_per_request": 1000 * sum(workers_cpu) / counts["total"], "spread": spread,
            "latency": latency, "obstore": obstore}


def disk_ratio(ddf, folder: str) -> float:
    """Peak bytes below the output directory during an exact-packed job, over the dataset's final size."""
    out = f"{folder}/disk"
    with DiskPeak(folder) as disk:
        ddf.imgsink.to_webdataset(out, key_column="key", images_per_tar=500, compute=True)
    return max(disk.peak, disk.size()) / disk.size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[400],
                        help="shards of each commit; several sizes show how the commit scales")
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=1, help="commits of each kind, alternated")
    parser.add_argument("--clients", choices=["both", "obstore", "s3fs"], default="both",
                        help="what sends the copies")
    parser.add_argument("--spread", choices=["both", "on", "off"], default="both",
                        help="copies spread over the workers, or from the commit's process")
    args = parser.parse_args()
    clients = {"both": (True, False), "obstore": (True,), "s3fs": (False,)}[args.clients]
    spreads = {"both": (False, True), "on": (True,), "off": (False,)}[args.spread]
    cases = [(args.latency, spread, obstore) for _ in range(args.repeats) for obstore in clients
             for spread in spreads]
    scaling = []
    for shards in args.shards:
        for f in commit_figures(shards, cases):
            print_commit(shards, f)
            scaling.append((shards, f))
    if len(args.shards) > 1:
        print_scaling(scaling)


def print_commit(shards: int, f: dict) -> None:
    cpu = ", ".join(f"{name} {value:.2f}" for name, value in f["cpu"].items())
    print(f"commit of {shards} shards at {f['latency'] * 1000:.0f} ms per request, copies through "
          f"{'obstore' if f['obstore'] else 's3fs'}, "
          f"{'spread over the workers' if f['spread'] else 'from one process'}: {f['seconds']:.2f} s; "
          f"CPU seconds: {cpu}; {f['client_ms_per_request']:.1f} ms of client CPU per request; "
          f"{f['per_shard']:.2f} requests per shard, up to {f['most_in_flight']} at once; "
          f"{f['fixed']} for the whole job, {f['waited_alone']} of them sent alone {f['by_operation']}",
          flush=True)


def print_scaling(scaling: list[tuple[int, dict]]) -> None:
    """Per-shard figures of each commit, size by size: flat columns mean the commit scales linearly."""
    print("\nHow the commit scales (per shard; flat columns: linear in the shards)")
    print(f"{'shards':>8}{'client':>9}{'spread':>8}{'seconds':>9}{'ms/shard':>10}{'req/shard':>11}"
          f"{'server CPU ms/req':>19}{'client CPU ms/req':>19}{'sent alone':>12}")
    for shards, f in scaling:
        print(f"{shards:>8}{'obstore' if f['obstore'] else 's3fs':>9}{'on' if f['spread'] else 'off':>8}"
              f"{f['seconds']:>9.2f}{1000 * f['seconds'] / shards:>10.2f}{f['per_shard']:>11.3f}"
              f"{1000 * f['cpu']['server'] / f['requests']:>19.2f}{f['client_ms_per_request']:>19.2f}"
              f"{f['waited_alone']:>12}")


if __name__ == "__main__":
    main()
