"""What integrity costs: checksums while writing, and verify's throughput, each against a baseline in the same run.

1. Checksums. The same images written with and without the checksums (each
   tar's SHA-256 as it is written, each sample's XXH3-64, each Parquet's
   SHA-256), runs interleaved, medians compared:
   - engine-free: ``write_rows`` (encode on the pool + tar + Parquet), one shard per 100 images;
   - the accessor, exact packing, on the threaded scheduler (the checksums are
     switched off in this process, so workers of a cluster would not see it).
2. Verify. A dataset of real photographs verified on a ``LocalCluster`` (2
   worker processes x 1 thread): shards/s and MB/s, with and without
   ``decode``, against reading and SHA-256-hashing the same files on 2 processes
   (what ``sha256sum`` of every file would do); and the peak Python memory of
   verifying one shard in this process, against the shard's size (it streams).

Usage: ``python benchmarks/bench_trust.py [--images 1200] [--repeats 5]`` (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import shutil
import statistics
import tempfile
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dask
import dask.dataframe as dd
import pandas as pd
from bench_encode import photographs

import dask_imgsink
import dask_imgsink.core.writer as writer_module
import dask_imgsink.format.checksums as checksums_module
from dask_imgsink.core.encode import EncodeOptions
from dask_imgsink.core.writer import Rows, ShardTarget, write_rows
from dask_imgsink.read.verify import ShardCheck, verify_dataset, verify_shard


class _NoHash:
    def __init__(self, data=b"") -> None:
        pass

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


class _NoHashlib:
    sha256 = _NoHash


@contextlib.contextmanager
def checksums_off():
    """Switch off the three checksums taken while writing (page CRCs stay: they are Parquet's own)."""
    # every SHA-256 (shards, Parquet, .idx) goes through format/checksums.py's hashlib; the
    # sample checksum is taken in the writer
    saved = (checksums_module.hashlib, writer_module.pieces_checksum)
    checksums_module.hashlib = _NoHashlib
    writer_module.pieces_checksum = lambda pieces: "0" * 16
    try:
        yield
    finally:
        checksums_module.hashlib, writer_module.pieces_checksum = saved


def interleaved(with_fn, without_fn, repeats: int) -> tuple[float, float]:
    """Median seconds of each, runs alternating so that the machine's load hits both alike."""
    with_times, without_times = [], []
    for _ in range(repeats):
        for fn, times, off in ((with_fn, with_times, False), (without_fn, without_times, True)):
            ctx = checksums_off() if off else contextlib.nullcontext()
            with ctx:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return statistics.median(with_times), statistics.median(without_times)


def bench_checksums(images, repeats: int, workdir: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("file")
    rows = Rows(images=images, keys=[f"img{i:06d}" for i in range(len(images))],
                texts=[f"caption {i}" for i in range(len(images))])

    def engine_free():
        out = workdir / "rows"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        write_rows(rows, fs=fs, images_per_tar=100, options=EncodeOptions(),
                   target_for=lambda i: ShardTarget(str(out / f"s{i}.tar"), str(out / f"s{i}.parquet"), f"s{i}.tar"))

    pdf = pd.DataFrame({"key": rows.keys, "image": pd.Series(images, dtype=object), "caption": rows.texts})
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(pdf, npartitions=8, sort=False)

    def accessor():
        out = workdir / "accessor"
        shutil.rmtree(out, ignore_errors=True)
        ddf.imgsink.to_webdataset(str(out), key_column="key", text_column="caption", images_per_tar=100,
                                  compute=True, compute_kwargs={"scheduler": "threads"})

    n = len(images)
    print(f"\n1. checksums while writing: {n} photographs 512x512, JPEG q92, median of {repeats}")
    print(f"{'what':<44}{'with':>10}{'without':>10}{'cost':>8}")
    for name, fn in (("write_rows (encode + tar + Parquet)", engine_free),
                     ("accessor, exact packing, threads", accessor)):
        with_s, without_s = interleaved(fn, fn, repeats)
        print(f"{name:<44}{n / with_s:>7.0f}/s{n / without_s:>7.0f}/s{(with_s / without_s - 1) * 100:>7.1f}%")


def _sha256_file(path: str) -> int:
    with open(path, "rb") as f:
        hashlib.file_digest(f, "sha256")
    return Path(path).stat().st_size


def bench_verify(images, repeats: int, workdir: Path) -> None:
    from distributed import Client, LocalCluster

    out = workdir / "dataset"
    pdf = pd.DataFrame({"key": [f"img{i:06d}" for i in range(len(images))],
                        "image": pd.Series(images, dtype=object),
                        "caption": [f"caption {i}" for i in range(len(images))]})
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(pdf, npartitions=8, sort=False)
    ddf.imgsink.to_webdataset(str(out), key_column="key", text_column="caption", images_per_tar=100, compute=True)
    files = sorted(str(p) for p in out.iterdir() if p.suffix in (".tar", ".parquet"))
    total = sum(Path(f).stat().st_size for f in files)
    shards = sum(f.endswith(".tar") for f in files)
    print(f"\n2. verify: {shards} shards, {len(images)} images, {total / 1e6:.0f} MB, "
          f"LocalCluster 2 processes x 1 thread, median of {repeats}")
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        results = {}
        for decode in (False, True):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                report = verify_dataset(str(out), client=client, decode=decode)
                times.append(time.perf_counter() - start)
                assert report.ok, report.problems
            results[decode] = statistics.median(times)
    with ProcessPoolExecutor(2) as pool:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(_sha256_file, files))
            times.append(time.perf_counter() - start)
        baseline = statistics.median(times)
    print(f"{'what':<44}{'shards/s':>10}{'MB/s':>8}{'vs baseline':>13}")
    for name, seconds in (("verify", results[False]), ("verify --decode", results[True]),
                          ("baseline: sha256 of every file, 2 processes", baseline)):
        print(f"{name:<44}{shards / seconds:>10.1f}{total / seconds / 1e6:>8.0f}{baseline / seconds:>12.2f}x")
    index = __import__("json").loads((out / "_index.json").read_text())
    entry = index["shardlist"][0]
    check = ShardCheck(str(out), None, entry, index["jobs"][0]["options"], False, 1 << 28)
    tracemalloc.start()
    verify_shard(check)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"peak Python memory verifying one {entry['filesize'] / 1e6:.1f} MB shard in-process: {peak / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    images = photographs(args.images)
    print(f"dask-imgsink {dask_imgsink.__version__}, dask {dask.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        bench_checksums(images, args.repeats, Path(tmp))
        bench_verify(images, max(3, args.repeats // 2), Path(tmp))


if __name__ == "__main__":
    main()
