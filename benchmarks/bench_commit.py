"""The commit on an object store: requests and wall time per shard, against publishing one file at a time.

Starts its own S3 API server (moto in server mode) on loopback, stages a job of
``--shards`` one-image shards (tar, Parquet and DALI index each) in this process,
then times the commit with ``--latency`` seconds added before every request (an
emulated remote store), counting requests by operation. The baseline moves the
same number of objects of the same sizes one at a time with ``fs.mv``, the way
the commit published before (HEAD, LIST, CopyObject, DeleteObjects... per file).

Usage: ``python benchmarks/bench_commit.py [--shards 400] [--latency 0.02]``
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
from dask.base import tokenize

import dask_imgsink.job.accessor as acc
from dask_imgsink.job.claim import claim_output


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto did not start")


class Requests:
    """Counts (and delays) the requests of the s3fs instance for ``options``."""

    def __init__(self, options: dict, latency: float) -> None:
        import s3fs

        self.fs = s3fs.S3FileSystem(**options)
        self.fs.ls("")
        self.counts: dict[str, int] = {}
        self.latency, self.on = latency, False

        async def before_send(request, **kwargs):
            if self.on:
                name = kwargs.get("event_name", "").rsplit(".", 1)[-1]
                self.counts[name] = self.counts.get(name, 0) + 1
                await asyncio.sleep(self.latency)

        self.fs.s3.meta.events.register("before-send.s3", before_send)


def staged_commit(url: str, options: dict, shards: int):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"key": [f"k{i:06d}" for i in range(shards)],
                          "image": pd.Series([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                                              for _ in range(shards)], dtype=object)})
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frame, npartitions=4, sort=False)
    fs, opts = acc._build_options(
        ddf, url, **{**{n: p.default for n, p in __import__("inspect").signature(acc.to_webdataset).parameters.items()
                        if p.kind is p.KEYWORD_ONLY and n not in ("compute", "compute_kwargs")},
                     "key_column": "key", "images_per_tar": 1, "storage_options": options})
    claim = claim_output(opts, tokenize(*opts.token()))
    parts = ddf.to_delayed()
    results = [acc.PartitionWriter(opts)(p.compute(), i, claim) for i, p in enumerate(parts)]
    plan = acc.plan_shards(results, claim, opts)
    assembled = [acc.assemble_shards(plan, range(len(parts)), opts)]
    return lambda: acc._commit_exact(claim, results, assembled, len(parts), opts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.02)
    args = parser.parse_args()
    import boto3

    proc, endpoint = start_server()
    try:
        options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        requests = Requests(options, args.latency)
        commit = staged_commit(f"s3://{bucket}/out", options, args.shards)
        requests.on = True
        start = time.perf_counter()
        commit()
        ours = time.perf_counter() - start
        ours_counts, requests.counts = dict(requests.counts), {}

        requests.on = False
        files = [f"{bucket}/base/f{i:06d}" for i in range(3 * args.shards)]
        requests.fs.pipe({path: b"x" * 2048 for path in files})
        requests.on = True
        start = time.perf_counter()
        for path in files:
            requests.fs.mv(path, path.replace("/base/", "/moved/"))
        baseline = time.perf_counter() - start
        base_counts = dict(requests.counts)
    finally:
        proc.terminate()
    print(f"{args.shards} shards (3 files each), {args.latency * 1000:.0f} ms added per request")
    print(f"{'':<40}{'seconds':>9}{'requests':>10}{'per shard':>11}")
    for label, seconds, counts in (("the commit (batched, concurrent)", ours, ours_counts),
                                   ("baseline: fs.mv one file at a time", baseline, base_counts)):
        total = sum(counts.values())
        print(f"{label:<40}{seconds:>9.2f}{total:>10}{total / args.shards:>11.2f}")
    print(f"speed-up x{baseline / ours:.1f}; the commit's requests: {ours_counts}")


if __name__ == "__main__":
    main()
