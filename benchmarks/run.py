"""The writer against the encoder's limit, side by side in one run: one table of figures and ratios.

Images: real photographs (scikit-image's bundled ones, cropped and resized to
512x512, varied by flips and shifts; see ``bench_encode.py``). Nothing is
downloaded. Install with ``pip install -e ".[bench]"``.

Rows (medians of ``--repeats``; ratios are against the first row of their group,
measured in this run on the same images; in the first table each run of a row is
paired with a run of the limit just before it, and the ratio is the median of those
pairs, so the machine's drift over minutes moves both sides alike):

- encode only: simplejpeg q92 4:2:0 on N threads, no Dask, no tar: the limit;
- Dask alone: the same encoding as ``map_partitions`` on each scheduler, no writer,
  so what Dask costs is told apart from what the writer costs;
- the accessor, exact and per-partition packing, under the threaded scheduler
  and on LocalClusters of 2 processes x 1 thread and 1 process x 2 threads, with
  the DataFrame persisted in worker memory first, spread evenly over the workers (so only the writer is timed);
- the worker allocator setting: 2 x 1 exact packing on a cluster of ours (glibc's trim
  threshold 16 MiB) against a plain LocalCluster (the nanny's 64 KiB), both clusters up
  at once and their jobs alternated;
- pass-through of the same images already encoded, exact packing, against a
  raw sequential write + fsync of the same bytes to the same disk;
- where the CPU goes: the encoder's CPU; the per-byte work a checksummed writer
  cannot skip (SHA-256, XXH3-64, the page-cache write of the encoded bytes) and the
  ceiling it puts on any writer's ratio; a 2 x 1 cluster's workers' and client's CPU;
- scaling: 10 images after import; N/4 against N images; N images in 10
  partitions against N/10 partitions of 10 (threaded scheduler, exact packing;
  the two jobs of each ratio alternated, so the machine's drift moves both alike);
- object store and disk (``bench_s3.py``): bytes uploaded and downloaded by
  exact packing against the dataset's bytes, counted at a loopback S3 server
  (moto behind a counting proxy, both started here); the commit's requests per
  shard, concurrency and wall time with 20 ms added per request (the commit run
  as a task on a 2 x 1 LocalCluster, its copies spread over both workers, and
  from its own process alone); the client's CPU per request and the busiest
  worker's CPU seconds; the most bytes the output directory held during a local
  job against the dataset's size.

Peak RSS is how far the largest resident set of any worker process (psutil, sampled
every 10 ms) rose during a row's timed writes above what it was before them, with the
partitions persisted and one untimed job run (a first job's imports and pools are not
the writer's memory). It includes partitions Dask copied between workers to balance
them; the memory table takes those out in its last column.

Usage: ``python benchmarks/run.py [--quick] [--images 4000] [--partitions 24] [--repeats 3]``.
``--quick`` (800 images, 1 repeat) runs in under two minutes; CI runs it as a smoke
test that never fails on timing.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack, contextmanager
from datetime import date

import dask
import dask.dataframe as dd
import pandas as pd
import psutil
from bench_encode import photographs
from bench_s3 import commit_figures, disk_ratio, s3_transfer
from distributed import Client, LocalCluster, wait
from measure import PeakRSS, median_seconds, write_gathered

import dask_imgsink  # noqa: F401
from dask_imgsink.cluster import local_cluster
from dask_imgsink.core.encode import EncodeOptions, encode_image
from dask_imgsink.core.pool import map_ordered
from dask_imgsink.format.checksums import sample_checksum


@contextmanager
def scratch():
    folder = tempfile.mkdtemp(prefix="imgsink-run-", dir=os.environ.get("IMGSINK_BENCH_DIR"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def limit_runner(images, threads: int):
    """A function encoding ``images`` on ``threads`` threads (no Dask, no tar): one run of the limit."""
    options = EncodeOptions()

    def run():
        for future in map_ordered(lambda img: encode_image(img, options), images, threads):
            future.result()
    run()  # warm up the pool
    return run


def beside_limit(job, limit, repeats: int, warm_up: bool = True) -> tuple[float, float]:
    """Median seconds of ``job`` and the median of its ratios to the limit, each run of ``job``
    paired with a run of ``limit`` just before it (the machine's speed drifts by 10-20 % over
    minutes here, so a limit measured once at the start misstates later rows). ``warm_up``: run
    ``job`` once first (imports and pools in every process), untimed."""
    if warm_up:
        job()
    times, ratios = [], []
    for _ in range(repeats):
        limit_seconds = median_seconds(limit, 1)
        seconds = median_seconds(job, 1)
        times.append(seconds)
        ratios.append(limit_seconds / seconds)
    return statistics.median(times), statistics.median(ratios)


def _encoded_bytes(part: pd.DataFrame) -> pd.Series:
    options = EncodeOptions()
    return pd.Series([sum(len(encode_image(img, options).data) for img in part["image"])])


def dask_alone(ddf):
    """A function running the images' encoding through Dask with no writer: ``map_partitions`` encoding
    every image and keeping only the byte counts. What Dask's scheduling costs before any writing."""
    def run():
        ddf.map_partitions(_encoded_bytes, meta=(None, "int64")).compute()
    return run


def write_job(ddf, packing: str, images_per_tar: int = 500, **options):
    """A function writing ``ddf`` to a fresh folder (removed afterwards): one run of the accessor."""
    def run():
        with scratch() as folder:
            ddf.imgsink.to_webdataset(f"{folder}/out", key_column="key", packing=packing,
                                      images_per_tar=images_per_tar, compute=True, **options)
    return run


@functools.lru_cache(maxsize=1)
def _photographs(count: int) -> list:
    return photographs(count)


def _photo_partition(bounds: tuple[int, int], count: int, encoded: bool) -> pd.DataFrame:
    """Rows ``bounds`` of the benchmark's images, made where the partition is computed (a worker)."""
    images = _photographs(count)[bounds[0]:bounds[1]]
    if encoded:
        options = EncodeOptions()
        images = [encode_image(img, options).data for img in images]
    return pd.DataFrame({"key": [f"img{i:07d}" for i in range(*bounds)], "image": pd.Series(images, dtype=object)})


def frame(count: int, partitions: int, encoded: bool = False) -> dd.DataFrame:
    """The images as a DataFrame built inside the workers (no data in the graph)."""
    edges = [round(i * count / partitions) for i in range(partitions + 1)]
    meta = pd.DataFrame({"key": pd.Series([], dtype=object), "image": pd.Series([], dtype=object)})
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(_photo_partition, list(zip(edges[:-1], edges[1:])), count=count, encoded=encoded,
                           meta=meta, enforce_metadata=False)


def spread_frame(client: Client, count: int, partitions: int) -> dd.DataFrame:
    """The images as a DataFrame held in the workers' memory, partition ``i`` on worker ``i % workers``.

    ``persist`` alone can leave most partitions on one worker (here 14 of 16 when the
    other was still starting), and the write tasks then queue where their data is:
    that measures the placement, not the writer. Balanced placement is what a
    real input (``read_parquet`` over many files) gets from the scheduler.
    """
    workers = sorted(client.nthreads())
    edges = [round(i * count / partitions) for i in range(partitions + 1)]
    futures = [client.submit(_photo_partition, (edges[i], edges[i + 1]), count, False,
                             workers=[workers[i % len(workers)]], pure=False) for i in range(partitions)]
    wait(futures)
    meta = pd.DataFrame({"key": pd.Series([], dtype=object), "image": pd.Series([], dtype=object)})
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_delayed(futures, meta=meta, verify_meta=False)


def write_seconds(ddf, packing: str, repeats: int, images_per_tar: int = 500, **options) -> float:
    run = write_job(ddf, packing, images_per_tar, **options)
    run()  # warm up: imports and pools in every process
    return median_seconds(run, repeats)


def paired_write_seconds(first, second, repeats: int) -> tuple[float, float]:
    """Median exact-packing write times of two DataFrames, the jobs alternated (first, second, first...)."""
    times: tuple[list, list] = ([], [])

    def run(ddf) -> float:  # timed as write_seconds times its jobs
        start = time.perf_counter()
        with scratch() as folder:
            ddf.imgsink.to_webdataset(f"{folder}/out", key_column="key", images_per_tar=500, compute=True)
        return time.perf_counter() - start
    run(first), run(second)  # warm up
    for _ in range(repeats):
        times[0].append(run(first))
        times[1].append(run(second))
    return statistics.median(times[0]), statistics.median(times[1])


def raw_write(blobs: list[bytes]) -> None:
    """The pass-through baseline: a sequential write + fsync of ``blobs`` to a new file (removed after)."""
    with scratch() as folder:
        write_gathered(f"{folder}/raw", blobs, fsync=True)


def raw_write_seconds(blobs: list[bytes], repeats: int) -> float:
    return median_seconds(lambda: raw_write(blobs), repeats)


def passthrough_seconds(ddf, blobs: list[bytes], repeats: int) -> tuple[float, float]:
    """Median times of a raw write + fsync of ``blobs`` and of the exact-packed job passing the same
    encoded images through, the two alternated (a run read 0.43x one after the other, 0.59x alternated)."""
    def job() -> float:
        start = time.perf_counter()
        with scratch() as folder:
            ddf.imgsink.to_webdataset(f"{folder}/out", key_column="key", images_per_tar=500, compute=True)
        return time.perf_counter() - start
    job()  # warm up
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        times[0].append(raw_write_seconds(blobs, 1))
        times[1].append(job())
    return statistics.median(times[0]), statistics.median(times[1])


def cluster_rows(images, limit, partitions: int, repeats: int, workers: int, threads: int,
                 packings=("exact", "per_partition")) -> list[tuple]:
    """Rows for a LocalCluster of ours (dask_imgsink.cluster.local_cluster). Each row's jobs alternate
    with runs of ``limit`` (:func:`limit_runner`) in this process (the cluster idle meanwhile); the
    first row is Dask alone."""
    label = f"LocalCluster {workers} proc x {threads} thread{'s' if threads > 1 else ''}"
    rows = []
    with local_cluster(n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=None,
                       silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        ddf = spread_frame(client, len(images), partitions)
        pids = list(client.run(os.getpid).values())
        rows.append((f"{label}, Dask alone (map_partitions encoding)", *beside_limit(dask_alone(ddf), limit,
                                                                                     repeats), None))
        for packing in packings:
            job = write_job(ddf, packing)
            job()  # warm up outside the peak: a first job's imports and pools are not the writer's memory
            held = max(psutil.Process(p).memory_info().rss for p in pids)
            with PeakRSS(pids) as peak:
                seconds, ratio = beside_limit(job, limit, repeats, warm_up=False)
            rows.append((f"{label}, {packing}", seconds, ratio, (peak.largest - held) / 2**20))
    return rows


def allocator_rows(images, limit, partitions: int, repeats: int) -> list[tuple]:
    """2 x 1 exact packing on a cluster of ours (glibc's trim threshold 16 MiB) against a plain
    ``LocalCluster`` (the nanny's 64 KiB), both up at once, their jobs alternated, each after a run
    of ``limit``: the machine's speed drifts by 10-20 % over minutes, and one cluster measured
    after the other read 0.62 against 0.77 on the same code (2026-11-27) where 32 alternated
    jobs read 0.72 against 0.71."""
    settings = (("LocalCluster 2 proc x 1 thread, exact, ours (trim threshold 16 MiB)", local_cluster),
                ("same, the nanny's default (64 KiB), jobs alternated with the row above", LocalCluster))
    with ExitStack() as stack:
        jobs = []
        for label, start in settings:  # local_cluster sets the variable only while its workers start
            cluster = stack.enter_context(start(n_workers=2, threads_per_worker=1, processes=True,
                                                dashboard_address=None, silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster, set_as_default=False))
            with client.as_current():
                ddf = spread_frame(client, len(images), partitions)
            jobs.append((label, client, write_job(ddf, "exact")))
        times: dict[str, list] = {label: [] for label, _, _ in jobs}
        for turn in range(repeats + 1):  # the first turn warms up (imports and pools in every process)
            for label, client, job in jobs:
                with client.as_current():
                    limit_seconds, seconds = median_seconds(limit, 1), median_seconds(job, 1)
                if turn:
                    times[label].append((seconds, limit_seconds / seconds))
    return [(label, statistics.median(s for s, _ in runs), statistics.median(r for _, r in runs), None)
            for label, runs in times.items()]


def memory_rows(count: int, partitions: int, quick: bool = False) -> list[tuple[str, float, float, float]]:
    """Each worker's peak RSS rise (exact packing, LocalCluster 2 proc x 1 thread) as settings change:
    (label, MB of partitions the largest worker holds, largest RSS rise in MB, largest rise beyond
    the partitions Dask copied to that worker during the job) rows.

    Dask's work stealing moves queued write tasks to the idle worker and copies their
    partitions there (126-164 MB each at 5,000 images in 24 partitions), and it keeps
    those copies; that RSS is input the worker now holds, not the writer's memory, so
    the last column takes it out.
    """
    settings = [(f"{count} images, {partitions} partitions, images_per_tar=500", count, partitions, 500),
                ("same, images_per_tar=100", count, partitions, 100),
                ("same, images_per_tar=2000", count, partitions, 2000),
                (f"same, images_per_tar={count} (the job in one shard)", count, partitions, count),
                (f"same, {4 * partitions} partitions", count, 4 * partitions, 500),
                (f"{2 * count} images, {2 * partitions} partitions (2x the job)", 2 * count, 2 * partitions, 500)]
    if quick:  # a smoke test: one cluster for the settings, one for the shard as large as the job
        settings = [settings[0], settings[3]]
    rows = []
    for label, images, parts, per_tar in settings:
        with local_cluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR) as cluster, Client(cluster) as client:  # a fresh baseline
            pids = client.run(os.getpid)
            ddf = spread_frame(client, images, parts)
            write_seconds(ddf, "exact", 1, images_per_tar=per_tar)  # warm up, and no peak of a first import
            client.run(_trim)
            held_rss = {p: psutil.Process(p).memory_info().rss for p in pids.values()}
            held_data = client.run(_held_bytes)
            with PeakRSS(list(pids.values())) as peak:
                write_seconds(ddf, "exact", 1, images_per_tar=per_tar)
            copied = {addr: max(0, now - held_data[addr]) for addr, now in client.run(_held_bytes).items()}
            rises = {addr: peak.largest_each[pid] - held_rss[pid] for addr, pid in pids.items()}
            worst = max(rises, key=rises.get)
            rows.append((label, max(held_data.values()) / 2**20, rises[worst] / 2**20,
                         max(rises[a] - copied[a] for a in rises) / 2**20))
    return rows


def _held_bytes(dask_worker=None) -> int:
    """Bytes of data this worker holds (its partitions)."""
    return dask_worker.state.nbytes


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def print_memory(rows: list[tuple[str, float, float, float]]) -> None:
    print("\nMemory: each worker's peak RSS rise while writing (exact packing, LocalCluster 2 proc x 1 thread;"
          " target: at most 256 MB above its partitions, whatever the settings)")
    print(f"{'':<64}{'partitions MB':>14}{'RSS rise MB':>13}{'beyond copies':>15}")
    for label, held, rise, beyond in rows:
        print(f"{label:<64}{held:>14.0f}{rise:>13.0f}{beyond:>15.0f}")
    print("  (beyond copies: the rise less the partitions Dask copied to the worker during the job, which it keeps)")


def cpu_rows(images, encoded: list[bytes], partitions: int, threads: int) -> list[tuple[str, float]]:
    """Where the CPU of a job goes: (label, seconds or ratio) rows.

    The encoder's own CPU for the images; the per-byte work no writer that keeps its
    promises can skip (SHA-256 of every shard byte, XXH3-64 of every sample, the write
    into the page cache), which puts a ceiling on any writer's ratio to the encode-only
    limit on the same cores; and one job of each packing on a LocalCluster of 2 x 1:
    its workers' CPU and the client's (which runs LocalCluster's scheduler), against
    the CPU its wall time offered.
    """
    options = EncodeOptions()
    start = time.process_time()
    for future in map_ordered(lambda img: encode_image(img, options), images, threads):
        future.result()
    encode_cpu = time.process_time() - start
    start = time.process_time()
    digest = hashlib.sha256()
    for blob in encoded:
        digest.update(blob)
        sample_checksum(blob)
    with scratch() as folder:
        write_gathered(f"{folder}/raw", encoded)
    per_byte = time.process_time() - start
    rows = [("encode only: CPU seconds", encode_cpu),
            ("SHA-256 + XXH3 + page-cache write of the encoded bytes: CPU seconds", per_byte),
            ("  so any checksummed writer's ceiling against the limit", encode_cpu / (encode_cpu + per_byte))]
    with local_cluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                       silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        ddf = spread_frame(client, len(images), partitions)
        workers = [psutil.Process(p) for p in client.run(os.getpid).values()]
        here = psutil.Process()
        for packing in ("exact", "per_partition"):
            write_seconds(ddf, packing, 1)  # warm
            before = [sum(p.cpu_times()[:2]) for p in (here, *workers)]
            wall = time.perf_counter()
            with scratch() as folder:
                ddf.imgsink.to_webdataset(f"{folder}/out", key_column="key", packing=packing, images_per_tar=500,
                                          compute=True)
            wall = time.perf_counter() - wall
            used = [sum(p.cpu_times()[:2]) - b for p, b in zip((here, *workers), before)]
            rows += [(f"2 x 1, {packing}: workers' CPU seconds", sum(used[1:])),
                     (f"2 x 1, {packing}: client + scheduler CPU seconds", used[0]),
                     (f"2 x 1, {packing}: CPU used / CPU its wall time offered", sum(used) / (2 * wall))]
    return rows


def print_cpu(rows: list[tuple[str, float]]) -> None:
    print("\nWhere the CPU goes (one job each)")
    for label, value in rows:
        print(f"{label:<76}{value:>9.2f}")


def scaling_rows(count: int, repeats: int) -> list[tuple[str, float, float | None, str]]:
    """Time against job size and partition count (threaded scheduler, exact packing): (label, seconds,
    ratio, target) rows."""
    def persisted(images: int, partitions: int):
        return frame(images, partitions).persist(scheduler="threads")

    with dask.config.set(scheduler="threads"):
        ten = write_seconds(persisted(10, 1), "exact", max(repeats, 5))
        # each pair alternated, so the machine's drift during the run moves both sides of a ratio alike
        quarter, whole = paired_write_seconds(persisted(count // 4, 6), persisted(count, 24), repeats)
        few, many = paired_write_seconds(persisted(count, 10), persisted(count, count // 10), repeats)
    return [
        ("10 images, after import", ten, None, "well under 1 s"),
        (f"{count // 4} images", quarter, None, ""),
        (f"{count} images (4x)", whole, whole / quarter, "<= 4.2"),
        (f"{count} images in 10 partitions", few, None, ""),
        (f"{count} images in {count // 10} partitions of 10", many, many / few, "<= 1.5"),
    ]


def print_scaling(rows: list[tuple[str, float, float | None, str]]) -> None:
    print("\nScaling (threaded scheduler, exact packing; ratio = time against the row above)")
    print(f"{'':<72}{'seconds':>9}{'ratio':>8}  target")
    for label, seconds, ratio, target in rows:
        shown = f"{ratio:>8.2f}" if ratio is not None else f"{'':>8}"
        print(f"{label:<72}{seconds:>9.2f}{shown}  {target}")


def storage_rows(count: int, shards: int, repeats: int) -> list[tuple[str, float, str]]:
    """Object store and disk figures: (label, value, target) rows."""
    ddf = frame(count, 8).persist(scheduler="threads")
    with dask.config.set(scheduler="threads"), scratch() as folder:
        moved = s3_transfer(ddf, folder, repeats)
        disk = disk_ratio(ddf, folder)
    alone, slow, fast, botocore_alone, botocore = commit_figures(
        shards, [(0.02, False, True), (0.02, True, True), (0.0, True, True), (0.02, False, False), (0.02, True, False)])
    return [
        (f"exact packing of {count} images: bytes uploaded / dataset bytes", moved["put_ratio"], "<= 1.05"),
        ("exact packing: bytes downloaded / dataset bytes", moved["get_ratio"], "<= 0.05"),
        ("exact packing: time to loopback S3 / time to local disk", moved["s3_seconds"] / moved["local_seconds"],
         ""),
        (f"commit of {shards} shards: requests per shard", slow["per_shard"], "<= 3 (+ a fixed few)"),
        ("commit: most requests in flight at once", slow["most_in_flight"], "concurrent"),
        ("commit: requests for the whole job (not per shard) / of them sent alone", slow["fixed"], ""),
        ("  (sent alone: each a full round trip)", slow["waited_alone"], ""),
        (f"commit of {shards} shards, 20 ms added per request: seconds", slow["seconds"], "< 1"),
        ("same, no latency added (the server's own time): seconds", fast["seconds"], ""),
        ("same, 20 ms, copies from the commit's process alone: seconds", alone["seconds"], ""),
        ("same, 20 ms, copies through s3fs (botocore), spread: seconds", botocore["seconds"], ""),
        ("same, 20 ms, copies through s3fs, from the commit's process alone: seconds", botocore_alone["seconds"], ""),
        ("commit: client CPU ms per request, through obstore (bounds it on a real store)",
         slow["client_ms_per_request"], ""),
        ("  same, copies through s3fs (botocore)", botocore["client_ms_per_request"], ""),
        ("commit: busiest worker's CPU seconds, copies spread over the 2 workers", slow["busiest_client_cpu"], ""),
        ("  same, copies from the commit's process alone", alone["busiest_client_cpu"], ""),
        ("  same through s3fs, spread", botocore["busiest_client_cpu"], ""),
        ("  same through s3fs, from the commit's process alone", botocore_alone["busiest_client_cpu"], ""),
        ("exact packing on local disk: peak bytes below the output / dataset bytes", disk, "<= 1.1"),
    ]


def print_storage(rows: list[tuple[str, float, str]]) -> None:
    print("\nObject store (moto on loopback behind a counting proxy: counted at the server) and disk space")
    print(f"{'':<76}{'value':>9}  target")
    for label, value, target in rows:
        print(f"{label:<76}{value:>9.2f}  {target}")


def print_table(title: str, rows: list[tuple], count: int, unit: str = "img/s") -> None:
    """Rows of (label, seconds, ratio or None, RSS rise or None); a ratio of None is taken against
    the first row's seconds."""
    base = rows[0][1]
    print(f"\n{title}")
    print(f"{'':<72}{'seconds':>9}{unit:>10}{'ratio':>8}{'RSS rise MB':>13}")
    for label, seconds, ratio, peak in rows:
        shown = f"{peak:>13.0f}" if peak is not None else f"{'':>13}"
        ratio = base / seconds if ratio is None else ratio
        print(f"{label:<72}{seconds:>9.2f}{count / seconds:>10.0f}{ratio:>8.2f}{shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="800 images, 1 repeat (a smoke test)")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--partitions", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3-images", type=int, default=800, help="images written to the loopback S3 server")
    parser.add_argument("--commit-shards", type=int, default=400, help="shards of the timed commit")
    args = parser.parse_args()
    if args.quick:
        args.images, args.partitions, args.repeats = 800, 16, 1
        args.s3_images, args.commit_shards = 200, 100
    cores = os.cpu_count() or 1
    print(f"dask-imgsink benchmarks, {date.today()}: {cores} cores, {args.images} photographs 512x512, "
          f"{args.partitions} partitions, medians of {args.repeats}")
    images = _photographs(args.images)

    limit = limit_runner(images, cores)
    rows = [("encode only (simplejpeg, no Dask, no tar): the limit", median_seconds(limit, args.repeats), 1.0, None)]
    threaded = frame(args.images, args.partitions).persist(scheduler="threads")
    with dask.config.set(scheduler="threads"):
        rows.append(("threaded scheduler, Dask alone (map_partitions encoding)",
                     *beside_limit(dask_alone(threaded), limit, args.repeats), None))
        for packing in ("exact", "per_partition"):
            rows.append((f"threaded scheduler, {packing}", *beside_limit(write_job(threaded, packing), limit,
                                                                         args.repeats), None))
    rows += cluster_rows(images, limit, args.partitions, args.repeats, workers=2, threads=1)
    rows += cluster_rows(images, limit, args.partitions, args.repeats, workers=1, threads=2)
    rows += allocator_rows(images, limit, args.partitions, args.repeats)
    print_table("Encoding pixels (JPEG q92 4:2:0)", rows, len(images))

    options = EncodeOptions()
    encoded = [encode_image(img, options).data for img in images]
    megabytes = sum(len(b) for b in encoded) / 1e6
    passthrough = frame(args.images, args.partitions, encoded=True).persist(scheduler="threads")
    with dask.config.set(scheduler="threads"):
        raw, through = passthrough_seconds(passthrough, encoded, args.repeats)
    print_table(f"Pass-through of the same images encoded ({megabytes:.0f} MB)",
                [("raw sequential write + fsync of the same bytes", raw, None, None),
                 ("accessor, exact, threaded scheduler", through, None, None)], int(megabytes), unit="MB/s")
    print_cpu(cpu_rows(images, encoded, args.partitions, cores))
    print_scaling(scaling_rows(args.images, args.repeats))
    print_memory(memory_rows(args.images // 2, args.partitions // 2, quick=args.quick))
    print_storage(storage_rows(args.s3_images, args.commit_shards, args.repeats))


if __name__ == "__main__":
    main()
